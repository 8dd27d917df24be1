"""Passkeys in the database: a user's list, lookup by credential id, the sign counter."""

from __future__ import annotations

from sqlalchemy import delete, func, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.core.clock import to_datetime
from app.db.models import Passkey


async def user_passkeys(session: AsyncSession, user_id: str) -> list[Passkey]:
    """The user's passkeys, oldest first."""
    result = await session.exec(
        select(Passkey).where(Passkey.user_id == user_id).order_by(col(Passkey.created_at))
    )
    return list(result.all())


async def has_passkey(session: AsyncSession, user_id: str) -> bool:
    """Whether the user has at least one passkey."""
    result = await session.exec(
        select(func.count()).select_from(Passkey).where(col(Passkey.user_id) == user_id)
    )
    return int(result.one()) > 0


async def by_credential_id(session: AsyncSession, credential_id: str) -> Passkey | None:
    """The passkey with this credential id (base64url), whoever owns it."""
    result = await session.exec(select(Passkey).where(Passkey.credential_id == credential_id))
    return result.first()


async def count_use(
    session: AsyncSession, passkey_id: str, *, seen: int, new: int, now: float
) -> bool:
    """Record a sign-in: the counter moves from `seen` to `new`; False if another sign-in
    moved it first (the caller refuses this one)."""
    result = await session.exec(
        update(Passkey)
        .where(col(Passkey.id) == passkey_id, col(Passkey.sign_count) == seen)
        .values(sign_count=new, last_used_at=to_datetime(now))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)


async def remove(session: AsyncSession, user_id: str, passkey_id: str) -> bool:
    """Delete one of the user's passkeys; False if they have none by that id."""
    result = await session.exec(
        delete(Passkey).where(col(Passkey.id) == passkey_id, col(Passkey.user_id) == user_id)
    )
    return bool(result.rowcount == 1)
