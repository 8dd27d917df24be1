"""Who an approval goes to: the user, their devices, and which are connected right now.

Every new approval needs the user (locked?) and their devices (where to send it), and
these change rarely, so each process keeps what it read. Before an entry is used it is
checked against the user's account version in Redis, which comes back in the same round
trip as the presence lookup every approval makes anyway (app.store.presence.snapshot).
Whoever changes a user or their devices, in any process or the CLI, calls
`account_changed()` after the commit, so a change is seen by every process at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from app.core.clock import Clock
from app.core.ttlcache import TtlCache
from app.db.accounts import get_user_by_email, list_active_devices
from app.db.models import Device, User
from app.store.presence import Presence

# A bound on staleness should a change ever skip `account_changed()` (a process that died
# between its commit and the version bump, or Redis losing its data).
ENTRY_SECONDS = 60.0
MAX_ENTRIES = 20_000


@dataclass(frozen=True)
class Recipient:
    """A user an approval is for. Shared between requests: read it, never change it.

    Kept current: `user.locked` and the devices (who they are, their push tokens), the
    things whose changes call `account_changed()`. Read anything else from the database.
    """

    user: User
    devices: tuple[Device, ...]  # enrolled and not revoked
    connected: frozenset[str]  # ids of the devices whose socket a live process holds


@dataclass(frozen=True)
class _Entry:
    version: str
    user: User
    devices: tuple[Device, ...]


class AccountCache:
    """Users and their devices as of their current account version, per process."""

    def __init__(
        self, db: async_sessionmaker[AsyncSession], presence: Presence, clock: Clock
    ) -> None:
        self._db = db
        self._presence = presence
        # Emails never change owner (accounts are not deleted or renamed), so this mapping
        # needs no version.
        self._user_ids: TtlCache[str, str] = TtlCache(clock, ttl=3600.0, max_entries=MAX_ENTRIES)
        self._entries: TtlCache[str, _Entry] = TtlCache(
            clock, ttl=ENTRY_SECONDS, max_entries=MAX_ENTRIES
        )

    async def by_email(self, email: str) -> Recipient | None:
        """The user with this (normalised) email, or None; no SQL once the entry is current."""
        user_id = self._user_ids.get(email)
        if user_id is None:
            # First sight: read everything now; it is cached at the next approval, once a
            # version read *before* the SQL read can vouch for it.
            async with self._db() as db:
                user = await get_user_by_email(db, email)
                if user is None:
                    return None  # not cached: a registration must be seen at once
                devices = await list_active_devices(db, user.id)
            self._user_ids.put(email, user.id)
            snapshot = await self._presence.snapshot(user.id)
            return Recipient(user, tuple(devices), snapshot.connected)
        snapshot = await self._presence.snapshot(user_id)
        entry = self._entries.get(user_id)
        if entry is None or entry.version != snapshot.account_version:
            async with self._db() as db:
                user = await db.get(User, user_id)
                if user is None:
                    return None
                devices = await list_active_devices(db, user_id)
            entry = _Entry(snapshot.account_version, user, tuple(devices))
            self._entries.put(user_id, entry)
        return Recipient(entry.user, entry.devices, snapshot.connected)

    async def for_user(self, user: User) -> Recipient:
        """`user` (just read by the caller) with their devices and who is connected."""
        snapshot = await self._presence.snapshot(user.id)
        entry = self._entries.get(user.id)
        if entry is not None and entry.version == snapshot.account_version:
            devices = entry.devices
        else:
            async with self._db() as db:
                devices = tuple(await list_active_devices(db, user.id))
        return Recipient(user, devices, snapshot.connected)
