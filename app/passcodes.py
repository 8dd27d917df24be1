"""Offline passcodes: seeds for devices, and a typed code approving a pending approval.

A device gets its seed at enrollment (in the `POST /api/devices` answer) or, if it was
enrolled before passcodes existed, over its socket until it confirms it
(docs/protocol.md §3.6). Seeds are kept sealed with the server key (app.server_keys,
purpose "totp-seed", bound to the device id).

A code approves the approval it is typed for, like an answer from the phone, from the
browser (`POST /api/login/<id>/passcode`) or a relying party
(`POST /api/v1/approvals/<id>/passcode`); a Duo integration's `factor=passcode` checks one
with no approval (app.duo.approvals), in the same budget. Wrong codes are limited twice:
MAX_PER_APPROVAL on one approval (the last denies it, which counts toward the push-fatigue
backoff like a wrong number), and MAX_PER_USER in USER_WINDOW across approvals and callers.
The answer never says which device a code was for, or whether the user has one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.approval.errors import InvalidPasscode, TooManyPasscodes
from app.approval.login import end_by_passcode
from app.approval.model import PendingApproval
from app.core import passcodes
from app.db import passcodes as stored
from app.server_keys import SealError, SecretBox
from app.services import Services

log = logging.getLogger(__name__)

SEED_PURPOSE = "totp-seed"
MAX_PER_APPROVAL = 5
MAX_PER_USER = 10
USER_WINDOW = 15 * 60


def _box(svc: Services) -> SecretBox:
    return svc.secret_box(SEED_PURPOSE)


def new_device_seed(svc: Services, device_id: str) -> tuple[str, dict[str, object]]:
    """A seed for a device being enrolled: its sealed form to store, and what the device
    is given."""
    seed = passcodes.new_seed()
    return _box(svc).seal(seed, record=device_id), passcodes.seed_json(seed)


async def seed_to_deliver(svc: Services, device_id: str) -> dict[str, object] | None:
    """The seed a connecting device has not confirmed yet (one is made if it has none), or
    None when it has confirmed one."""
    async with svc.db() as db:
        unconfirmed, sealed = await stored.unconfirmed_seed(db, device_id)
        if not unconfirmed:
            return None
        if sealed is None:
            fresh = passcodes.new_seed()
            sealed = await stored.keep_seed(
                db, device_id, _box(svc).seal(fresh, record=device_id)
            )
            await db.commit()
            if sealed is None:
                return None  # revoked meanwhile
    try:
        return passcodes.seed_json(_box(svc).open(sealed, record=device_id))
    except SealError:
        log.error("the passcode seed of device %s does not open", device_id)
        return None


async def seed_confirmed(svc: Services, device_id: str) -> None:
    """The device keeps its seed: it is not offered again."""
    async with svc.db() as db:
        await stored.confirm_seed(db, device_id, now=svc.clock.now())
        await db.commit()


async def device_for_code(svc: Services, user_id: str, typed: str) -> str | None:
    """The device of the user whose code `typed` is now (its time step is used up by this
    call), or None. Every live seed is tried, so the time taken does not depend on which
    device, if any, it was."""
    code = passcodes.normalize(typed)
    now = svc.clock.now()
    async with svc.db() as db:
        seeds = await stored.live_seeds(db, user_id)
        matches: list[tuple[str, int]] = []
        for device_id, sealed, last_used in seeds:
            try:
                seed = _box(svc).open(sealed, record=device_id)
            except SealError:
                log.error("the passcode seed of device %s does not open", device_id)
                continue
            step = passcodes.matching_step(seed, code or "", now, last_used=last_used)
            if step is not None and code is not None:
                matches.append((device_id, step))
        for device_id, step in matches:
            if await stored.claim_step(db, device_id, step):
                await db.commit()
                return device_id
    return None


@dataclass(frozen=True)
class PasscodeCheck:
    """How one typed code went: right or not, and the device whose passcode it was (None
    when `also`, the caller's other kind of code, took it)."""

    right: bool
    device_id: str | None = None


async def check_passcode(
    svc: Services,
    user_id: str,
    typed: str,
    *,
    also: Callable[[], Awaitable[bool]] | None = None,
) -> PasscodeCheck:
    """Check a code the user typed against their devices' passcodes, and then `also` (a
    caller's other code, e.g. one texted to them), within their budget of wrong codes:
    TooManyPasscodes past MAX_PER_USER in USER_WINDOW; a wrong code spends one."""
    user_budget = svc.limits.user_key(user_id, "passcode", "user", user_id)
    verdict = await svc.limits.hit(user_budget, limit=MAX_PER_USER, window=USER_WINDOW)
    if not verdict.allowed:
        raise TooManyPasscodes(verdict.retry_after)
    device_id = await device_for_code(svc, user_id, typed)
    if device_id is not None or (also is not None and await also()):
        await svc.limits.refund(user_budget)  # only wrong codes spend the budget
        return PasscodeCheck(right=True, device_id=device_id)
    return PasscodeCheck(right=False)


async def approve_with_passcode(
    svc: Services, approval: PendingApproval, typed: str, *, ip: str
) -> None:
    """Approve a pending approval with a passcode, or refuse: TooManyPasscodes past the
    user's budget, InvalidPasscode (denied when it was the approval's last try), Expired /
    AlreadyDecided when it had already ended."""
    checked = await check_passcode(svc, approval.user_id, typed)
    if checked.right and checked.device_id is not None:
        await end_by_passcode(svc, approval, device_id=checked.device_id, ip=ip)
        return
    # The approval's own tries, counted before this one ends it: the last wrong one denies.
    tries = await svc.limits.hit(
        svc.limits.user_key(approval.user_id, "passcode", "approval", approval.id),
        limit=MAX_PER_APPROVAL - 1,
        window=max(60, int(approval.expires_at - svc.clock.now()) + 60),
    )
    if tries.allowed:
        raise InvalidPasscode()
    await end_by_passcode(svc, approval, device_id=None, ip=ip)
    raise InvalidPasscode(denied=True)
