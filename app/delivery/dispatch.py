"""Getting an approval request to the person: WebSocket first, push for phones that are
away or slow to acknowledge, SMS when nothing else can reach them. Also the expiry sweeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from sqlmodel import select

from app import metrics
from app.core.approvals import PendingApproval, Status
from app.db import audit
from app.db.models import Device
from app.delivery.push import PushMessage
from app.delivery.retry import PUSH_RETRY_BASE, PUSH_RETRY_CAP, next_attempt_at
from app.services import Services
from app.store.jobs import Job, JobQueue

log = logging.getLogger(__name__)

# A connected phone that has not acknowledged a request within this long also gets a push.
ACK_TIMEOUT = 3.0


def jobs(svc: Services) -> JobQueue:
    return JobQueue(svc.redis, svc.keys, svc.clock)


def _pushable(svc: Services, device: Device) -> bool:
    return bool(
        device.push_token and device.push_provider and svc.providers.push(device.push_provider)
    )


def initial_channels(svc: Services, devices: list[Device], connected: set[str]) -> list[str]:
    """Where a new request goes: `websocket` for connected phones, the push providers of others."""
    channels: list[str] = []
    if any(d.id in connected for d in devices):
        channels.append("websocket")
    for provider in ("fcm", "apns"):
        if any(
            d.id not in connected and d.push_provider == provider and _pushable(svc, d)
            for d in devices
        ):
            channels.append(provider)
    return channels


async def after_create(
    svc: Services, approval: PendingApproval, devices: list[Device], connected: set[str]
) -> None:
    """Schedule pushes now for phones that are away, and an ack check for connected ones."""
    queue = jobs(svc)
    for device in devices:
        if device.id not in connected and _pushable(svc, device):
            await queue.enqueue("push", {"approval_id": approval.id, "device_id": device.id})
    if any(d.id in connected for d in devices):
        await queue.enqueue(
            "ack_check", {"approval_id": approval.id}, run_at=svc.clock.now() + ACK_TIMEOUT
        )
    elif not any(_pushable(svc, d) for d in devices):
        await sms_fallback(svc, approval)


async def resend(svc: Services, approval: PendingApproval) -> None:
    """Send a pending request again: over every socket, and by push to phones that did not ack."""
    await svc.events.publish(
        svc.keys.user_channel(approval.user_id),
        {"type": "approval_request", "approval": approval.device_json()},
    )
    acked = await svc.approvals.acked_devices(approval.id)
    queue = jobs(svc)
    async with svc.db() as db:
        result = await db.exec(
            select(Device).where(Device.user_id == approval.user_id, Device.revoked_at == None)  # noqa: E711
        )
        devices = list(result.all())
    for device in devices:
        if device.id not in acked and _pushable(svc, device):
            await queue.enqueue("push", {"approval_id": approval.id, "device_id": device.id})


async def sms_fallback(svc: Services, approval: PendingApproval) -> bool:
    """Send the SMS code when no device can be reached; True if one went out."""
    from app.delivery import sms_codes

    return await sms_codes.send_fallback_code(svc, approval)


async def _ack_check(svc: Services, job: Job) -> None:
    approval = await svc.approvals.get(job.payload["approval_id"])
    if approval is None or approval.status is not Status.PENDING:
        return
    acked = await svc.approvals.acked_devices(approval.id)
    if acked:
        return
    queue = jobs(svc)
    async with svc.db() as db:
        result = await db.exec(
            select(Device).where(Device.user_id == approval.user_id, Device.revoked_at == None)  # noqa: E711
        )
        devices = list(result.all())
    pushable = [d for d in devices if _pushable(svc, d)]
    for device in pushable:
        await queue.enqueue("push", {"approval_id": approval.id, "device_id": device.id})
    if not pushable:
        await sms_fallback(svc, approval)


def push_text(approval: PendingApproval) -> tuple[str, str]:
    """Title and body of the notification: the browser and IP, nothing secret."""
    context = approval.context
    title = "Sign-in request" if approval.kind == "login" else "Approval request"
    return title, f"{context.browser} on {context.os} from {context.ip}. Tap to review."


async def _push(svc: Services, job: Job) -> None:
    approval = await svc.approvals.get(job.payload["approval_id"])
    if approval is None or approval.status is not Status.PENDING:
        return
    now = svc.clock.now()
    if approval.expires_at <= now:
        return
    async with svc.db() as db:
        device = await db.get(Device, job.payload["device_id"])
    if device is None or device.revoked_at is not None or not device.push_token:
        return
    if device.id in await svc.approvals.acked_devices(approval.id):
        return
    sender = svc.providers.push(device.push_provider or "")
    if sender is None:
        return
    title, body = push_text(approval)
    message = PushMessage(approval.id, approval.expires_at, title, body)
    started = time.perf_counter()
    result = await sender.send(device.push_token, message, now=now)
    latency = result.latency or (time.perf_counter() - started)
    channel = sender.channel
    metrics.DELIVERY_ATTEMPTS.labels(channel, result.outcome).inc()
    metrics.DELIVERY_LATENCY.labels(channel).observe(latency)
    async with svc.db() as db:
        await audit.record(
            db,
            "delivery.attempt",
            user_id=approval.user_id,
            device_id=device.id,
            approval_id=approval.id,
            detail={
                "channel": channel,
                "outcome": result.outcome,
                "attempt": job.attempt + 1,
                "latency_ms": round(latency * 1000, 1),
                "detail": result.detail[:200],
            },
            now=svc.clock.now(),
        )
        if result.outcome == "invalid_token":
            current = await db.get(Device, device.id)
            if current is not None and current.push_token == device.push_token:
                current.push_token = None
                db.add(current)
        await db.commit()
    if result.outcome == "accepted":
        await svc.approvals.mark_delivered(
            approval.id, channel, orjson.dumps({"type": "delivered", "channel": channel})
        )
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
            await jobs(svc).enqueue("push", job.payload, run_at=at, attempt=job.attempt + 1)
            return
    # invalid token, permanent failure, or no time left to retry: maybe SMS can still reach them.
    await sms_fallback(svc, approval)


HANDLERS: dict[str, Any] = {"push": _push, "ack_check": _ack_check}


async def run_delivery_jobs(svc: Services, stop: asyncio.Event) -> None:
    """Consume delivery jobs until `stop`: claim due ones, run them concurrently, finish them."""
    queue = jobs(svc)
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
            await queue.done(job)

    async with svc.events.listen(queue.wake_channel) as wake:
        while not stop.is_set():
            try:
                claimed = await queue.claim()
            except Exception as exc:
                log.warning("job claim failed: %s", type(exc).__name__)
                claimed = []
                await _sleep_or_stop(stop, 1.0)
            for job in claimed:
                task = asyncio.create_task(run(job))
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
                status = await svc.approvals.expire_if_due(approval_id)
                if status is Status.EXPIRED:
                    metrics.APPROVALS.labels("expired").inc()
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
