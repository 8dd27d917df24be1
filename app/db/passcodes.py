"""The passcode columns of the device table: sealed seeds, their confirmation, the last step
used. Each change is one conditional UPDATE, so racing requests see one winner."""

from __future__ import annotations

from sqlalchemy import or_, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.core.clock import to_datetime
from app.db.models import Device


async def keep_seed(session: AsyncSession, device_id: str, sealed: str) -> str | None:
    """Give a device that has no seed this one; the sealed seed it holds afterwards (its own
    if another connection gave it one first), None for a revoked or unknown device."""
    await session.exec(
        update(Device)
        .where(
            col(Device.id) == device_id,
            col(Device.passcode_seed).is_(None),
            col(Device.revoked_at).is_(None),
        )
        .values(passcode_seed=sealed)
        .execution_options(synchronize_session=False)
    )
    result = await session.exec(
        select(Device.passcode_seed).where(
            Device.id == device_id,
            Device.revoked_at == None,  # noqa: E711
        )
    )
    return result.first()


async def unconfirmed_seed(session: AsyncSession, device_id: str) -> tuple[bool, str | None]:
    """Whether the device still has to confirm a seed, and the sealed seed (None: none yet)."""
    result = await session.exec(
        select(Device.passcode_confirmed_at, Device.passcode_seed).where(Device.id == device_id)
    )
    row = result.first()
    if row is None:
        return False, None
    confirmed_at, sealed = row
    return confirmed_at is None, sealed


async def confirm_seed(session: AsyncSession, device_id: str, *, now: float) -> bool:
    """The device says it keeps its seed: stop offering it. True the first time."""
    result = await session.exec(
        update(Device)
        .where(
            col(Device.id) == device_id,
            col(Device.passcode_seed).is_not(None),
            col(Device.passcode_confirmed_at).is_(None),
        )
        .values(passcode_confirmed_at=to_datetime(now))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)


async def live_seeds(session: AsyncSession, user_id: str) -> list[tuple[str, str, int | None]]:
    """(device id, sealed seed, last step used) of the user's unrevoked devices with a seed."""
    result = await session.exec(
        select(Device.id, Device.passcode_seed, Device.passcode_last_step).where(
            Device.user_id == user_id,
            Device.revoked_at == None,  # noqa: E711
            Device.passcode_seed != None,  # noqa: E711
        )
    )
    return [(device_id, sealed, step) for device_id, sealed, step in result.all() if sealed]


async def claim_step(session: AsyncSession, device_id: str, step: int) -> bool:
    """Record `step` as the device's last used one, if it is later than the last; True if
    this call did (of two uses of one code, exactly one)."""
    result = await session.exec(
        update(Device)
        .where(
            col(Device.id) == device_id,
            col(Device.revoked_at).is_(None),
            or_(col(Device.passcode_last_step).is_(None), col(Device.passcode_last_step) < step),
        )
        .values(passcode_last_step=step)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)
