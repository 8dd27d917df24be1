"""Who an approval goes to: the user, their devices, and which are connected right now.

Every new approval needs the user (locked?), their devices (where to send it) and which of
those hold a socket, and these change rarely, so each process keeps what it last saw. The
approval's create script checks that view against Redis in the same atomic step (the user's
account version and connected devices: the `snapshot` Lua library) and creates nothing
when it is out of date; the caller then refreshes it here and plans again. Whoever changes
a user or their devices, in any process or the CLI, calls `account_changed()` after the
commit, so a change is seen by the next approval in every process.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from app.core.clock import Clock
from app.core.ttlcache import TtlCache
from app.db.accounts import get_user_by_email, list_active_devices
from app.db.models import Device, User
from app.store.presence import Presence, Snapshot

# A bound on staleness should a change ever skip `account_changed()` (a process that died
# between its commit and the version bump, or Redis losing its data).
ENTRY_SECONDS = 60.0
MAX_ENTRIES = 20_000


@dataclass(frozen=True)
class Recipient:
    """A user an approval is for. Shared between requests: read it, never change it.

    Kept current: `user.locked` and the devices (who they are, their push tokens), the
    things whose changes call `account_changed()`, and who is connected. Read anything else
    from the database.
    """

    user: User
    devices: tuple[Device, ...]  # enrolled and not revoked
    snapshot: Snapshot  # the account version and connected devices this view is as of

    @property
    def connected(self) -> frozenset[str]:
        """Ids of the devices whose socket a live process holds."""
        return self.snapshot.connected


class AccountCache:
    """Users with their devices and presence, as this process last saw them."""

    def __init__(
        self, db: async_sessionmaker[AsyncSession], presence: Presence, clock: Clock
    ) -> None:
        self._db = db
        self._presence = presence
        # Emails never change owner (accounts are not deleted or renamed), so this mapping
        # needs no version.
        self._user_ids: TtlCache[str, str] = TtlCache(clock, ttl=3600.0, max_entries=MAX_ENTRIES)
        self._entries: TtlCache[str, Recipient] = TtlCache(
            clock, ttl=ENTRY_SECONDS, max_entries=MAX_ENTRIES
        )

    def cached(self, email: str) -> Recipient | None:
        """What this process last saw of the user with this (normalised) email, asking
        nobody; an approval created with it is checked in the create step."""
        user_id = self._user_ids.get(email)
        return self._entries.get(user_id) if user_id is not None else None

    async def by_email(self, email: str) -> Recipient | None:
        """The user with this (normalised) email, read now; None if there is none."""
        user_id = self._user_ids.get(email)
        if user_id is None:
            async with self._db() as db:
                user = await get_user_by_email(db, email)
                if user is None:
                    return None  # not cached: a registration must be seen at once
                devices = tuple(await list_active_devices(db, user.id))
            self._user_ids.put(email, user.id)
            # Read after the devices, so it cannot vouch for them: not cached this time.
            return Recipient(user, devices, await self._presence.snapshot(user.id))
        snapshot = await self._presence.snapshot(user_id)
        return await self._as_of(user_id, snapshot, self._entries.get(user_id))

    async def refreshed(self, recipient: Recipient, snapshot: Snapshot) -> Recipient | None:
        """`recipient` as of `snapshot` (what the create step found): the user and devices
        are read again when the account changed."""
        return await self._as_of(recipient.user.id, snapshot, recipient)

    async def for_user(self, user: User) -> Recipient:
        """`user` (just read by the caller) with their devices and who is connected."""
        snapshot = await self._presence.snapshot(user.id)
        entry = self._entries.get(user.id)
        if entry is not None and entry.snapshot.account_version == snapshot.account_version:
            return Recipient(user, entry.devices, snapshot)
        async with self._db() as db:
            devices = tuple(await list_active_devices(db, user.id))
        return Recipient(user, devices, snapshot)

    async def _as_of(
        self, user_id: str, snapshot: Snapshot, known: Recipient | None
    ) -> Recipient | None:
        if known is not None and known.snapshot.account_version == snapshot.account_version:
            fresh = Recipient(known.user, known.devices, snapshot)
        else:
            # The version was read before these rows, so it can vouch for them.
            async with self._db() as db:
                user = await db.get(User, user_id)
                if user is None:
                    return None
                devices = tuple(await list_active_devices(db, user_id))
            fresh = Recipient(user, devices, snapshot)
        self._entries.put(user_id, fresh)
        return fresh
