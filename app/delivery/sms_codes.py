"""SMS one-time codes for a sign-in: sent when no device can be reached (or when the browser
asks), typed into the browser, approving the sign-in without the phone app
(app.approval.login checks them).

Codes live in the one-time code store (app.store.codes) under the approval's id: only a
hash of the live code, valid 10 minutes at most and never past the approval's end.
Attempts carry over from one code to the next: asking for a new code does not buy more
guesses.
"""

from __future__ import annotations

import logging
from functools import partial

from sqlmodel.ext.asyncio.session import AsyncSession

from app.approval.model import PendingApproval, Status
from app.approval.rules import keep_seconds
from app.core.tokens import new_numeric_code
from app.db import audit
from app.db.models import User
from app.delivery.attempts import Attempt, attempt
from app.delivery.push import PushResult
from app.services import Services
from app.store.jobs import Job

log = logging.getLogger(__name__)

CODE_PURPOSE = "sms-login"
CODE_DIGITS = 6
CODE_LIFE = 600


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
    The browser's explicit request (`POST /api/login/<id>/sms`) is limited by its use case.
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
    if automatic and not await svc.approvals.claim_sms_fallback(approval.id):
        return False
    await svc.jobs.enqueue(
        "sms",
        {"approval_id": approval.id, "automatic": automatic},
        shard=svc.approvals.shard_for(approval.user_id),
    )
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
    await svc.codes.issue(
        CODE_PURPOSE,
        approval.id,
        code,
        life=min(approval.expires_at, now + CODE_LIFE) - now,
        keep=keep_seconds(approval, now),
        fresh_attempts=False,
    )
    body = f"Your tapprove sign-in code is {code}. Never share it with anyone."
    detail = {"automatic": bool(job.payload.get("automatic"))}
    attempted = await attempt(
        svc,
        Attempt(approval, "sms", job.attempt, approval.expires_at, detail=detail),
        partial(sender.send, phone, body),
        partial(_forget_phone, svc, approval.user_id, phone),
    )
    if attempted.result.outcome == "accepted":
        await svc.approvals.mark_delivered(approval.id, "sms")
    elif attempted.retry_at is not None:
        await svc.jobs.enqueue(
            "sms", job.payload, shard=job.shard, run_at=attempted.retry_at, attempt=job.attempt + 1
        )


async def _forget_phone(
    svc: Services, user_id: str, phone: str, db: AsyncSession, result: PushResult
) -> bool:
    """The provider says this number can never get our texts: stop counting it verified."""
    user = await db.get(User, user_id)
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
    return False  # the account cache does not hold the phone
