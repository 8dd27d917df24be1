"""Getting an approval request to the person: WebSocket first, push for phones that are
away or slow to acknowledge, SMS when nothing else can reach them. Also the expiry sweeper.

Every delivery that is under way for an approval holds a ticket in the Redis set
`approval:{id}:inflight`: one per push (kept across its retries) and one for the ack check of
connected phones. A delivery that ends without reaching anyone gives its ticket back; when
the last ticket comes back and no device acknowledged and no provider accepted, the SMS
fallback goes out (at most once per approval).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from redis.asyncio.client import Pipeline
from sqlmodel import col, select

from app.account_cache import Recipient
from app.core.approvals import PendingApproval, Status
from app.core.tokens import new_id
from app.db import audit
from app.db.accounts import active_devices
from app.db.models import Device
from app.delivery import sms_codes
from app.delivery.push import PushMessage, PushResult, observe_attempt
from app.delivery.retry import PUSH_RETRY_BASE, PUSH_RETRY_CAP, next_attempt_at
from app.services import Services
from app.store.approvals import FINAL_STATE_KEEP, Delivery
from app.store.jobs import Job, JobQueue
from app.store.presence import account_changed

log = logging.getLogger(__name__)

# A connected phone that has not acknowledged a request within this long also gets a push.
ACK_TIMEOUT = 3.0
# A push needs at least this much life left (FCM's TTL and APNs' expiration are in seconds).
MIN_PUSH_LIFE = 1.0


def log_fields(approval: PendingApproval, **more: object) -> dict[str, object]:
    """Structured log fields for a line about `approval`, under the request that started it."""
    return {"approval_id": approval.id, "request_id": approval.request_id, **more}


def _pushable(svc: Services, device: Device) -> bool:
    return bool(
        device.push_token and device.push_provider and svc.providers.push(device.push_provider)
    )


# --- tickets: which deliveries are still under way ----------------------------------------


def _open_ticket_in(pipe: Pipeline, svc: Services, approval: PendingApproval) -> str:
    """Register one delivery under way for `approval` (in the caller's pipeline); the set
    lives as long as the approval."""
    ticket = new_id()
    key = svc.keys.approval_inflight(approval.id)
    pipe.sadd(key, ticket)
    pipe.expire(key, max(1, int(approval.expires_at - svc.clock.now())) + FINAL_STATE_KEEP)
    return ticket


async def _close_ticket(svc: Services, approval: PendingApproval, ticket: str) -> bool:
    """End one delivery; True when it was the last under way and nothing reached anyone."""
    async with svc.redis.pipeline(transaction=True) as pipe:
        pipe.srem(svc.keys.approval_inflight(approval.id), ticket)
        pipe.scard(svc.keys.approval_inflight(approval.id))
        pipe.scard(svc.keys.approval_acks(approval.id))
        pipe.hget(svc.keys.approval(approval.id), "delivered")
        _, under_way, acked, delivered = await pipe.execute()
    return under_way == 0 and acked == 0 and not orjson.loads(delivered or "[]")


async def _finish(svc: Services, approval: PendingApproval, ticket: str | None) -> None:
    """One delivery ended; if it was the last and nobody was reached, the SMS fallback goes."""
    if ticket is None or not await _close_ticket(svc, approval, ticket):
        return
    latest = await svc.approvals.get(approval.id)
    if latest is not None and await sms_codes.request_code(svc, latest, automatic=True):
        log.info(
            "no device reached for approval %s; SMS fallback queued",
            approval.id,
            extra=log_fields(approval, channel="sms"),
        )


def _schedule_push_in(
    pipe: Pipeline, svc: Services, queue: JobQueue, approval: PendingApproval, device: Device
) -> None:
    ticket = _open_ticket_in(pipe, svc, approval)
    queue.enqueue_in(
        pipe, "push", {"approval_id": approval.id, "device_id": device.id, "ticket": ticket}
    )


async def _schedule_pushes(svc: Services, approval: PendingApproval, devices: list[Device]) -> None:
    """Push to `devices` now, and list their providers among the approval's channels."""
    if not devices:
        return
    queue = svc.jobs
    async with svc.redis.pipeline(transaction=True) as pipe:
        for device in devices:
            _schedule_push_in(pipe, svc, queue, approval, device)
        await pipe.execute()
    for provider in sorted({d.push_provider or "" for d in devices}):
        await svc.approvals.mark_sent(approval.id, provider)


# --- scheduling --------------------------------------------------------------------------


def plan(svc: Services, approval: PendingApproval, recipient: Recipient) -> Delivery:
    """Where a new approval goes, and the delivery work it starts with (stored with it in
    one atomic step). Sets `approval.channels`: `websocket` for connected phones, the push
    providers of the others. The work: a push now to each phone that is away and reachable
    by push, and for connected phones a check in 3 s that they acknowledged (their last
    ack cancels it)."""
    waiting = [d.id for d in recipient.devices if d.id in recipient.connected]
    away = [
        d for d in recipient.devices if d.id not in recipient.connected and _pushable(svc, d)
    ]
    approval.channels = ["websocket"] if waiting else []
    approval.channels += [p for p in ("fcm", "apns") if any(d.push_provider == p for d in away)]
    queue = svc.jobs
    delivery = Delivery()
    for device in away:
        ticket = new_id()
        delivery.tickets.append(ticket)
        delivery.jobs.append(
            queue.prepare(
                "push", {"approval_id": approval.id, "device_id": device.id, "ticket": ticket}
            )
        )
    if waiting:
        ticket = new_id()
        delivery.tickets.append(ticket)
        check = queue.prepare(
            "ack_check",
            {"approval_id": approval.id, "devices": waiting, "ticket": ticket},
            run_at=svc.clock.now() + ACK_TIMEOUT,
        )
        delivery.watch(check, ticket, waiting)
    return delivery


async def after_create(svc: Services, approval: PendingApproval, delivery: Delivery) -> None:
    """An approval that no socket or push can reach gets the SMS fallback at once.

    Never raises: a delivery problem must not fail the sign-in (the app can still fetch
    pending approvals). Adds `sms` to `approval.channels` when the code goes out.
    """
    if delivery.jobs:
        return
    try:
        if await sms_codes.request_code(svc, approval, automatic=True):
            approval.channels.append("sms")
    except Exception:
        log.exception(
            "could not schedule delivery of approval %s", approval.id, extra=log_fields(approval)
        )


async def resend(svc: Services, approval: PendingApproval) -> None:
    """Send a pending request again: over every socket, and by push to phones that did not ack."""
    await svc.events.publish(
        svc.keys.user_channel(approval.user_id),
        {"type": "approval_request", "approval": approval.device_json()},
    )
    acked = await svc.approvals.acked_devices(approval.id)
    silent = [
        d
        for d in await active_devices(svc.db, approval.user_id)
        if d.id not in acked and _pushable(svc, d)
    ]
    await _schedule_pushes(svc, approval, silent)
    pushed = [d.id for d in silent]
    async with svc.db() as db:
        await audit.record(
            db,
            "approval.resent",
            user_id=approval.user_id,
            approval_id=approval.id,
            detail={"pushed_devices": pushed},
            now=svc.clock.now(),
        )
        await db.commit()


# --- job handlers ------------------------------------------------------------------------


async def _ack_check(svc: Services, job: Job) -> None:
    """Job `ack_check`: connected phones that did not acknowledge get a push."""
    approval = await svc.approvals.get(job.payload["approval_id"])
    if approval is None or approval.status is not Status.PENDING:
        return
    acked = await svc.approvals.acked_devices(approval.id)
    silent = [d for d in job.payload.get("devices", []) if d not in acked]
    if silent:
        async with svc.db() as db:
            result = await db.exec(
                select(Device).where(
                    col(Device.id).in_(silent),
                    Device.revoked_at == None,  # noqa: E711
                )
            )
            devices = [d for d in result.all() if _pushable(svc, d)]
        for device in devices:
            log.info(
                "device %s did not ack approval %s in %.0f s; pushing",
                device.id,
                approval.id,
                ACK_TIMEOUT,
                extra=log_fields(approval, device_id=device.id),
            )
        await _schedule_pushes(svc, approval, devices)
    await _finish(svc, approval, job.payload.get("ticket"))


def push_text(approval: PendingApproval) -> tuple[str, str]:
    """Title and body of the notification: the browser and IP, nothing secret."""
    context = approval.context
    title = "Sign-in request" if approval.kind == "login" else "Approval request"
    return title, f"{context.browser} on {context.os} from {context.ip}. Tap to review."


async def _push(svc: Services, job: Job) -> None:
    """Job `push`: one attempt to one device; retried with backoff until the approval ends."""
    approval = await svc.approvals.get(job.payload["approval_id"])
    now = svc.clock.now()
    if approval is None or approval.status is not Status.PENDING or approval.expires_at <= now:
        return  # nothing is sent for an approval that has ended
    ticket: str | None = job.payload.get("ticket")
    if approval.expires_at - now < MIN_PUSH_LIFE:
        await _finish(svc, approval, ticket)
        return
    async with svc.db() as db:
        device = await db.get(Device, job.payload["device_id"])
    sender = svc.providers.push(device.push_provider or "") if device is not None else None
    if device is None or device.revoked_at is not None or not device.push_token or not sender:
        await _finish(svc, approval, ticket)
        return
    if device.id in await svc.approvals.acked_devices(approval.id):
        await _finish(svc, approval, ticket)
        return
    title, body = push_text(approval)
    message = PushMessage(approval.id, approval.expires_at, title, body)
    started = time.perf_counter()
    try:
        result = await sender.send(device.push_token, message, now=now)
    except Exception as exc:  # an adapter bug must not lose the push: retry like a timeout
        log.exception("%s sender failed", sender.channel, extra=log_fields(approval))
        result = PushResult("retry", detail=f"error: {type(exc).__name__}")
    latency = result.latency or (time.perf_counter() - started)
    await _record_attempt(svc, approval, device, sender.channel, result, latency, job.attempt)
    log.log(
        logging.INFO if result.outcome == "accepted" else logging.WARNING,
        "delivery of approval %s by %s to device %s: %s (attempt %d, %.0f ms) %s",
        approval.id,
        sender.channel,
        device.id,
        result.outcome,
        job.attempt + 1,
        latency * 1000,
        result.detail[:200],
        extra=log_fields(
            approval,
            device_id=device.id,
            channel=sender.channel,
            outcome=result.outcome,
            attempt=job.attempt + 1,
            latency_ms=round(latency * 1000, 1),
        ),
    )
    if result.outcome == "accepted":
        await svc.approvals.mark_delivered(
            approval.id, sender.channel, sms_codes.delivered_event(sender.channel)
        )
        await _finish(svc, approval, ticket)
        return
    if result.outcome == "retry":
        at = next_attempt_at(
            svc.clock.now(),
            job.attempt,
            approval.expires_at - MIN_PUSH_LIFE,
            base=PUSH_RETRY_BASE,
            cap=PUSH_RETRY_CAP,
            retry_after=result.retry_after,
        )
        if at is not None:
            await svc.jobs.enqueue("push", job.payload, run_at=at, attempt=job.attempt + 1)
            return
    # A dead token, a permanent failure, or no time left: maybe SMS can still reach them.
    await _finish(svc, approval, ticket)


async def _record_attempt(
    svc: Services,
    approval: PendingApproval,
    device: Device,
    channel: str,
    result: PushResult,
    latency: float,
    attempt: int,
) -> None:
    """Metrics and audit for one push attempt; a dead token is forgotten in the same step."""
    detail = observe_attempt(channel, result, attempt=attempt, latency=latency)
    log.info(
        "delivery of approval %s by %s: %s",
        approval.id,
        channel,
        result.outcome,
        extra={
            "approval_id": approval.id,
            "request_id": approval.request_id,  # the sign-in's, so one id follows it
            "device_id": device.id,
            "channel": channel,
            "outcome": result.outcome,
            "attempt": attempt + 1,
            "latency_ms": round(latency * 1000, 1),
        },
    )
    token_cleared = False
    async with svc.db() as db:
        await audit.record(
            db,
            "delivery.attempt",
            user_id=approval.user_id,
            device_id=device.id,
            approval_id=approval.id,
            detail=detail,
            now=svc.clock.now(),
        )
        if result.outcome == "invalid_token":
            current = await db.get(Device, device.id)
            # Only the token that failed: the app may have sent a fresh one meanwhile.
            if current is not None and current.push_token == device.push_token:
                current.push_token = None
                db.add(current)
                token_cleared = True
                await audit.record(
                    db,
                    "device.push_token_cleared",
                    user_id=approval.user_id,
                    device_id=device.id,
                    approval_id=approval.id,
                    detail={"channel": channel, "detail": result.detail[:200]},
                    now=svc.clock.now(),
                )
        await db.commit()
    if token_cleared:
        await account_changed(svc.redis, svc.keys, approval.user_id)


Handler = Callable[[Services, Job], Awaitable[None]]
HANDLERS: dict[str, Handler] = {
    "push": _push,
    "ack_check": _ack_check,
    "sms": sms_codes.send_code,
}


async def run_delivery_jobs(svc: Services, stop: asyncio.Event) -> None:
    """Consume delivery jobs until `stop`: claim due ones and run each in its own task, so
    pushes to several devices (and slow providers) never wait for one another."""
    queue = svc.jobs
    running: set[asyncio.Task[None]] = set()

    async def run(job: Job) -> None:
        try:
            handler = HANDLERS.get(job.kind)
            if handler is None:
                log.warning("dropping job of unknown kind %s", job.kind)
            else:
                await handler(svc, job)
        except Exception:
            log.exception("delivery job %s failed", job.kind)
        finally:
            try:
                await queue.done(job)
            except Exception as exc:  # its lease ends and it runs again; handlers allow that
                log.warning("could not finish job %s: %s", job.id, type(exc).__name__)

    async with svc.events.listen(queue.wake_channel) as wake:
        while not stop.is_set():
            try:
                claimed = await queue.claim()
            except Exception as exc:
                log.warning("job claim failed: %s", type(exc).__name__)
                claimed = []
                await _sleep_or_stop(stop, 1.0)
            for job in claimed:
                task = asyncio.create_task(run(job), name=f"job-{job.kind}")
                running.add(task)
                task.add_done_callback(running.discard)
            if claimed:
                continue
            next_due = None
            with contextlib.suppress(Exception):
                next_due = await queue.next_due()
            pause = 0.25 if next_due is None else max(0.0, min(0.25, next_due - svc.clock.now()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.get(), timeout=pause)
    if running:
        await asyncio.wait(running, timeout=10)


async def run_expiry_sweeper(svc: Services, stop: asyncio.Event) -> None:
    """End approvals whose deadline passed, so devices and waiters hear `expired` on time."""
    while not stop.is_set():
        try:
            for approval_id in await svc.approvals.due_for_expiry():
                await svc.approvals.expire_if_due(approval_id)  # counted in the store
            next_deadline = await svc.approvals.next_deadline()
        except Exception as exc:
            log.warning("expiry sweep failed: %s", type(exc).__name__)
            next_deadline = None
        pause = (
            0.5 if next_deadline is None else max(0.05, min(0.5, next_deadline - svc.clock.now()))
        )
        await _sleep_or_stop(stop, pause)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
