"""SMS one-time codes: the fallback when no device can be reached, entered in the browser."""

from __future__ import annotations

import logging
import time

from app import metrics
from app.core.approvals import PendingApproval, Status
from app.core.tokens import hash_token, new_numeric_code, same_secret
from app.db import audit
from app.db.models import User
from app.services import Services

log = logging.getLogger(__name__)

CODE_DIGITS = 6
CODE_LIFE = 600
MAX_CODE_ATTEMPTS = 5


async def send_fallback_code(
    svc: Services, approval: PendingApproval, *, asked: bool = False
) -> bool:
    """Text a 6-digit code for `approval` to the user's verified phone; True if one was sent.

    Without `asked` (the automatic fallback) the user's `sms_fallback` switch must be on, and
    at most one code goes out per approval.
    """
    if svc.providers.sms is None or approval.status is not Status.PENDING:
        return False
    async with svc.db() as db:
        user = await db.get(User, approval.user_id)
    if user is None or not user.phone or not user.phone_verified:
        return False
    if not asked and not user.sms_fallback:
        return False
    key = svc.keys.approval(approval.id)
    if not asked and not await svc.redis.hsetnx(key, "sms_auto", "1"):
        return False
    code = new_numeric_code(CODE_DIGITS)
    now = svc.clock.now()
    await svc.redis.hset(
        key,
        mapping={
            "sms_code": hash_token(f"{approval.id}:{code}"),
            "sms_attempts": 0,
            "sms_expires_at": repr(min(approval.expires_at, now + CODE_LIFE)),
        },
    )
    started = time.perf_counter()
    result = await svc.providers.sms.send(
        user.phone, f"Your tapprove sign-in code is {code}. Never share it with anyone."
    )
    latency = result.latency or (time.perf_counter() - started)
    metrics.DELIVERY_ATTEMPTS.labels("sms", result.outcome).inc()
    metrics.DELIVERY_LATENCY.labels("sms").observe(latency)
    async with svc.db() as db:
        await audit.record(
            db,
            "delivery.attempt",
            user_id=user.id,
            approval_id=approval.id,
            detail={
                "channel": "sms",
                "outcome": result.outcome,
                "latency_ms": round(latency * 1000, 1),
            },
            now=svc.clock.now(),
        )
        await db.commit()
    if result.outcome != "accepted":
        return False
    await svc.approvals.mark_sent(approval.id, "sms")
    import orjson

    await svc.approvals.mark_delivered(
        approval.id, "sms", orjson.dumps({"type": "delivered", "channel": "sms"})
    )
    return True


async def check_code(svc: Services, approval: PendingApproval, code: str) -> bool:
    """True if `code` is the live SMS code of `approval`; 5 wrong codes deny the approval."""
    key = svc.keys.approval(approval.id)
    stored, expires_at = await svc.redis.hmget(key, ["sms_code", "sms_expires_at"])
    attempts = await svc.redis.hincrby(key, "sms_attempts", 1)
    fresh = stored is not None and float(expires_at or 0) > svc.clock.now()
    right = fresh and same_secret(hash_token(f"{approval.id}:{code}"), str(stored))
    if right and attempts <= MAX_CODE_ATTEMPTS:
        return True
    if attempts >= MAX_CODE_ATTEMPTS:
        await svc.approvals.decide(approval.id, Status.DENIED, reason="too_many_codes")
    return False
