"""The outbox: messages written in the caller's transaction, sent by workers via a Redis Stream.

SQL holds the truth; a stream entry only says "look at this row now". Life of a row:

    queued --claim--> processing --accepted--> sent
      ^                   |--refused for good / last attempt / expired--> dead
      |--- temporary failure, after a backoff ---|
      |--- lease ended (the worker died mid-send) ---|

`next_attempt_at` is the one time that says when a row needs attention next. For a queued
row: when it may be tried (backoff), and once published, when its stream entry is presumed
lost (Redis restarted) and it is published again. For a processing row: when its worker is
presumed dead and the row goes back to queued. It never passes `expires_at`, so every row ends
`sent` or `dead` by then.

A stream entry names a message and its attempt count; a worker takes the row only through a
conditional UPDATE matching both, so duplicate, stale or reclaimed entries are harmless and two
workers never send the same attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import ColumnElement, func, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app import metrics
from app.core.clock import to_datetime
from app.core.tokens import new_id
from app.db.models import OutboxMessage
from app.delivery.mail import (
    SECURITY_NOTICES,
    Mailer,
    MailError,
    MailRenderer,
    build_mailer,
    message_id_for,
)
from app.delivery.retry import next_attempt_at
from app.services import Services
from app.store.streams import Entry, StreamGroup, route, spread

log = logging.getLogger(__name__)

GROUP = "senders"
LIVE = ("queued", "processing")
# Failures of Redis or the database that a loop rides out instead of crashing.
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, OperationalError, DBAPIError)


@dataclass(frozen=True)
class OutboxPolicy:
    """Retry and lease timing (seconds); the defaults suit mail."""

    retry_base: float = 5.0
    retry_cap: float = 600.0
    max_attempts: int = 8
    lease: float = 60.0
    tick: float = 1.0
    batch: int = 50

    @property
    def send_timeout(self) -> float:
        """One send must end well inside the lease, or a second worker could start it."""
        return self.lease / 2


def enqueue(
    session: AsyncSession,
    *,
    channel: str,
    recipient: str,
    template: str,
    payload: dict[str, Any],
    user_id: str | None,
    now: float,
    ttl: float,
) -> OutboxMessage:
    """Add a message to the caller's session; it is sent once the caller commits (call `kick`)."""
    message = OutboxMessage(
        id=new_id(),
        channel=channel,
        recipient=recipient,
        template=template,
        payload=orjson.dumps(payload).decode(),
        status="queued",
        attempts=0,
        created_at=to_datetime(now),
        next_attempt_at=to_datetime(now),
        expires_at=to_datetime(now + ttl),
        user_id=user_id,
    )
    session.add(message)
    return message


def dead_letter_level(template: str) -> int:
    """How loudly a message that will never be sent is logged: a lost security notice means
    an owner was not warned (ERROR); any other lost mail is still worth a WARNING."""
    return logging.ERROR if template in SECURITY_NOTICES else logging.WARNING


def _seconds(at: datetime) -> float:
    """A naive UTC datetime from the database as Unix seconds."""
    return at.replace(tzinfo=UTC).timestamp()


def outbox_streams(svc: Services) -> list[StreamGroup]:
    """The outbox's streams (one per shard) and their consumer groups, as this process sees
    them."""
    return spread(svc.redis, svc.keys, "outbox:stream", GROUP, svc.process_id)


def outbox_stream(svc: Services, message_id: str) -> StreamGroup:
    """The outbox stream a message is put on."""
    return route(outbox_streams(svc), message_id)


async def kick(svc: Services, message_id: str) -> None:
    """After commit: put the message on the stream so a worker sends it at once.

    Best effort: if Redis is down, the dispatcher publishes the row from SQL on its next tick.
    """
    try:
        await outbox_stream(svc, message_id).add({"id": message_id, "attempts": "0"})
    except (RedisConnectionError, RedisTimeoutError, OSError):
        log.warning("outbox kick failed for %s; the dispatcher will publish it", message_id)


async def run_outbox(
    svc: Services,
    stop: asyncio.Event,
    *,
    mailer: Mailer | None = None,
    policy: OutboxPolicy | None = None,
) -> None:
    """Dispatch, sweep and send outbox messages until `stop` is set."""
    if policy is None:
        policy = OutboxPolicy(lease=svc.settings.outbox_lease)
    worker = OutboxWorker(svc, mailer or build_mailer(svc.settings), policy)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(worker.dispatch_forever(stop), name="outbox-dispatch")
        tasks.create_task(worker.consume_forever(stop), name="outbox-consume")


