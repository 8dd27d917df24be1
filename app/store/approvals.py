"""Pending approvals in Redis. Every state change is one Lua script, so any number of
processes racing on one approval see exactly one winner, and the event announcing the
change is published in the same atomic step (nobody sees a state without its event).
The scripts also say when this call was the one that ended an approval, so its end is
counted exactly once (app.metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import orjson
import redis.asyncio as aioredis

from app import metrics
from app.core.approvals import DEFAULT_REASONS, PendingApproval, Status
from app.core.clock import Clock
from app.core.fatigue import BACKOFF_BASE, BACKOFF_CAP
from app.store.audit_stream import APPEND_LUA
from app.store.jobs import SCHEDULE_LUA, PreparedJob
from app.store.presence import SNAPSHOT_LUA, Snapshot
from app.store.redis import KeySpace

# How long a final state stays readable, so late callers get 409/410 rather than 404.
FINAL_STATE_KEEP = 300

# finalize(prefix, id, status, now, decided_by, reason): shared by every script below.
# Every end is stored and announced with a reason: the caller's, else the status's default
# (app.core.approvals.DEFAULT_REASONS, written into the script as DEFAULT_REASONS).
_FINALIZE = """
local function finalize(prefix, id, status, now, decided_by, reason, base, cap)
  local key = prefix .. 'approval:' .. id
  local uid = redis.call('HGET', key, 'user_id')
  if reason == '' then reason = (DEFAULT_REASONS)[status] end
  redis.call('HSET', key, 'status', status, 'decided_at', now, 'reason', reason)
  if decided_by ~= '' then redis.call('HSET', key, 'decided_by', decided_by) end
  redis.call('EXPIRE', key, KEEP)
  redis.call('EXPIRE', key .. ':acks', KEEP)
  redis.call('ZREM', prefix .. 'approvals:deadlines', id)
  local pending_key = prefix .. 'user:' .. uid .. ':pending'
  if redis.call('GET', pending_key) == id then redis.call('DEL', pending_key) end
  local fatigue = prefix .. 'user:' .. uid .. ':fatigue'
  if status == 'approved' then
    redis.call('DEL', fatigue)
  else
    local n = redis.call('HINCRBY', fatigue, 'failures', 1)
    local wait = math.min(cap, base * math.pow(2, n - 1))
    redis.call('HSET', fatigue, 'next_at', tonumber(now) + wait)
    redis.call('EXPIRE', fatigue, 86400)
  end
  -- The processes waiting for this end hear it in their inboxes (app.store.waiters);
  -- decided_at travels as the string stored above, so waiters render the same time.
  local ended = cjson.encode({type = 'result', id = id, status = status, decided_at = now,
    reason = reason})
  for _, process in ipairs(redis.call('SMEMBERS', key .. ':waiters')) do
    redis.call('PUBLISH', prefix .. 'ev:proc:' .. process, ended)
  end
  redis.call('DEL', key .. ':waiters')
  redis.call('PUBLISH', prefix .. 'ev:user:' .. uid,
    cjson.encode({type = 'approval_resolved', id = id, status = status, reason = reason}))
end
""".replace("KEEP", str(FINAL_STATE_KEEP)).replace(
    "DEFAULT_REASONS",
    "{" + ", ".join(f"{status.value} = '{why}'" for status, why in DEFAULT_REASONS.items()) + "}",
)

# KEYS: new approval key, its in-flight deliveries set. ARGV: prefix, now, id, user_id,
# expires_at, keep_seconds, base, cap, request_event_json, audit line, caller's ip,
# delivery jobs (JSON list of {id, body, run_at}), delivery tickets (JSON list), the
# snapshot the caller planned with ('' to skip the check), then field/value pairs.
# Returns {'changed', current snapshot, ''} without creating anything when the user's
# account version or connected devices are no longer what the caller planned with.
_CREATE = (
    _FINALIZE
    + APPEND_LUA
    + SCHEDULE_LUA
    + SNAPSHOT_LUA
    + """
local prefix, now, id, uid = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local expires_at, keep, base, cap = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local pending_key = prefix .. 'user:' .. uid .. ':pending'
local old = redis.call('GET', pending_key)
-- A retried call (the reply was lost) must not supersede the approval it created.
if old == id then return {'created', '', ''} end
if ARGV[14] ~= '' then
  local current = table.concat(snapshot(prefix, uid), '\\n')
  if current ~= ARGV[14] then return {'changed', current, ''} end
