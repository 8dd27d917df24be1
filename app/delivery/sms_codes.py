"""SMS one-time codes for a sign-in: sent when no device can be reached (or when the browser
asks), typed into the browser, approving the sign-in without the phone app.

Only a hash of the live code is kept, on the approval's Redis hash (`sms_code`,
`sms_expires_at`, `sms_attempts`), so it ends with the approval. Attempts are counted per
approval, not per code: asking for a new code does not buy five more guesses.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from app.core.approvals import PendingApproval, Status
from app.core.tokens import hash_token, new_numeric_code, same_secret
from app.db import audit
from app.db.models import User
from app.delivery.push import PushResult, observe_attempt
from app.delivery.retry import PUSH_RETRY_BASE, PUSH_RETRY_CAP, next_attempt_at
from app.services import Services
from app.store.jobs import Job

log = logging.getLogger(__name__)

CODE_DIGITS = 6
CODE_LIFE = 600
MAX_CODE_ATTEMPTS = 5

CodeCheck = Literal["right", "wrong", "denied"]


def _code_hash(approval_id: str, code: str) -> str:
    # The approval id (128 random bits) keeps equal codes of two approvals apart.
    return hash_token(f"{approval_id}:{code}")


async def sms_phone(svc: Services, user_id: str) -> str | None:
    """The number to text a sign-in code to: verified, SMS allowed, and a sender configured."""
    if svc.providers.sms is None:
        return None
    async with svc.db() as db:
        user = await db.get(User, user_id)
    if user is None or not user.phone or not user.phone_verified or not user.sms_fallback:
        return None
    return user.phone


async def request_code(svc: Services, approval: PendingApproval, *, automatic: bool) -> bool:
    """Queue an SMS code for a pending approval; True if one will go out.

    `automatic` is the fallback when no device could be reached: at most one per approval.
    The browser's explicit request (`POST /api/login/<id>/sms`) is limited by its route.
    Either way the user must have a verified phone and SMS allowed (`sms_fallback`): someone
    who turned SMS off has said a SIM swap must not be enough to sign in. Only sign-ins get
    codes: a relying party's approval has no browser to type one into.
    """
    if approval.kind != "login" or approval.status is not Status.PENDING:
        return False
    if approval.expires_at <= svc.clock.now():
        return False
    if await sms_phone(svc, approval.user_id) is None:
        return False
    if automatic and not await svc.redis.hsetnx(svc.keys.approval(approval.id), "sms_auto", "1"):
        return False
    await svc.jobs.enqueue("sms", {"approval_id": approval.id, "automatic": automatic})
    await svc.approvals.mark_sent(approval.id, "sms")
    return True


async def send_code(svc: Services, job: Job) -> None:
    """Job `sms`: draw a fresh code, keep its hash, text it; retried until the approval ends."""
    approval = await svc.approvals.get(job.payload["approval_id"])
    now = svc.clock.now()
    if approval is None or approval.status is not Status.PENDING or approval.expires_at <= now:
        return
    phone = await sms_phone(svc, approval.user_id)
    sender = svc.providers.sms
    if phone is None or sender is None:
        return
    code = new_numeric_code(CODE_DIGITS)
    key = svc.keys.approval(approval.id)
    await svc.redis.hset(
        key,
        mapping={
            "sms_code": _code_hash(approval.id, code),
            "sms_expires_at": repr(min(approval.expires_at, now + CODE_LIFE)),
        },
    )
    body = f"Your tapprove sign-in code is {code}. Never share it with anyone."
    started = time.perf_counter()
    try:
        result = await sender.send(phone, body)
    except Exception as exc:  # an adapter bug must not lose the code: retry like a timeout
        log.exception(
            "sms sender failed",
            extra={"approval_id": approval.id, "request_id": approval.request_id},
        )
        result = PushResult("retry", detail=f"error: {type(exc).__name__}")
    latency = result.latency or (time.perf_counter() - started)
    detail = observe_attempt("sms", result, attempt=job.attempt, latency=latency)
    detail["automatic"] = bool(job.payload.get("automatic"))
    async with svc.db() as db:
        await audit.record(
            db,
            "delivery.attempt",
            user_id=approval.user_id,
            approval_id=approval.id,
            detail=detail,
            now=svc.clock.now(),
        )
        if result.outcome == "invalid_token":
            # The provider says this number can never get our texts: stop counting it verified.
            user = await db.get(User, approval.user_id)
            if user is not None and user.phone == phone:
                user.phone_verified = False
                db.add(user)
                await audit.record(
                    db,
                    "phone.unreachable",
                    user_id=user.id,
                    detail={"detail": result.detail[:200]},
                    now=svc.clock.now(),
                )
        await db.commit()
    log.log(
        logging.INFO if result.outcome == "accepted" else logging.WARNING,
        "delivery of approval %s by sms: %s (attempt %d, %.0f ms) %s",
        approval.id,
        result.outcome,
        job.attempt + 1,
        latency * 1000,
        result.detail[:200],
        extra={
            "approval_id": approval.id,
            "request_id": approval.request_id,
            "channel": "sms",
            "outcome": result.outcome,
            "attempt": job.attempt + 1,
            "latency_ms": round(latency * 1000, 1),
        },
    )
    if result.outcome == "accepted":
        await svc.approvals.mark_delivered(approval.id, "sms", delivered_event("sms"))
        return
    if result.outcome == "retry":
        at = next_attempt_at(
            svc.clock.now(),
            job.attempt,
            approval.expires_at,
            base=PUSH_RETRY_BASE,
            cap=PUSH_RETRY_CAP,
            retry_after=result.retry_after,
        )
        if at is not None:
            await svc.jobs.enqueue("sms", job.payload, run_at=at, attempt=job.attempt + 1)


def delivered_event(channel: str) -> bytes:
    """The browser stream's `delivered` event for `channel`."""
    return b'{"type":"delivered","channel":"' + channel.encode("ascii") + b'"}'


async def check_code(svc: Services, approval: PendingApproval, code: str) -> CodeCheck:
    """Whether `code` is the live SMS code of `approval`; the fifth wrong code denies it."""
    key = svc.keys.approval(approval.id)
    async with svc.redis.pipeline(transaction=True) as pipe:
        pipe.hincrby(key, "sms_attempts", 1)
        pipe.hmget(key, ["sms_code", "sms_expires_at"])
        attempts, (stored, expires_at) = await pipe.execute()
    fresh = stored is not None and float(expires_at or 0) > svc.clock.now()
    if (
        fresh
        and attempts <= MAX_CODE_ATTEMPTS
        and same_secret(_code_hash(approval.id, code), str(stored))
    ):
        return "right"
    if attempts < MAX_CODE_ATTEMPTS:
        return "wrong"
    audit_line = audit.line(
        "approval.decided",
        user_id=approval.user_id,
        approval_id=approval.id,
        detail={"status": "denied", "reason": "too_many_codes", "via": "sms_code"},
        now=svc.clock.now(),
    )
    await svc.approvals.decide(
        approval.id, Status.DENIED, audit_line=audit_line, reason="too_many_codes"
    )
    return "denied"
