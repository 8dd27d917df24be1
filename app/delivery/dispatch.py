"""Getting an approval request to the person: WebSocket first, push for phones that are
away or slow to acknowledge, SMS when nothing else can reach them.

Every delivery under way for an approval holds a ticket in the approval's in-flight set
(through the approval store): one per push (kept across its retries) and one for the ack
check of connected phones. A delivery that ends without reaching anyone gives its ticket
back; when the last ticket comes back and no device acknowledged and no provider accepted,
the SMS fallback goes out (at most once per approval).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.account_cache import Recipient
from app.approval.model import PendingApproval, Status
from app.approval.store import Delivery
from app.core.tokens import new_id
from app.db import audit
from app.db.accounts import active_devices
from app.db.models import Device
from app.delivery import sms_codes
from app.delivery.attempts import Attempt, attempt
from app.delivery.push import PushMessage, PushResult
from app.services import Services
from app.store.jobs import Job, PreparedJob

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


def _push_job(svc: Services, approval: PendingApproval, device: Device) -> tuple[PreparedJob, str]:
    """A push to `device` now, and the in-flight ticket it holds until it is done."""
    ticket = new_id()
    payload = {"approval_id": approval.id, "device_id": device.id, "ticket": ticket}
    return svc.jobs.prepare("push", payload), ticket


# --- planning and sending ------------------------------------------------------------------


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
    approval.channels += [
        p for p in ("fcm", "apns", "webpush") if any(d.push_provider == p for d in away)
    ]
    delivery = Delivery()
    for device in away:
        job, ticket = _push_job(svc, approval, device)
        delivery.jobs.append(job)
        delivery.tickets.append(ticket)
    if waiting:
        ticket = new_id()
        delivery.tickets.append(ticket)
        check = svc.jobs.prepare(
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


async def _push_to(svc: Services, approval: PendingApproval, devices: list[Device]) -> None:
    """Push to `devices` now, and list their providers among the approval's channels."""
    if not devices:
        return
    pushes = [_push_job(svc, approval, device) for device in devices]
    await svc.approvals.open_deliveries(
        approval, [job for job, _ in pushes], [ticket for _, ticket in pushes]
    )
    for provider in sorted({d.push_provider or "" for d in devices}):
        await svc.approvals.mark_sent(approval.id, provider)


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
    await _push_to(svc, approval, silent)
    async with svc.db() as db:
        await audit.record(
            db,
            "approval.resent",
            user_id=approval.user_id,
            approval_id=approval.id,
            detail={"pushed_devices": [d.id for d in silent]},
            now=svc.clock.now(),
        )
        await db.commit()


async def _finish(svc: Services, approval: PendingApproval, ticket: str | None) -> None:
    """One delivery ended; if it was the last and nobody was reached, the SMS fallback goes."""
    if ticket is None or not await svc.approvals.close_delivery(approval.id, ticket):
        return
    latest = await svc.approvals.get(approval.id)
    if latest is not None and await sms_codes.request_code(svc, latest, automatic=True):
        log.info(
            "no device reached for approval %s; SMS fallback queued",
            approval.id,
            extra=log_fields(approval, channel="sms"),
        )


# --- job handlers --------------------------------------------------------------------------


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
        await _push_to(svc, approval, devices)
    await _finish(svc, approval, job.payload.get("ticket"))


def push_text(approval: PendingApproval) -> tuple[str, str]:
    """Title and body of the notification: the browser and IP, nothing secret."""
    context = approval.context
    title = "Sign-in request" if approval.kind == "login" else "Approval request"
    return title, f"{context.browser} on {context.os} from {context.ip}. Tap to review."


async def _pushable_device(svc: Services, approval: PendingApproval, job: Job) -> Device | None:
    """The job's device, if a push to it still makes sense (known, live, not acked)."""
    if approval.expires_at - svc.clock.now() < MIN_PUSH_LIFE:
        return None
    async with svc.db() as db:
        device = await db.get(Device, job.payload["device_id"])
    if device is None or device.revoked_at is not None or not _pushable(svc, device):
        return None
    if device.id in await svc.approvals.acked_devices(approval.id):
        return None
    return device


