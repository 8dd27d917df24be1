"""One delivery attempt, by push or SMS: timed, an adapter's crash taken as a transient
failure, counted in the metrics, written to the audit log and logged in one line, and
answered with when to try again (app.delivery.retry)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from sqlmodel.ext.asyncio.session import AsyncSession

from app import metrics
from app.approval.model import PendingApproval
from app.db import audit
from app.delivery.push import PushResult
from app.delivery.retry import PUSH_RETRY_BASE, PUSH_RETRY_CAP, next_attempt_at
from app.services import Services
from app.store.presence import account_changed

log = logging.getLogger(__name__)

# Called with the audit session when the provider says the address is dead (a push token,
# a phone number): forgets it in the same commit; True when the user's account changed.
ForgetAddress = Callable[[AsyncSession, PushResult], Awaitable[bool]]


@dataclass(frozen=True)
class Attempted:
    """How an attempt went, and when to try again (None: not again)."""

    result: PushResult
    retry_at: float | None


@dataclass(frozen=True)
class Attempt:
    """What is being tried: attempt `number` (0 for the first) by `channel`, for `approval`."""

    approval: PendingApproval
    channel: str
    number: int
    deadline: float  # no retry at or after this
    device_id: str | None = None
    detail: Mapping[str, object] | None = None  # more for the audit detail


async def attempt(
    svc: Services,
    what: Attempt,
    send: Callable[[], Awaitable[PushResult]],
    forget_address: ForgetAddress | None = None,
) -> Attempted:
    """Make one attempt with `send`, and record it (metrics, audit, one log line)."""
    started = time.perf_counter()
    failure: Exception | None = None
    try:
        result = await send()
    except Exception as exc:  # an adapter bug must not lose the message: retry like a timeout
        failure = exc
        result = PushResult("retry", detail=f"error: {type(exc).__name__}")
    latency = result.latency or (time.perf_counter() - started)
    account_moved = await _record(svc, what, result, latency, forget_address)
    _log(what, result, latency, failure)
    if account_moved:
        await account_changed(svc.redis, svc.keys, what.approval.user_id)
    retry_at = None
    if result.outcome == "retry":
        retry_at = next_attempt_at(
            svc.clock.now(),
            what.number,
            what.deadline,
            base=PUSH_RETRY_BASE,
            cap=PUSH_RETRY_CAP,
            retry_after=result.retry_after,
        )
    return Attempted(result, retry_at)


async def _record(
    svc: Services,
    what: Attempt,
    result: PushResult,
    latency: float,
    forget_address: ForgetAddress | None,
) -> bool:
    """Metrics and the audit row; a dead address is forgotten in the same commit."""
    metrics.DELIVERY_ATTEMPTS.labels(what.channel, result.outcome).inc()
    metrics.DELIVERY_LATENCY.labels(what.channel).observe(latency)
    detail = {
        "channel": what.channel,
        "outcome": result.outcome,
        "attempt": what.number + 1,
        "latency_ms": round(latency * 1000, 1),
        "detail": result.detail[:200],
        **(what.detail or {}),
    }
    moved = False
    async with svc.db() as db:
        await audit.record(
            db,
            "delivery.attempt",
            user_id=what.approval.user_id,
            device_id=what.device_id,
            approval_id=what.approval.id,
            detail=detail,
            now=svc.clock.now(),
        )
        if result.outcome == "invalid_token" and forget_address is not None:
            moved = await forget_address(db, result)
        await db.commit()
    return moved


def _log(what: Attempt, result: PushResult, latency: float, failure: Exception | None) -> None:
    to = f" to device {what.device_id}" if what.device_id else ""
    log.log(
        logging.INFO if result.outcome == "accepted" else logging.WARNING,
        "delivery of approval %s by %s%s: %s (attempt %d, %.0f ms) %s",
        what.approval.id,
        what.channel,
        to,
        result.outcome,
        what.number + 1,
        latency * 1000,
        result.detail[:200],
        exc_info=failure,
        extra={
            "approval_id": what.approval.id,
            "request_id": what.approval.request_id,  # the sign-in's, so one id follows it
            "device_id": what.device_id,
            "channel": what.channel,
            "outcome": result.outcome,
            "attempt": what.number + 1,
            "latency_ms": round(latency * 1000, 1),
        },
    )