end
local old_status = nil
local expired_old = ''
if old then
  old_status = redis.call('HGET', prefix .. 'approval:' .. old, 'status')
  local old_exp = tonumber(redis.call('HGET', prefix .. 'approval:' .. old, 'expires_at') or '0')
  if old_status == 'pending' and old_exp <= now then
    finalize(prefix, old, 'expired', ARGV[2], '', '', base, cap)
    old_status = 'expired'
    expired_old = old
  end
end
local fatigue_key = prefix .. 'user:' .. uid .. ':fatigue'
local next_at = tonumber(redis.call('HGET', fatigue_key, 'next_at') or '0')
if next_at > now then
  return {'backoff', tostring(math.ceil(next_at - now)), expired_old}
end
local superseded = ''
if old and old_status == 'pending' then
  finalize(prefix, old, 'expired', ARGV[2], '', 'superseded', base, cap)
  superseded = old
  audit(prefix, cjson.encode({at = now, kind = 'approval.superseded', user_id = uid,
    approval_id = old, ip = ARGV[11], detail = '{}'}))
end
local fields = {}
for i = 15, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], keep)
local tickets = cjson.decode(ARGV[13])
if #tickets > 0 then
  redis.call('SADD', KEYS[2], unpack(tickets))
  redis.call('EXPIRE', KEYS[2], keep)
end
enqueue_jobs(prefix, now, cjson.decode(ARGV[12]))
redis.call('SET', pending_key, id, 'EX', keep)
redis.call('ZADD', prefix .. 'approvals:deadlines', expires_at, id)
redis.call('PUBLISH', prefix .. 'ev:user:' .. uid, ARGV[9])
audit(prefix, ARGV[10])
return {'created', superseded, expired_old}
"""
)

# KEYS: approval key. ARGV: prefix, now, id, outcome, decided_by, reason, base, cap,
# audit line (appended only when this call decides).
# The third result is the approval's created_at when this call ended it, else ''.
_DECIDE = (
    _FINALIZE
    + APPEND_LUA
    + """
local prefix, now, id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found', '', ''} end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'pending' then return {'final', status, ''} end
local created_at = redis.call('HGET', KEYS[1], 'created_at')
if tonumber(redis.call('HGET', KEYS[1], 'expires_at')) <= now then
  finalize(prefix, id, 'expired', ARGV[2], '', '', tonumber(ARGV[7]), tonumber(ARGV[8]))
  return {'final', 'expired', created_at}
end
finalize(prefix, id, ARGV[4], ARGV[2], ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]))
audit(prefix, ARGV[9])
return {'decided', ARGV[4], created_at}
"""
)

# KEYS: approval key. ARGV: prefix, now, id, user id, device id, challenge, decision
# ('approve' | 'deny'), the phone's number in stored form ('' if it could not be one),
# reason, base, cap, the audit line if approved, the audit line if denied.
# A phone's answer checked and applied in one step, when its socket relayed the approval:
# owner, challenge and number are compared with the stored ones. 'stale' when the
# challenge differs (the caller then reads the approval and decides the long way).
# Returns {kind, status, created_at if this call ended it, reason, request_id}.
_DECIDE_KNOWN = (
    _FINALIZE
    + APPEND_LUA
    + """
local prefix, now, id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local f = redis.call('HMGET', KEYS[1], 'user_id', 'challenge', 'status', 'expires_at',
  'number', 'created_at', 'request_id')
if not f[1] or f[1] ~= ARGV[4] then return {'not_found', '', '', '', ''} end
if f[2] ~= ARGV[6] then return {'stale', '', '', '', ''} end
if f[3] ~= 'pending' then return {'final', f[3], '', '', ''} end
if tonumber(f[4]) <= now then
  finalize(prefix, id, 'expired', ARGV[2], '', '', tonumber(ARGV[10]), tonumber(ARGV[11]))
  return {'final', 'expired', f[6], '', ''}
end
local status, reason, line = 'denied', ARGV[9], ARGV[13]
if ARGV[7] == 'approve' then
  if ARGV[8] ~= '' and ARGV[8] == f[5] then
    status, reason, line = 'approved', '', ARGV[12]
  else
    reason = 'wrong_number'
  end
end
finalize(prefix, id, status, ARGV[2], ARGV[5], reason, tonumber(ARGV[10]), tonumber(ARGV[11]))
audit(prefix, line)
return {'decided', status, f[6], reason, f[7] or ''}
"""
)

# KEYS: approval key. ARGV: prefix, now, id, base, cap. Ends a pending approval past its deadline.
# Returns {status, '1' when this call ended it}.
_EXPIRE = (
    _FINALIZE
    + """
