"""A device answers: its signed decision, checked and applied. One path, over HTTP or the
phone's socket alike: one read of the approval, the signature checked here (ES256, the
device's key parsed once per process), the pure rule decides, and one script ends the
approval if it is still the pending approval that was read. A fraud report then locks the
user's new approvals."""

from __future__ import annotations

import logging
from typing import Protocol

from sqlmodel.ext.asyncio.session import AsyncSession

from app.approval.errors import BadSignature, NotFound, WrongNumber
from app.approval.model import PendingApproval, Status
from app.approval.rules import Outcome, answer_outcome, ended_error, require_pending
from app.core.clock import to_datetime
from app.core.signatures import (
    DecisionClaims,
    DecisionRejected,
    device_key,
    read_kid,
    verify_decision,
)
from app.db import audit
from app.db.models import User
from app.delivery import notices
from app.services import Services
from app.store.presence import account_changed

log = logging.getLogger(__name__)


class AnsweringDevice(Protocol):
    """What deciding needs of the device that answers (a Device row, or a socket's copy)."""

    @property
    def id(self) -> str: ...

    @property
    def user_id(self) -> str: ...

    @property
    def public_jwk(self) -> str: ...


async def decide(
    svc: Services, device: AnsweringDevice, approval_id: str, jws: str, *, ip: str
) -> Status:
    """Check a device's signed answer and, if it wins the race, end the approval with it.

    Raises BadSignature, NotFound (also for another user's approval), AlreadyDecided or
    Expired (someone answered first, or too late), and WrongNumber (the approval is then
    denied). Returns the status it ended with.
    """
    try:
        kid = read_kid(jws)
    except DecisionRejected as exc:
        raise BadSignature(exc.message) from None
    if kid != device.id:
        raise BadSignature("kid does not name this device")
    approval = await svc.approvals.get(approval_id)
    if approval is None or approval.user_id != device.user_id:
        raise NotFound()
    now = svc.clock.now()
    claims = _verified(jws, device, approval, now)
    require_pending(approval.status)
    outcome = answer_outcome(approval, claims)
    result = await svc.approvals.decide(
        approval,
        outcome,
        audit_line=_decided_line(device, approval.id, ip, outcome, now),
        decided_by=device.id,
    )
    if result.kind == "not_found":
        raise NotFound()
    if result.kind == "final":
        raise ended_error(result.status or Status.EXPIRED)
    await _after(svc, device, approval, outcome, ip, now)
    if outcome.reason == "wrong_number":
        raise WrongNumber()
    return outcome.status


def _verified(
    jws: str, device: AnsweringDevice, approval: PendingApproval, now: float
) -> DecisionClaims:
    try:
        key = device_key(device.public_jwk)
        return verify_decision(
            jws, key, approval_id=approval.id, challenge=approval.challenge, now=now
        )
    except DecisionRejected as exc:
        raise BadSignature(exc.message) from None


def _decided_line(
    device: AnsweringDevice, approval_id: str, ip: str, outcome: Outcome, now: float
) -> bytes:
    return audit.line(
        "approval.decided",
        user_id=device.user_id,
        device_id=device.id,
        approval_id=approval_id,
        ip=ip,
        detail={"status": outcome.status.value, "reason": outcome.reason},
        now=now,
    )


async def _after(
    svc: Services,
    device: AnsweringDevice,
    approval: PendingApproval,
    outcome: Outcome,
    ip: str,
    now: float,
) -> None:
    """After this device's answer ended the approval: log it, and lock on fraud."""
    status, reason = outcome.status.value, outcome.reason
    log.info(
        "approval %s %s by device %s%s",
        approval.id,
        status,
        device.id,
        f" ({reason})" if reason else "",
        extra={
            "approval_id": approval.id,
            "request_id": approval.request_id,
            "user_id": device.user_id,
            "device_id": device.id,
            "status": status,
            "reason": reason or None,
        },
    )
    if reason == "fraud":
        async with svc.db() as db:
            await _lock_after_fraud(svc, db, device.user_id, approval, ip, now)
            await db.commit()
        await account_changed(svc.redis, svc.keys, device.user_id)


async def _lock_after_fraud(
    svc: Services, db: AsyncSession, user_id: str, approval: PendingApproval, ip: str, now: float
) -> None:
    """A fraud report locks new approvals for the user until an operator unlocks them."""
    user = await db.get(User, user_id)
    if user is None:
        return
    user.locked = True
    user.locked_at = to_datetime(now)
    db.add(user)
    await audit.record(
        db,
        "user.locked",
        user_id=user_id,
        approval_id=approval.id,
        ip=ip,
        detail={
            "reason": "fraud_reported",
            "browser": approval.context.browser,
            "login_ip": approval.context.ip,
        },
        now=now,
    )
    notices.fraud_reported(svc.settings, db, user, approval, now)
    await svc.sessions.revoke_user(user_id)