class OutboxWorker:
    """One worker's share of the outbox: a dispatcher/sweeper loop and a consumer loop."""

    def __init__(self, svc: Services, mailer: Mailer, policy: OutboxPolicy) -> None:
        self.svc = svc
        self.mailer = mailer
        self.policy = policy
        self.renderer = MailRenderer(svc.settings.public_url)
        self.groups = outbox_streams(svc)
        self._last_depth = 0.0

    # -- dispatcher and sweeper -------------------------------------------------------------

    async def dispatch_forever(self, stop: asyncio.Event) -> None:
        """Every tick: end expired rows, re-queue abandoned ones, publish due ones."""
        while not stop.is_set():
            try:
                await self.tick()
            except TRANSIENT as exc:
                log.warning("outbox dispatcher: %s; retrying", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.policy.tick)

    async def tick(self) -> int:
        """One pass of the dispatcher; returns how many messages it published."""
        now = self.svc.clock.now()
        at = to_datetime(now)
        row = OutboxMessage
        async with self.svc.db() as db:
            ended = await db.exec(
                update(row)
                .where(col(row.status).in_(LIVE), col(row.expires_at) <= at)
                .values(status="dead", last_error="expired before it could be sent", payload="{}")
                .returning(col(row.id), col(row.template), col(row.last_error))
            )
            dead = list(ended.all())
            # A processing row past its lease lost its worker mid-send (crash, SIGKILL).
            abandoned = (col(row.status) == "processing", col(row.next_attempt_at) <= at)
            ended = await db.exec(
                update(row)
                .where(*abandoned, col(row.attempts) >= self.policy.max_attempts)
                .values(status="dead", last_error="worker lost in the last attempt", payload="{}")
                .returning(col(row.id), col(row.template), col(row.last_error))
            )
            dead += ended.all()
            await db.exec(
                update(row)
                .where(*abandoned)
                .values(status="queued", next_attempt_at=at, last_error="worker lost mid-send")
            )
            await db.commit()
            for message_id, template, why in dead:
                log.log(
                    dead_letter_level(template),
                    "outbox message %s (%s): dead (%s)",
                    message_id,
                    template,
                    why,
                    extra={"outbox_id": message_id, "outcome": "dead", "template": template},
                )

            due = await db.exec(
                select(row.id, row.attempts, row.expires_at)
                .where(col(row.status) == "queued", col(row.next_attempt_at) <= at)
                .order_by(col(row.next_attempt_at))
                .limit(self.policy.batch)
            )
            published: list[tuple[str, int]] = []
            for message_id, attempts, expires_at in due.all():
                # Until this lease ends the stream entry is trusted; after it, it counts as lost.
                lease_end = min(to_datetime(now + self.policy.lease), expires_at)
                taken = await db.exec(
                    update(row)
                    .where(
                        col(row.id) == message_id,
                        col(row.status) == "queued",
                        col(row.attempts) == attempts,
                        col(row.next_attempt_at) <= at,
                    )
                    .values(next_attempt_at=lease_end)
                )
                if taken.rowcount == 1:
                    published.append((message_id, attempts))
            await db.commit()
        batches: dict[str, tuple[StreamGroup, list[dict[str, str]]]] = {}
        for message_id, attempts in published:
            group = route(self.groups, message_id)
            batches.setdefault(group.stream, (group, []))[1].append(
                {"id": message_id, "attempts": str(attempts)}
            )
        for group, entries in batches.values():
            await group.add(*entries)
        if time.monotonic() - self._last_depth > 15:
            await self._measure_depth()
        return len(published)

    async def _measure_depth(self) -> None:
        self._last_depth = time.monotonic()
        row = OutboxMessage
        async with self.svc.db() as db:
            counts = await db.exec(
                select(row.status, func.count())
                .where(col(row.status).in_(LIVE))
                .group_by(row.status)
            )
            found = dict(counts.all())
        for status in LIVE:
            metrics.OUTBOX_DEPTH.labels(status).set(found.get(status, 0))

    # -- consumer ---------------------------------------------------------------------------

    async def consume_forever(self, stop: asyncio.Event) -> None:
        """Read every outbox stream with the consumer group, send, record the outcome,
        acknowledge."""
        await asyncio.gather(*(self._consume(group, stop) for group in self.groups))

    async def _consume(self, group: StreamGroup, stop: asyncio.Event) -> None:
        last_reclaim = 0.0
        ready = False
        while not stop.is_set():
            try:
                if not ready:
                    await group.ensure()
                    ready = True
                if time.monotonic() - last_reclaim > self.policy.lease / 2:
                    last_reclaim = time.monotonic()
                    await self._handle_all(
                        group,
                        await group.reclaim(
                            min_idle_ms=int(self.policy.lease * 1000), count=self.policy.batch
                        ),
                    )
                    await group.forget_idle_consumers()
                await self._handle_all(
                    group, await group.read(count=self.policy.batch, block_ms=1000)
                )
            except TRANSIENT as exc:
                ready = False
                log.warning("outbox consumer: %s; retrying", type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.policy.tick)

    async def _handle_all(self, group: StreamGroup, entries: list[Entry]) -> None:
        # Sends of one batch run side by side; each is bounded by the send timeout.
        await asyncio.gather(*(self._handle(fields) for _id, fields in entries))
        await group.ack(entries)

    async def _handle(self, fields: dict[str, str]) -> None:
        try:
            message_id, attempts = fields["id"], int(fields["attempts"])
        except (KeyError, ValueError):
            log.warning("dropping a malformed outbox entry %r", fields)
            return
        try:
            await self.process(message_id, attempts)
        except TRANSIENT as exc:
            # The row keeps its lease; the sweeper re-queues it when the lease ends.
            log.warning("outbox message %s: %s while processing", message_id, type(exc).__name__)
        except Exception:
            # A bug must not stop the queue; the lease and the attempt limit end the message.
            log.exception("outbox message %s failed unexpectedly", message_id)

    async def process(self, message_id: str, attempts: int) -> str | None:
        """Claim attempt `attempts + 1` of a message, send it, record the outcome.

        Returns the outcome (`sent`, `retry`, `dead`), or None when the entry was stale.
        """
        message = await self._claim(message_id, attempts)
        if message is None:
            return None
        started = time.monotonic()
        error = await self._send(message)
        metrics.DELIVERY_LATENCY.labels("email").observe(time.monotonic() - started)
        outcome = await self._record(message, error)
        metrics.OUTBOX_SENDS.labels(message.channel, outcome).inc()
        log.log(
            dead_letter_level(message.template) if outcome == "dead" else logging.INFO,
            "outbox message %s (%s) attempt %d: %s%s",
            message.id,
            message.template,
            message.attempts,
            outcome,
            f" ({error.reason})" if error else "",
            extra={"outbox_id": message.id, "outcome": outcome, "template": message.template},
        )
        return outcome

    async def _claim(self, message_id: str, attempts: int) -> OutboxMessage | None:
        now = self.svc.clock.now()
        at = to_datetime(now)
        row = OutboxMessage
        async with self.svc.db() as db:
            message = await db.get(row, message_id)
            if message is None or message.status != "queued" or message.attempts != attempts:
                return None
            if message.expires_at <= at:
                return None  # the sweeper marks it dead
            lease_end = min(to_datetime(now + self.policy.lease), message.expires_at)
            taken = await db.exec(
                update(row)
                .where(
                    col(row.id) == message_id,
                    col(row.status) == "queued",
                    col(row.attempts) == attempts,
                )
                .values(status="processing", attempts=attempts + 1, next_attempt_at=lease_end)
            )
            await db.commit()
            if taken.rowcount != 1:
                return None
            await db.refresh(message)
            return message

    async def _send(self, message: OutboxMessage) -> MailError | None:
        if message.channel != "email":
            return MailError(f"no sender for channel {message.channel!r}", permanent=True)
        try:
            mail = self.renderer.render(
                message.template,
                orjson.loads(message.payload),
                recipient=message.recipient,
                message_id=message_id_for(message.id),
            )
        except Exception as exc:  # a bad payload or template never renders on a retry either
            return MailError(str(exc) or type(exc).__name__, permanent=True)
        now = self.svc.clock.now()
        remaining = _seconds(message.expires_at) - now
        try:
            # Nothing may still be on the wire when the message expires.
            async with asyncio.timeout(max(0.0, min(self.policy.send_timeout, remaining))):
                await self.mailer.send(mail, now=now)
        except MailError as exc:
            return exc
        except TimeoutError:
            return MailError("timed out", permanent=False)
        except Exception as exc:  # a mailer bug must not stall the queue; retry it
            log.exception("mailer failed unexpectedly")
            return MailError(f"{type(exc).__name__}: {exc}", permanent=False)
        return None

    async def _record(self, message: OutboxMessage, error: MailError | None) -> str:
        now = self.svc.clock.now()
        at = to_datetime(now)
        row = OutboxMessage
        # Failures are recorded only while this worker still holds the claim.
        mine: tuple[ColumnElement[bool], ...] = (
            col(row.id) == message.id,
            col(row.status) == "processing",
            col(row.attempts) == message.attempts,
        )
        where: tuple[ColumnElement[bool], ...]
        if error is None:
            # Recorded even if the lease was lost meanwhile: the mail did go out.
            outcome, where = "sent", (col(row.id) == message.id, col(row.status) != "sent")
            values: dict[str, Any] = {"status": "sent", "sent_at": at, "payload": "{}"}
        elif error.permanent:
            outcome, where = "dead", mine
            values = {"status": "dead", "last_error": error.reason[:1000], "payload": "{}"}
        else:
            retry_at = next_attempt_at(
                now,
                message.attempts - 1,
                _seconds(message.expires_at),
                base=self.policy.retry_base,
                cap=self.policy.retry_cap,
            )
            if message.attempts >= self.policy.max_attempts or retry_at is None:
                why = "no attempts left" if retry_at is not None else "would expire before a retry"
                outcome, where = "dead", mine
                values = {
                    "status": "dead",
                    "last_error": f"{why}: {error.reason}"[:1000],
                    "payload": "{}",
                }
            else:
                outcome, where = "retry", mine
                values = {
                    "status": "queued",
                    "next_attempt_at": to_datetime(retry_at),
                    "last_error": error.reason[:1000],
                }
        async with self.svc.db() as db:
            await db.exec(update(row).where(*where).values(**values))
            await db.commit()
        return outcome
