"""Duo integrations in SQL: create (the skey is shown once and kept sealed), list, revoke,
and the live integration a request's ikey names, as each process last read it."""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.core.clock import Clock, to_datetime
from app.core.matching import MATCH_MODES, MatchMode, MatchPolicy
from app.core.tokens import new_id
from app.core.ttlcache import TtlCache
from app.db.accounts import AccountError, InvalidAccountData, normalize_email
from app.db.models import Integration
from app.server_keys import SealError, SecretBox

SEAL_PURPOSE = "duo-skey"
IKEY_PREFIX = "DI"
IKEY_LENGTH = 20
SKEY_LENGTH = 40
MAX_NAME = 100
# How long a revoked integration may still be accepted by a process that saw it live.
CACHE_SECONDS = 10.0
_IKEY_ALPHABET = string.ascii_uppercase + string.digits
_SKEY_ALPHABET = string.ascii_letters + string.digits
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}$")


class DuplicateIntegration(AccountError):
    """An integration with this name exists (or existed: names are not reused)."""

    code = "duplicate_integration"

    def __init__(self, name: str) -> None:
        super().__init__(f"an integration named {name!r} already exists")


class UnknownIntegration(AccountError, LookupError):
    """No live integration has this name."""

    code = "unknown_integration"

    def __init__(self, name: str) -> None:
        super().__init__(f"no live integration named {name!r}")


@dataclass(frozen=True)
class LiveIntegration:
    """A live integration as a request needs it: who it is, its skey, its policies."""

    id: str
    name: str
    ikey: str
    skey: str
    match: MatchPolicy
    username_domain: str | None
    allow_enroll: bool = False  # may call enroll / enroll_status (app.duo.enrollment)

    def email_for(self, username: str) -> str | None:
        """The tapprove user a Duo username names: itself if it is an address, else
        `username@<domain>` when the integration has a domain; None when it cannot be one."""
        name = username.strip()
        if "@" not in name and self.username_domain:
            name = f"{name}@{self.username_domain}"
        try:
            return normalize_email(name)
        except InvalidAccountData:
            return None


def new_ikey() -> str:
    """An integration key: `DI` and 18 random upper-case letters and digits."""
    tail = "".join(secrets.choice(_IKEY_ALPHABET) for _ in range(IKEY_LENGTH - 2))
    return IKEY_PREFIX + tail


def new_skey() -> str:
    """A secret key: 40 random letters and digits (about 238 bits)."""
    return "".join(secrets.choice(_SKEY_ALPHABET) for _ in range(SKEY_LENGTH))


def api_host(public_url: str) -> str:
    """The `host` a client is configured with: the public URL's host and port."""
    return urlsplit(public_url).netloc


def api_host_name(public_url: str) -> str:
    """The host name signatures are made over: lower case, without the port."""
    return (urlsplit(public_url).hostname or "").lower()


def _clean_name(name: str) -> str:
    clean = name.strip()
    if not clean or len(clean) > MAX_NAME or not clean.isprintable():
        raise InvalidAccountData("name", f"name must be 1 to {MAX_NAME} printable characters")
    return clean


def _clean_domain(domain: str | None) -> str | None:
    if domain is None:
        return None
    clean = domain.strip().lower().removeprefix("@")
    if not _DOMAIN.match(clean):
        raise InvalidAccountData("username_domain", f"not a domain name: {domain!r}")
    return clean


def _clean_mode(mode: str) -> MatchMode:
    for known in MATCH_MODES:
        if mode == known:
            return known
    raise InvalidAccountData("match_mode", f"match mode must be one of {', '.join(MATCH_MODES)}")


async def create_integration(
    session: AsyncSession,
    box: SecretBox,
    name: str,
    *,
    match_mode: str = "confirm",
    username_domain: str | None = None,
    allow_enroll: bool = False,
    now: float,
) -> tuple[Integration, str]:
    """A new integration: the row, and its skey in plain text (shown once, stored sealed)."""
    clean = _clean_name(name)
    mode = _clean_mode(match_mode)
    domain = _clean_domain(username_domain)
    existing = await session.exec(select(Integration).where(Integration.name == clean))
    if existing.first() is not None:
        raise DuplicateIntegration(clean)
    ikey, skey = new_ikey(), new_skey()
    row = Integration(
        id=new_id(),
        name=clean,
        ikey=ikey,
        skey_sealed=box.seal(skey.encode("ascii"), record=ikey),
        match_mode=mode,
        username_domain=domain,
        allow_enroll=allow_enroll,
        created_at=to_datetime(now),
    )
    session.add(row)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise DuplicateIntegration(clean) from exc
    return row, skey


async def list_integrations(session: AsyncSession) -> list[Integration]:
    """Every integration, revoked ones included, oldest first."""
    result = await session.exec(select(Integration).order_by(col(Integration.created_at)))
    return list(result.all())


async def revoke_integration(session: AsyncSession, name: str, now: float) -> Integration:
    """Revoke the live integration named `name`; serving processes refuse it within
    CACHE_SECONDS."""
    clean = name.strip()
    result = await session.exec(
        select(Integration).where(
            Integration.name == clean, col(Integration.revoked_at).is_(None)
        )
    )
    row = result.first()
    if row is None:
        raise UnknownIntegration(clean)
    row.revoked_at = to_datetime(now)
    session.add(row)
    await session.flush()
    return row


def opened(row: Integration, box: SecretBox) -> LiveIntegration:
    """The row with its skey unsealed; SealError when the server key is not the one it was
    sealed with (or the row was tampered with)."""
    skey = box.open(row.skey_sealed, record=row.ikey).decode("ascii")
    return LiveIntegration(
        id=row.id,
        name=row.name,
        ikey=row.ikey,
        skey=skey,
        match=MatchPolicy.for_mode(row.match_mode),
        username_domain=row.username_domain,
        allow_enroll=row.allow_enroll,
    )


class IntegrationDirectory:
    """Live integrations by ikey, as this process last read them (CACHE_SECONDS)."""

    def __init__(
        self, db: async_sessionmaker[AsyncSession], box: SecretBox, clock: Clock
    ) -> None:
        self._db = db
        self._box = box
        # Unknown ikeys are remembered too (as `(None,)`), so a flood of made-up ones costs
        # one query each.
        self._cache: TtlCache[str, tuple[LiveIntegration | None]] = TtlCache(
            clock, ttl=CACHE_SECONDS, max_entries=10_000
        )

    async def by_ikey(self, ikey: str) -> LiveIntegration | None:
        """The live integration with this ikey, or None (unknown, revoked, or unreadable)."""
        if len(ikey) != IKEY_LENGTH or not ikey.isascii() or not ikey.isalnum():
            return None
        cached = self._cache.get(ikey)
        if cached is not None:
            return cached[0]
        async with self._db() as db:
            result = await db.exec(
                select(Integration).where(
                    Integration.ikey == ikey, col(Integration.revoked_at).is_(None)
                )
            )
            row = result.first()
        found: LiveIntegration | None = None
        if row is not None:
            try:
                found = opened(row, self._box)
            except SealError:
                found = None  # logged by the caller as a refused signature
        self._cache.put(ikey, (found,))
        return found