async def _push(svc: Services, job: Job) -> None:
    """Job `push`: one attempt to one device; retried with backoff until the approval ends."""
    approval = await svc.approvals.get(job.payload["approval_id"])
    now = svc.clock.now()
    if approval is None or approval.status is not Status.PENDING or approval.expires_at <= now:
        return  # nothing is sent for an approval that has ended
    ticket: str | None = job.payload.get("ticket")
    device = await _pushable_device(svc, approval, job)
    sender = svc.providers.push(device.push_provider or "") if device is not None else None
    if device is None or sender is None or not device.push_token:
        await _finish(svc, approval, ticket)
        return
    title, body = push_text(approval)
    message = PushMessage(approval.id, approval.expires_at, title, body)
    deadline = approval.expires_at - MIN_PUSH_LIFE
    attempted = await attempt(
        svc,
        Attempt(approval, sender.channel, job.attempt, deadline, device.id),
        partial(sender.send, device.push_token, message, now=now),
        partial(_forget_push_token, svc, approval, device),
    )
    if attempted.result.outcome == "accepted":
        await svc.approvals.mark_delivered(approval.id, sender.channel)
    elif attempted.retry_at is not None:
        await svc.jobs.enqueue(
            "push", job.payload, shard=job.shard, run_at=attempted.retry_at, attempt=job.attempt + 1
        )
        return
    # Accepted, or a dead token, a permanent failure, no time left: maybe SMS can still help.
    await _finish(svc, approval, ticket)


async def _forget_push_token(
    svc: Services, approval: PendingApproval, device: Device, db: AsyncSession, result: PushResult
) -> bool:
    """The provider says the device's token is dead: clear it (only the token that failed:
    the app may have sent a fresh one meanwhile). True when it was cleared."""
    current = await db.get(Device, device.id)
    if current is None or current.push_token != device.push_token:
        return False
    current.push_token = None
    db.add(current)
    await audit.record(
        db,
        "device.push_token_cleared",
        user_id=approval.user_id,
        device_id=device.id,
        approval_id=approval.id,
        detail={"channel": device.push_provider, "detail": result.detail[:200]},
        now=svc.clock.now(),
    )
    return True


Handler = Callable[[Services, Job], Awaitable[None]]
HANDLERS: dict[str, Handler] = {
    "push": _push,
    "ack_check": _ack_check,
    "sms": sms_codes.send_code,
}


async def run_delivery_jobs(svc: Services, stop: asyncio.Event) -> None:
    """Consume delivery jobs until `stop`: claim due ones from every shard and run each in
    its own task, so pushes to several devices (and slow providers) never wait for one
    another. Each shard has a loop of its own, so one that is down (a Redis Cluster
    master lost) holds up no other shard's jobs."""
    running: set[asyncio.Task[None]] = set()
    await asyncio.gather(*(_shard_jobs(svc, stop, shard, running) for shard in svc.jobs.shards))
    if running:
        await asyncio.wait(running, timeout=10)


async def _shard_jobs(
    svc: Services, stop: asyncio.Event, shard: int, running: set[asyncio.Task[None]]
) -> None:
    queue = svc.jobs
    while not stop.is_set():
        try:
            async with svc.events.listen(queue.wake_channel(shard)) as wake:
                while not stop.is_set():
                    try:
                        claimed: list[Job] = await queue.claim(shard)
                    except Exception as exc:  # the listening goes on: the bus reconnects
                        log.warning("job claim failed: %s", type(exc).__name__)
                        await _sleep_or_stop(stop, 1.0)
                        continue
                    for job in claimed:
                        task = asyncio.create_task(_run_job(svc, job), name=f"job-{job.kind}")
                        running.add(task)
                        task.add_done_callback(running.discard)
                    if not claimed:
                        with contextlib.suppress(TimeoutError):
                            pause = await _pause(svc, shard)
                            await asyncio.wait_for(wake.get(), timeout=pause)
        except Exception as exc:
            log.warning("job wake-ups not heard: %s", type(exc).__name__)
            await _sleep_or_stop(stop, 1.0)


async def _run_job(svc: Services, job: Job) -> None:
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
            await svc.jobs.done(job)
        except Exception as exc:  # its lease ends and it runs again; handlers allow that
            log.warning("could not finish job %s: %s", job.id, type(exc).__name__)


async def _pause(svc: Services, shard: int) -> float:
    """How long to wait for a wake-up before claiming again: until the shard's next due
    job, at most a quarter second."""
    due = None
    with contextlib.suppress(Exception):
        due = await svc.jobs.next_due(shard)
    if due is None:
        return 0.25
    return max(0.0, min(0.25, due - svc.clock.now()))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
