"""Security notices to the account owner, queued through the outbox in the caller's transaction.

Each returns the queued message: the caller commits, then `outbox.kick`s it (a caller without
Redis, like the CLI, leaves it to the dispatcher, which publishes queued rows every second).
"""

from __future__ import annotations

from typing import Literal

from sqlmodel.ext.asyncio.session import AsyncSession

from app.approval.model import ApprovalContext, PendingApproval
from app.core.clock import rfc3339
from app.db.models import Device, OutboxMessage, User
from app.delivery import outbox
from app.settings import Settings

NOTICE_TTL = 24 * 3600

# How the owner got back into an account after losing every device (app.core.enrollment's
# `recovery` and `operator` codes); a recovery code will be the next way.
RecoveryMethod = Literal["sms", "operator"]


def _notice(
    settings: Settings,
    db: AsyncSession,
    user: User,
    template: str,
    payload: dict[str, object],
    now: float,
) -> OutboxMessage:
    return outbox.enqueue(
        db,
        channel="email",
        recipient=user.email,
        template=template,
        payload={**payload, "at": rfc3339(now), "account_url": f"{settings.public_url}/account"},
        user_id=user.id,
        now=now,
        ttl=NOTICE_TTL,
    )


def _where(context: ApprovalContext | None) -> dict[str, object]:
    """Where a change came from: IP, and the browser (or app) and OS its user agent names."""
    if context is None:
        return {"ip": "", "browser": "", "os": ""}
    return {"ip": context.ip, "browser": context.browser, "os": context.os}


def device_added(
    settings: Settings,
    db: AsyncSession,
    user: User,
    device: Device,
    *,
    context: ApprovalContext,
    now: float,
) -> OutboxMessage:
    """'A device was added to your account; not you? revoke it' (NIST SP 800-63B-4 §4.1.2),
    with where the enrolling request came from."""
    payload: dict[str, object] = {"device_name": device.name, "platform": device.platform}
    return _notice(settings, db, user, "device_added", {**payload, **_where(context)}, now)


def fraud_reported(
    settings: Settings, db: AsyncSession, user: User, approval: PendingApproval, now: float
) -> OutboxMessage:
    """'A suspicious sign-in was reported from your phone; sign-in is locked.'"""
    return _notice(settings, db, user, "fraud_reported", _where(approval.context), now)


def account_recovery(
    settings: Settings,
    db: AsyncSession,
    user: User,
    *,
    method: RecoveryMethod,
    context: ApprovalContext | None = None,
    revoked_devices: int = 0,
    now: float,
) -> OutboxMessage:
    """'A way back into your account was used': a sign-in with an SMS code is adding a device,
    or an operator issued a reset link (and revoked `revoked_devices`)."""
    phone = user.phone or ""
    payload: dict[str, object] = {
        "method": method,
        # The last two digits are enough for the owner to recognise the number.
        "phone_ending": phone[-2:] if method == "sms" else "",
        "revoked_devices": revoked_devices,
    }
    return _notice(settings, db, user, "account_recovery", {**payload, **_where(context)}, now)
