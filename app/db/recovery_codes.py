"""A user's recovery codes in the database: replace the set, list the unused ones, use one."""

from __future__ import annotations

from sqlalchemy import delete, func, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.core.clock import to_datetime
from app.core.tokens import b64url, new_id
from app.db.models import RecoveryCode, User


async def replace_codes(
    session: AsyncSession, user_id: str, salt: bytes, hashes: list[bytes], *, now: float
) -> None:
    """Make `hashes` the user's codes (the old set stops working at once), and remember
    that the account has a second factor (docs/enrollment.md)."""
    at = to_datetime(now)
    await session.exec(delete(RecoveryCode).where(col(RecoveryCode.user_id) == user_id))
    for code_hash in hashes:
        session.add(
            RecoveryCode(
                id=new_id(),
                user_id=user_id,
                salt=b64url(salt),
                code_hash=b64url(code_hash),
                created_at=at,
            )
        )
    await session.exec(
        update(User)
        .where(col(User.id) == user_id)
        .values(second_factor_at=func.coalesce(col(User.second_factor_at), at))
        .execution_options(synchronize_session=False)
    )


async def unused_codes(session: AsyncSession, user_id: str) -> list[RecoveryCode]:
    """The user's codes not used yet."""
    result = await session.exec(
        select(RecoveryCode).where(
            RecoveryCode.user_id == user_id,
            RecoveryCode.used_at == None,  # noqa: E711
        )
    )
    return list(result.all())


async def use_code(session: AsyncSession, code_id: str, *, now: float) -> bool:
    """Mark a code used; True if this call did (of two uses at once, exactly one)."""
    result = await session.exec(
        update(RecoveryCode)
        .where(col(RecoveryCode.id) == code_id, col(RecoveryCode.used_at).is_(None))
        .values(used_at=to_datetime(now))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)


async def codes_left(session: AsyncSession, user_id: str) -> int:
    """How many of the user's codes are still unused."""
    result = await session.exec(
        select(func.count())
        .select_from(RecoveryCode)
        .where(col(RecoveryCode.user_id) == user_id, col(RecoveryCode.used_at).is_(None))
    )
    return int(result.one())
