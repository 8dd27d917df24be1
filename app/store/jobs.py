"""A small durable job queue in Redis: delayed jobs, leases, retries.

`due` (ZSET, score = run at) holds waiting jobs; `claim` moves due ones to `leased`
(ZSET, score = lease end) atomically, so two workers never take the same job; a job whose
worker died is put back when its lease ends. Job bodies live in a hash by id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from app.core.clock import Clock
from app.core.tokens import new_id
from app.store.lua import Script
from app.store.redis import KeySpace

LEASE_SECONDS = 30

# Lua for scripts that schedule or cancel jobs in the same atomic step as their own change.
# enqueue_jobs(prefix, now, jobs): jobs is a list of {id, body, run_at} (PreparedJob.lua()).
# cancel_job(prefix, id): a job not yet claimed never runs.
SCHEDULE_LUA = """
local function enqueue_jobs(prefix, now, jobs)
  local wake = false
  for _, job in ipairs(jobs) do
    redis.call('HSET', prefix .. 'jobs:data', job[1], job[2])
    redis.call('ZADD', prefix .. 'jobs:due', job[3], job[1])
    if tonumber(job[3]) <= now then wake = true end
  end
  if wake then redis.call('PUBLISH', prefix .. 'jobs:wake', '1') end
end
local function cancel_job(prefix, id)
  redis.call('ZREM', prefix .. 'jobs:due', id)
  redis.call('HDEL', prefix .. 'jobs:data', id)
end
"""

@dataclass(frozen=True)
class Job:
    """One unit of delivery work."""

    id: str
    kind: str
    payload: dict[str, Any]
    attempt: int = 0


@dataclass(frozen=True)
class PreparedJob:
    """A job to be stored by a Lua script (SCHEDULE_LUA) together with another change."""

    id: str
    body: str
    run_at: float

    def lua(self) -> list[object]:
        return [self.id, self.body, repr(self.run_at)]


def _body(kind: str, payload: dict[str, Any], attempt: int) -> bytes:
    return orjson.dumps({"kind": kind, "payload": payload, "attempt": attempt})


class JobQueue:
    """Enqueue, claim, finish and retry jobs."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, clock: Clock) -> None:
        self._redis = redis
        self._clock = clock
        # SCHEDULE_LUA builds the same names from the prefix.
        self._due = keys("jobs", "due")
        self._leased = keys("jobs", "leased")
        self._data = keys("jobs", "data")
        self.wake_channel = keys("jobs", "wake")
        self._claim = Script(redis, "app.store", "jobs_claim")

    async def enqueue(
        self, kind: str, payload: dict[str, Any], *, run_at: float | None = None, attempt: int = 0
    ) -> Job:
        """Store a job to run at `run_at` (now by default)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            job = self.enqueue_in(pipe, kind, payload, run_at=run_at, attempt=attempt)
            await pipe.execute()
        return job

    def enqueue_in(
        self,
        pipe: Pipeline,
        kind: str,
        payload: dict[str, Any],
        *,
        run_at: float | None = None,
        attempt: int = 0,
    ) -> Job:
        """Add the commands that store a job to `pipe`, so it is sent with the caller's own."""
        job = Job(new_id(), kind, payload, attempt)
        at = self._clock.now() if run_at is None else run_at
        body = _body(kind, payload, attempt)
        pipe.hset(self._data, job.id, body)
        pipe.zadd(self._due, {job.id: at})
        if run_at is None:
            pipe.publish(self.wake_channel, b"1")
        return job

    def prepare(
        self, kind: str, payload: dict[str, Any], *, run_at: float | None = None
    ) -> PreparedJob:
        """A job for a script to store (see SCHEDULE_LUA); it runs at `run_at` (now by default)."""
        at = self._clock.now() if run_at is None else run_at
        return PreparedJob(new_id(), _body(kind, payload, 0).decode(), at)

    async def claim(self, limit: int = 50) -> list[Job]:
        """Take up to `limit` due jobs under a lease."""
        now = self._clock.now()
        flat = await self._claim(
            {"due": self._due, "leased": self._leased, "data": self._data},
            {"now": repr(now), "lease_until": repr(now + LEASE_SECONDS), "limit": limit},
        )
        jobs = []
        for i in range(0, len(flat), 2):
            body = orjson.loads(flat[i + 1])
            jobs.append(Job(flat[i], body["kind"], body["payload"], int(body.get("attempt", 0))))
        return jobs

    async def done(self, job: Job) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._leased, job.id)
            pipe.hdel(self._data, job.id)
            await pipe.execute()

    async def next_due(self) -> float | None:
        first = await self._redis.zrange(self._due, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def depth(self) -> int:
        count: int = await self._redis.hlen(self._data)
        return count