local prefix, now, id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  redis.call('ZREM', prefix .. 'approvals:deadlines', id)
  return {'gone', ''}
end
if status ~= 'pending' then return {status, ''} end
if tonumber(redis.call('HGET', KEYS[1], 'expires_at')) > now then return {'pending', ''} end
finalize(prefix, id, 'expired', ARGV[2], '', '', tonumber(ARGV[4]), tonumber(ARGV[5]))
return {'expired', '1'}
"""
)

# Appends ARGV[n] to the JSON list in hash field `field` unless present.
_ADD_TO_LIST = """
local function add_to_list(key, field, value)
  local items = cjson.decode(redis.call('HGET', key, field) or '[]')
  for _, item in ipairs(items) do if item == value then return false end end
  items[#items + 1] = value
  redis.call('HSET', key, field, cjson.encode(items))
  return true
end
"""

# KEYS: approval key, acks set, in-flight deliveries set. ARGV: device id, delivery channel,
# delivered event, user id, prefix. Once every connected phone the approval went to has
# acked, its ack check (a delivery job and its ticket, see Delivery.watch) is cancelled:
# nothing is left to push or text.
# Returns -1 when the approval is unknown or not the user's, 1 the first time, else 0.
_ACK = (
    _ADD_TO_LIST
    + SCHEDULE_LUA
    + """
local owner = redis.call('HGET', KEYS[1], 'user_id')
if not owner or owner ~= ARGV[4] then return -1 end
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
local added = redis.call('SADD', KEYS[2], ARGV[1])
if added == 1 then
  redis.call('EXPIRE', KEYS[2], redis.call('TTL', KEYS[1]))
  if add_to_list(KEYS[1], 'delivered', 'websocket') then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
  local check = redis.call('HGET', KEYS[1], 'ack_check')
  if check then
    check = cjson.decode(check)
    local all = true
    for _, device in ipairs(check.devices) do
      if redis.call('SISMEMBER', KEYS[2], device) == 0 then all = false end
    end
    if all then
      cancel_job(ARGV[5], check.job)
      redis.call('SREM', KEYS[3], check.ticket)
      redis.call('HDEL', KEYS[1], 'ack_check')
    end
  end
end
return added
"""
)

# KEYS: approval key, its waiters set. ARGV: process id. The approval's fields, and while it
# is pending this process is registered to hear of its end (see finalize).
_WATCH = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields > 0 and redis.call('HGET', KEYS[1], 'status') == 'pending' then
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], redis.call('TTL', KEYS[1]))
end
return fields
"""

# KEYS: approval key. Marks a login approval completed once.
_COMPLETE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'not_found' end
if status ~= 'approved' then return 'not_approved' end
if redis.call('HGET', KEYS[1], 'completed') == '1' then return 'already_completed' end
redis.call('HSET', KEYS[1], 'completed', '1')
return 'ok'
"""

# KEYS: approval key. ARGV: channel, delivery channel, event, which list ("channels"/"delivered").
_CHANNEL = (
    _ADD_TO_LIST
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
-- The browser hears of each channel once, however many devices it reached.
local added = add_to_list(KEYS[1], ARGV[4], ARGV[1])
if ARGV[4] == 'delivered' then add_to_list(KEYS[1], 'channels', ARGV[1]) end
if added and ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 1
"""
)


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
class KnownDecision:
    """What a one-step decision did (ApprovalStore.decide_known)."""

    kind: Literal["decided", "final", "not_found", "stale"]
    status: Status | None
    reason: str = ""
    request_id: str | None = None  # of the request that started the approval


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
class Backoff:
    """Push-fatigue backoff: the user may get a new approval in `retry_after` seconds."""

    retry_after: int


@dataclass(frozen=True)
class DecideResult:
    """What an atomic decide did: `decided` (this caller won) or found it `final` already."""

    kind: Literal["decided", "final", "not_found"]
    status: Status | None


