"""Approvals in Redis: the only code that reads or writes an approval's keys.

Every state change is one script (app/approval/scripts), so any number of processes racing
on one approval see exactly one winner, and the event announcing the change is published
in the same atomic step: nobody sees a state without its event. The scripts also say when
a call was the one that ended an approval, so each end is counted once (app.metrics).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import orjson
import redis.asyncio as aioredis

from app import metrics
from app.approval.keys import ApprovalKeys, ApprovalKeySet
from app.approval.model import PendingApproval, Status
from app.approval.rules import (
    FINAL_STATE_KEEP,
    SUPERSEDED,
    TIMED_OUT,
    Outcome,
    backoff_schedule,
    end_reason,
    keep_seconds,
)
from app.core.clock import Clock
from app.store.jobs import JobQueue, PreparedJob
from app.store.lua import Script
from app.store.presence import PROCESS_TTL, Snapshot
from app.store.redis import KeySpace

log = logging.getLogger(__name__)

_BACKOFF_SCHEDULE = ",".join(str(wait) for wait in backoff_schedule())


@dataclass
class Delivery:
    """Delivery work stored in the same atomic step that creates an approval, so an approval
    never exists without it (app.delivery.dispatch.plan builds it)."""

    jobs: list[PreparedJob] = field(default_factory=list)
    # One per delivery under way, in the approval's in-flight set (see dispatch).
    tickets: list[str] = field(default_factory=list)
    # The job (with its ticket) that checks, a few seconds on, that the connected phones
    # acknowledged; the last of their acks cancels it.
    ack_check: dict[str, object] | None = None

    def watch(self, job: PreparedJob, ticket: str, devices: list[str]) -> None:
        """Add the ack check of `devices`; `ticket` must be among `tickets`."""
        self.jobs.append(job)
        self.ack_check = {"job": job.id, "ticket": ticket, "devices": devices}


@dataclass(frozen=True)
class Created:
    """The approval was stored; `superseded` names the pending one it replaced, if any."""

    superseded: str | None


@dataclass(frozen=True)
class Changed:
    """Nothing was created: the user's reachability is no longer what the caller planned
    with; plan again with `snapshot`."""

    snapshot: Snapshot


@dataclass(frozen=True)
class StillPending:
    """Nothing was created: the user's pending approval is `approval_id`, not the one the
    caller expected; create again superseding that one."""

    approval_id: str


@dataclass(frozen=True)
class Backoff:
    """Push-fatigue backoff: the user may get a new approval in `retry_after` seconds."""

    retry_after: int


@dataclass(frozen=True)
class DecideResult:
    """What an atomic decide did: `decided` (this caller won) or found it `final` already."""

    kind: Literal["decided", "final", "not_found"]
    status: Status | None


@dataclass(frozen=True)
class Durability:
    """How many replicas must hold a new approval or a decision before the caller hears of
    it (Redis's WAIT), and how long to wait for them (TAPPROVE_REDIS_WAIT_*). Replication
    is asynchronous: without a replica's acknowledgement, a master that dies at once can
    take the change with it. When none acknowledges in time the answer still goes out (a
    replica down must not stop sign-ins), logged and counted (tapprove_redis_unreplicated)."""

    replicas: int = 0
    wait_ms: int = 500


def delivered_event(channel: str) -> bytes:
    """The browser stream's `delivered` event for `channel`."""
    return orjson.dumps({"type": "delivered", "channel": channel})


class ApprovalStore:
    """Reads and atomically changes approvals held in Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        space: KeySpace,
        clock: Clock,
        jobs: JobQueue,
        durability: Durability | None = None,
    ) -> None:
        self._redis = redis
        self._durability = durability or Durability()
        self._space = space
        self.keys = ApprovalKeys(space)
        self._clock = clock
        self._jobs = jobs
        self._create = Script(redis, "app.approval", "create")
        self._decide = Script(redis, "app.approval", "decide")
        self._expire = Script(redis, "app.approval", "expire")
        self._ack = Script(redis, "app.approval", "ack")
        self._watch = Script(redis, "app.approval", "watch")
        self._complete = Script(redis, "app.approval", "complete")
        self._mark_channel = Script(redis, "app.approval", "mark_channel")

    def shard_for(self, user_id: str) -> int:
        """The shard a new approval of this user lives in (its id names it)."""
        return self._space.shard_of(user_id)

    def _approval_keys(self, approval_id: str) -> ApprovalKeySet | None:
        shard = self.keys.shard_of(approval_id)
        return None if shard is None else self.keys.approval(approval_id, shard)

    def delivered_channel(self, approval_id: str) -> str | None:
        """Where each channel that reaches the person is announced (the browser's stream)."""
        keys = self._approval_keys(approval_id)
        return None if keys is None else keys.delivered

    # --- creating ------------------------------------------------------------------------

    async def create(
        self,
        approval: PendingApproval,
        request_event: bytes,
        audit_line: bytes,
        delivery: Delivery | None = None,
        planned_with: Snapshot | None = None,
        superseding: tuple[str, bytes] | None = None,
    ) -> Created | Backoff | Changed | StillPending:
        """Store a new pending approval, ending the user's pending one, unless backed off.

        In the same step `request_event` is published to the user's devices, `audit_line`
        appended to the audit stream, and the `delivery` jobs are queued. `superseding` is
        (id, audit line) of the pending approval the caller expects to replace, None for
        none: if the user's pending approval is another, nothing happens (StillPending).
        With `planned_with`, nothing happens unless the user's account version and
        connected devices are still those (Changed).
        """
        now = self._clock.now()
        shard = self.shard_for(approval.user_id)
        old_id, superseded_line = superseding or ("", b"")
        delivery = delivery or Delivery()
        (kind, value, expired_old), acked = await self._create.replicated(
            self._create_keys(approval, shard, old_id),
            self._create_args(approval, now, old_id, delivery, planned_with, request_event,
                              audit_line, superseded_line),
            replicas=self._durability.replicas,
            wait_ms=self._durability.wait_ms,
        )
        if kind == "created":
            self._check_replicated("create", acked)
        if kind == "changed":
            return Changed(Snapshot.from_lua(value.split("\n")))
        if kind == "pending":
            return StillPending(value)
        if expired_old:
            metrics.approval_ended(Status.EXPIRED.value, 0.0)
        if kind == "backoff":
            return Backoff(max(1, int(value)))
        metrics.APPROVALS_CREATED.labels(approval.kind).inc()
        if value:
            metrics.approval_ended(Status.EXPIRED.value, 0.0)
        return Created(value or None)

    def _create_keys(self, approval: PendingApproval, shard: int, old_id: str) -> dict[str, str]:
        """The create script's KEYS (see create.lua)."""
        mine = self.keys.approval(approval.id, shard)
        old = self.keys.approval(old_id, shard) if old_id else mine
        user = self.keys.user(approval.user_id)
        jobs = self._jobs.keys(shard)
        return {
            "approval": mine.hash,
            "inflight": mine.inflight,
            "pending": user.pending,
            "fatigue": user.fatigue,
            "deadlines": self.keys.deadlines(shard),
            "presence": self._space.presence(approval.user_id),
            "account_version": self._space.account_version(approval.user_id),
            "processes": self._space.processes(shard),
            "jobs_due": jobs.due,
            "jobs_data": jobs.data,
            "audit": self._space.audit(shard),
            "old_approval": old.hash,
            "old_acks": old.acks,
            "old_waiters": old.waiters,
        }

    def _create_args(
        self,
        approval: PendingApproval,
        now: float,
        old_id: str,
        delivery: Delivery,
        planned_with: Snapshot | None,
        request_event: bytes,
        audit_line: bytes,
        superseded_line: bytes,
    ) -> dict[str, str | bytes | int]:
        """The create script's ARGV (see create.lua)."""
        fields = approval.to_fields()
        if delivery.ack_check:
            fields["ack_check"] = orjson.dumps(delivery.ack_check).decode()
        return {
            "id": approval.id,
            "old_id": old_id,
            "now": repr(now),
            "expires_at": repr(approval.expires_at),
            "keep": keep_seconds(approval, now),
            "fields": orjson.dumps([item for pair in fields.items() for item in pair]),
            "tickets": orjson.dumps(delivery.tickets),
            "jobs": orjson.dumps([job.lua() for job in delivery.jobs]),
            "planned_with": planned_with.lua() if planned_with is not None else "",
            "process_ttl": PROCESS_TTL,
            "backoff_schedule": _BACKOFF_SCHEDULE,
            "final_keep": FINAL_STATE_KEEP,
            "user_channel": self._space.user_channel(approval.user_id),
            "request_event": request_event,
            "audit_line": audit_line,
            "superseded_line": superseded_line,
            "wake": self._jobs.wake_channel(self.shard_for(approval.user_id)),
            "timeout_reason": end_reason(TIMED_OUT),
            "superseded_reason": end_reason(SUPERSEDED),
        }

    def _check_replicated(self, step: str, acked: int) -> None:
        if acked < self._durability.replicas:
            metrics.UNREPLICATED.labels(step).inc()
            log.warning(
                "%s acknowledged by %d of %d replicas within %d ms",
                step, acked, self._durability.replicas, self._durability.wait_ms,
            )

    # --- reading -------------------------------------------------------------------------

    async def get(self, approval_id: str) -> PendingApproval | None:
        """The approval as stored (pending or final), or None when unknown or long gone."""
        keys = self._approval_keys(approval_id)
        if keys is None:
            return None
        fields: dict[str, str] = await self._redis.hgetall(keys.hash)  # type: ignore[assignment]
        return PendingApproval.from_fields(fields) if fields else None

    async def watch(self, approval_id: str, inbox: str) -> PendingApproval | None:
        """Like `get`, and while the approval is pending the end is announced on `inbox`
        (a process's channel, app.store.waiters), registered in the same atomic step."""
        keys = self._approval_keys(approval_id)
        if keys is None:
            return None
        flat: list[str] = await self._watch(
            {"approval": keys.hash, "waiters": keys.waiters}, {"inbox": inbox}
        )
        if not flat:
            return None
        return PendingApproval.from_fields(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def pending_for_user(self, user_id: str) -> PendingApproval | None:
        """The user's one pending approval, if it is still pending."""
        approval_id: str | None = await self._redis.get(self.keys.user(user_id).pending)  # type: ignore[assignment]
        approval = await self.get(approval_id) if approval_id else None
        if approval is None or approval.status is not Status.PENDING:
            return None
        if approval.expires_at <= self._clock.now():
            await self.expire_if_due(approval)
            return None
        return approval

    async def acked_devices(self, approval_id: str) -> set[str]:
        """The devices that acknowledged the approval's request."""
        keys = self._approval_keys(approval_id)
        if keys is None:
            return set()
        members: set[str] = await self._redis.smembers(keys.acks)  # type: ignore[assignment]
        return members

    async def delivered(self, approval_id: str) -> list[str]:
        """The channels that reached the person so far (each once)."""
        keys = self._approval_keys(approval_id)
        raw = await self._redis.hget(keys.hash, "delivered") if keys is not None else None
        found: list[str] = orjson.loads(raw) if raw else []
        return found

    async def fatigue(self, user_id: str) -> tuple[int, float]:
        """(failures, next_at) of the user's push-fatigue backoff."""
        data = await self._redis.hgetall(self.keys.user(user_id).fatigue)
        return int(data.get("failures", 0)), float(data.get("next_at", 0))

    async def clear_fatigue(self, user_id: str) -> None:
        """Forget the user's failures (an operator unlocked them)."""
        await self._redis.delete(self.keys.user(user_id).fatigue)

    # --- ending --------------------------------------------------------------------------

    async def decide(
        self,
        approval: PendingApproval,
        outcome: Outcome,
        *,
        audit_line: bytes,
        decided_by: str = "",
    ) -> DecideResult:
        """Try to end `approval` (as the caller read it) with `outcome`; exactly one caller
        ever wins, and only the winner's `audit_line` is appended."""
        keys = self._approval_keys(approval.id)
        if keys is None:
            return DecideResult("not_found", None)
        user = self.keys.user(approval.user_id)
        shard = keys.shard
        now = self._clock.now()
        (kind, status, ended_created_at), acked = await self._decide.replicated(
            {
                "approval": keys.hash,
                "acks": keys.acks,
                "waiters": keys.waiters,
                "deadlines": self.keys.deadlines(shard),
                "pending": user.pending,
                "fatigue": user.fatigue,
                "audit": self._space.audit(shard),
            },
            {
                "id": approval.id,
                "user_id": approval.user_id,
                "challenge": approval.challenge,
                "status": outcome.status.value,
                "decided_by": decided_by,
                "reason": end_reason(outcome),
                "now": repr(now),
                "keep": FINAL_STATE_KEEP,
                "backoff_schedule": _BACKOFF_SCHEDULE,
                "user_channel": self._space.user_channel(approval.user_id),
                "audit_line": audit_line,
                "timeout_reason": end_reason(TIMED_OUT),
            },
            replicas=self._durability.replicas,
            wait_ms=self._durability.wait_ms,
        )
        if kind == "decided":
            self._check_replicated("decide", acked)
        if ended_created_at:
            metrics.approval_ended(status, now - float(ended_created_at))
        return DecideResult(kind, Status(status) if status else None)

    async def expire_if_due(self, approval: PendingApproval) -> Status | None:
        """End the approval as expired if its deadline passed; returns its status now."""
        keys = self._approval_keys(approval.id)
        if keys is None:
            return None
        user = self.keys.user(approval.user_id)
        status, ended = await self._expire(
            {
                "approval": keys.hash,
                "acks": keys.acks,
                "waiters": keys.waiters,
                "deadlines": self.keys.deadlines(keys.shard),
                "pending": user.pending,
                "fatigue": user.fatigue,
            },
            {
                "id": approval.id,
                "user_id": approval.user_id,
                "now": repr(self._clock.now()),
                "keep": FINAL_STATE_KEEP,
                "backoff_schedule": _BACKOFF_SCHEDULE,
                "user_channel": self._space.user_channel(approval.user_id),
                "reason": end_reason(TIMED_OUT),
            },
        )
        if ended:
            metrics.approval_ended(Status.EXPIRED.value, 0.0)
        return None if status == "gone" else Status(status)

    async def expire_by_id(self, shard: int, approval_id: str) -> Status | None:
        """`expire_if_due` for an id from the shard's deadlines (the expiry sweeper)."""
        approval = await self.get(approval_id)
        if approval is None:
            await self._redis.zrem(self.keys.deadlines(shard), approval_id)
            return None
        return await self.expire_if_due(approval)

    async def due_for_expiry(self, shard: int, limit: int = 200) -> list[str]:
        """Ids of the shard's pending approvals whose deadline has passed."""
        ids: list[str] = await self._redis.zrangebyscore(  # type: ignore[assignment]
            self.keys.deadlines(shard), "-inf", repr(self._clock.now()), start=0, num=limit
        )
        return ids

    async def next_deadline(self, shard: int) -> float | None:
        """The earliest deadline of any pending approval of the shard."""
        first = await self._redis.zrange(self.keys.deadlines(shard), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def complete(self, approval_id: str) -> str:
        """Mark an approved login used: `ok`, `not_approved`, `already_completed`, `not_found`."""
        keys = self._approval_keys(approval_id)
        if keys is None:
            return "not_found"
        result: str = await self._complete({"approval": keys.hash}, {})
        return result

    # --- delivery bookkeeping ------------------------------------------------------------

    async def ack(self, approval_id: str, user_id: str, device_id: str) -> bool | None:
        """Record that a device of `user_id` received the request over its socket: True the
        first time, False after that or once it ended, None when the user has no such
        approval. The last connected device to ack cancels the ack check (Delivery)."""
        keys = self._approval_keys(approval_id)
        if keys is None:
            return None
        jobs = self._jobs.keys(keys.shard)
        added = await self._ack(
            {
                "approval": keys.hash,
                "acks": keys.acks,
                "inflight": keys.inflight,
                "jobs_due": jobs.due,
                "jobs_data": jobs.data,
            },
            {
                "user_id": user_id,
                "device": device_id,
                "channel": "websocket",
                "delivered_channel": keys.delivered,
                "delivered_event": delivered_event("websocket"),
            },
        )
        return None if added == -1 else bool(added)

    async def mark_sent(self, approval_id: str, channel: str) -> None:
        """Record that the request went out on `channel` (listed in `channels`)."""
        await self._mark(approval_id, channel, "channels", b"")

    async def mark_delivered(self, approval_id: str, channel: str) -> None:
        """Record that `channel` reached the person, and tell the waiting browser."""
        await self._mark(approval_id, channel, "delivered", delivered_event(channel))

    async def _mark(self, approval_id: str, channel: str, into: str, event: bytes) -> None:
        keys = self._approval_keys(approval_id)
        if keys is not None:
            await self._mark_channel(
                {"approval": keys.hash},
                {
                    "channel": channel,
                    "list": into,
                    "delivered_channel": keys.delivered,
                    "event": event,
                },
            )

    async def open_deliveries(
        self, approval: PendingApproval, jobs: list[PreparedJob], tickets: list[str]
    ) -> None:
        """Queue delivery `jobs` with their in-flight `tickets`, in one transaction."""
        keys = self._approval_keys(approval.id)
        if keys is None or not jobs:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            if tickets:
                pipe.sadd(keys.inflight, *tickets)
                pipe.expire(keys.inflight, keep_seconds(approval, self._clock.now()))
            self._jobs.store_in(pipe, keys.shard, jobs)
            await pipe.execute()

    async def close_delivery(self, approval_id: str, ticket: str) -> bool:
        """One delivery ended: True when it was the last under way and nothing reached the
        person (no ack, no channel delivered)."""
        keys = self._approval_keys(approval_id)
        if keys is None:
            return False
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(keys.inflight, ticket)
            pipe.scard(keys.inflight)
            pipe.scard(keys.acks)
            pipe.hget(keys.hash, "delivered")
            _, under_way, acked, delivered = await pipe.execute()
        return under_way == 0 and acked == 0 and not orjson.loads(delivered or "[]")

    async def count_resend(self, approval_id: str) -> int:
        """Count one more resend of the approval's request; the count so far."""
        keys = self._approval_keys(approval_id)
        if keys is None:
            return 0
        count: int = await self._redis.hincrby(keys.hash, "resends", 1)
        return count

    async def claim_sms_fallback(self, approval_id: str) -> bool:
        """True once per approval: the caller may send the automatic SMS fallback."""
        keys = self._approval_keys(approval_id)
        if keys is None:
            return False
        claimed: int = await self._redis.hsetnx(keys.hash, "sms_auto", "1")
        return bool(claimed)