class ApprovalStore:
    """Reads and atomically changes pending approvals held in Redis."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, clock: Clock) -> None:
        self._redis = redis
        self._keys = keys
        self._clock = clock
        self._create = redis.register_script(_CREATE)
        self._decide = redis.register_script(_DECIDE)
        self._decide_known = redis.register_script(_DECIDE_KNOWN)
        self._expire = redis.register_script(_EXPIRE)
        self._ack = redis.register_script(_ACK)
        self._complete = redis.register_script(_COMPLETE)
        self._watch = redis.register_script(_WATCH)
        self._channel = redis.register_script(_CHANNEL)

    async def create(
        self,
        approval: PendingApproval,
        request_event: bytes,
        audit_line: bytes,
        delivery: Delivery | None = None,
        planned_with: Snapshot | None = None,
    ) -> Created | Backoff | Changed:
        """Store a new pending approval, superseding the user's previous one, unless backed off.

        In the same step `request_event` is published to the user's devices, `audit_line`
        appended to the audit stream (with an `approval.superseded` line for the old one),
        and the `delivery` jobs are queued. With `planned_with`, nothing happens unless the
        user's account version and connected devices are still those (else Changed).
        """
        now = self._clock.now()
        keep = int(approval.expires_at - now) + FINAL_STATE_KEEP
        delivery = delivery or Delivery()
        fields = approval.to_fields()
        if delivery.ack_check:
            fields["ack_check"] = orjson.dumps(delivery.ack_check).decode()
        flat: list[str] = []
        for name, value in fields.items():
            flat += [name, value]
        result = await self._create(
            keys=[self._keys.approval(approval.id), self._keys.approval_inflight(approval.id)],
            args=[
                self._keys.prefix,
                repr(now),
                approval.id,
                approval.user_id,
                repr(approval.expires_at),
                keep,
                BACKOFF_BASE,
                BACKOFF_CAP,
                request_event,
                audit_line,
                approval.context.ip,
                orjson.dumps([job.lua() for job in delivery.jobs]),
                orjson.dumps(delivery.tickets),
                planned_with.lua() if planned_with is not None else "",
                *flat,
            ],
        )
        kind, value, expired_old = result[0], result[1], result[2]
        if kind == "changed":
            return Changed(Snapshot.from_lua(value.split("\n")))
        if expired_old:
            metrics.approval_ended(Status.EXPIRED.value, 0.0)
        if kind == "backoff":
            return Backoff(max(1, int(value)))
        metrics.APPROVALS_CREATED.labels(approval.kind).inc()
        if value:
            metrics.approval_ended(Status.EXPIRED.value, 0.0)
        return Created(value or None)

    async def get(self, approval_id: str) -> PendingApproval | None:
        """The approval as stored (pending or final), or None when unknown or long gone."""
        if not _plausible_id(approval_id):
            return None
        fields: dict[str, str] = await self._redis.hgetall(self._keys.approval(approval_id))  # type: ignore[assignment]
        if not fields:
            return None
        return PendingApproval.from_fields(fields)

    async def watch(self, approval_id: str, process_id: str) -> PendingApproval | None:
        """Like `get`, and while the approval is pending `process_id` hears of its end in
        its inbox (app.store.waiters), from the same atomic step."""
        if not _plausible_id(approval_id):
            return None
        flat: list[str] = await self._watch(
            keys=[self._keys.approval(approval_id), self._keys.approval_waiters(approval_id)],
            args=[process_id],
        )
        if not flat:
            return None
        return PendingApproval.from_fields(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def decide(
        self,
        approval_id: str,
        status: Status,
        *,
        audit_line: bytes,
        device_id: str = "",
        reason: str = "",
    ) -> DecideResult:
        """Try to end a pending approval with `status`; exactly one caller ever wins, and
        only the winner's `audit_line` is appended."""
        now = self._clock.now()
        result = await self._decide(
            keys=[self._keys.approval(approval_id)],
            args=[
                self._keys.prefix,
                repr(now),
                approval_id,
                status.value,
                device_id,
                reason,
                BACKOFF_BASE,
                BACKOFF_CAP,
                audit_line,
            ],
        )
        kind, value, ended_created_at = result[0], result[1], result[2]
        if ended_created_at:
            metrics.approval_ended(value, now - float(ended_created_at))
        return DecideResult(kind, Status(value) if value else None)

    async def decide_known(
        self,
        approval_id: str,
        *,
        user_id: str,
        device_id: str,
        challenge: str,
        number: str | None,
        reason: str,
        lines: dict[Status, bytes],
    ) -> KnownDecision:
        """End a pending approval with a device's answer in one step: approve when `number`
        (None: the device denies) is the stored one, else deny (`wrong_number`); appends
        `lines[status]`. Checks owner and challenge; exactly one caller ever wins."""
        if not _plausible_id(approval_id):
            return KnownDecision("not_found", None)
        now = self._clock.now()
        result = await self._decide_known(
            keys=[self._keys.approval(approval_id)],
            args=[
                self._keys.prefix,
                repr(now),
                approval_id,
                user_id,
                device_id,
                challenge,
                "deny" if number is None else "approve",
                number or "",
                reason,
                BACKOFF_BASE,
                BACKOFF_CAP,
                lines.get(Status.APPROVED, b""),
                lines.get(Status.DENIED, b""),
            ],
        )
        kind, value, ended_created_at, why, request_id = result
        if ended_created_at:
            metrics.approval_ended(value, now - float(ended_created_at))
        return KnownDecision(kind, Status(value) if value else None, why, request_id or None)

    async def expire_if_due(self, approval_id: str) -> Status | None:
        """End the approval as expired if its deadline passed; returns its status now."""
        result = await self._expire(
            keys=[self._keys.approval(approval_id)],
            args=[
                self._keys.prefix,
                repr(self._clock.now()),
                approval_id,
                BACKOFF_BASE,
                BACKOFF_CAP,
            ],
        )
        status, ended = result[0], result[1]
        if ended:
            metrics.approval_ended(Status.EXPIRED.value, 0.0)
        return None if status == "gone" else Status(status)

    async def due_for_expiry(self, limit: int = 200) -> list[str]:
        """Ids of pending approvals whose deadline has passed."""
        ids: list[str] = await self._redis.zrangebyscore(  # type: ignore[assignment]
            self._keys.deadlines(), "-inf", repr(self._clock.now()), start=0, num=limit
        )
        return ids

    async def next_deadline(self) -> float | None:
        """The earliest deadline of any pending approval."""
        first = await self._redis.zrange(self._keys.deadlines(), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def pending_for_user(self, user_id: str) -> PendingApproval | None:
        """The user's one pending approval, if it is still pending."""
        approval_id: str | None = await self._redis.get(self._keys.user_pending(user_id))  # type: ignore[assignment]
        if not approval_id:
            return None
        approval = await self.get(approval_id)
        if approval is None or approval.status is not Status.PENDING:
            return None
        if approval.expires_at <= self._clock.now():
            await self.expire_if_due(approval_id)
            return None
        return approval

    async def ack(
        self, approval_id: str, user_id: str, device_id: str, delivered_event: bytes
    ) -> bool | None:
        """Record that a device of `user_id` received the request: True the first time,
        False after that or once it ended, None when the user has no such approval."""
        if not _plausible_id(approval_id):
            return None
        added = await self._ack(
            keys=[
                self._keys.approval(approval_id),
                self._keys.approval_acks(approval_id),
                self._keys.approval_inflight(approval_id),
            ],
            args=[
                device_id,
                self._keys.delivery_channel(approval_id),
                delivered_event,
                user_id,
                self._keys.prefix,
            ],
        )
        return None if added == -1 else bool(added)

    async def acked_devices(self, approval_id: str) -> set[str]:
        members: set[str] = await self._redis.smembers(self._keys.approval_acks(approval_id))  # type: ignore[assignment]
        return members

    async def mark_delivered(self, approval_id: str, channel: str, event: bytes) -> None:
        """Record that `channel` reached the user and tell the waiting browser."""
        await self._channel(
            keys=[self._keys.approval(approval_id)],
            args=[channel, self._keys.delivery_channel(approval_id), event, "delivered"],
        )

    async def mark_sent(self, approval_id: str, channel: str) -> None:
        """Record that the request went out on `channel` (listed in `channels`)."""
        await self._channel(
            keys=[self._keys.approval(approval_id)],
            args=[channel, self._keys.delivery_channel(approval_id), "", "channels"],
        )

    async def complete(self, approval_id: str) -> str:
        """Mark an approved login used: `ok`, `not_approved`, `already_completed`, `not_found`."""
        result: str = await self._complete(keys=[self._keys.approval(approval_id)])
        return result

    async def set_field(self, approval_id: str, name: str, value: str) -> None:
        await self._redis.hset(self._keys.approval(approval_id), name, value)

    async def fatigue(self, user_id: str) -> tuple[int, float]:
        """(failures, next_at) of the user's push-fatigue backoff."""
        data = await self._redis.hgetall(self._keys.user_fatigue(user_id))
        return int(data.get("failures", 0)), float(data.get("next_at", 0))

    async def clear_fatigue(self, user_id: str) -> None:
        await self._redis.delete(self._keys.user_fatigue(user_id))


def _plausible_id(approval_id: str) -> bool:
    return 0 < len(approval_id) <= 64 and approval_id.isalnum()
