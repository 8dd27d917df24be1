"""A small durable job queue in Redis: delayed jobs, leases, retries, one queue per shard.

`due` (ZSET, score = run at) holds waiting jobs; `claim` moves due ones to `leased`
(ZSET, score = lease end) atomically, so two workers never take the same job; a job whose
worker died is put back when its lease ends. Job bodies live in a hash by id. Each shard
(app.store.redis.KeySpace) has its own three keys, so a script that creates an approval can
queue its jobs in the same step; workers claim from every shard. Scripts that queue or
cancel jobs use the `schedule` Lua library (app/store/scripts/schedule.lua).
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
from app.store.redis import KeySpace, is_cluster

LEASE_SECONDS = 30


@dataclass(frozen=True)
class Job:
    """One unit of delivery work, from the queue of `shard`."""

    id: str
    kind: str
    payload: dict[str, Any]
    attempt: int = 0
    shard: int = 0


@dataclass(frozen=True)
class PreparedJob:
    """A job to be stored together with another change (by a script, or `store_in`)."""

    id: str
    body: str
    run_at: float

    def lua(self) -> list[object]:
        """The form the `schedule` Lua library takes: {id, body, run_at}."""
        return [self.id, self.body, repr(self.run_at)]


@dataclass(frozen=True)
class JobKeys:
    """The keys of one shard's queue."""

    due: str
    leased: str
    data: str


def _body(kind: str, payload: dict[str, Any], attempt: int) -> str:
    return orjson.dumps({"kind": kind, "payload": payload, "attempt": attempt}).decode()


class JobQueue:
    """Enqueue, claim, finish and retry jobs."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, clock: Clock) -> None:
        self._redis = redis
        self._space = keys
        self._clock = clock
        self._sharded = is_cluster(redis)
        self._claim = Script(redis, "app.store", "jobs_claim")

    def keys(self, shard: int) -> JobKeys:
        """The keys of the queue of `shard`."""
        return JobKeys(
            due=self._space.in_shard(shard, "jobs", "due"),
            leased=self._space.in_shard(shard, "jobs", "leased"),
            data=self._space.in_shard(shard, "jobs", "data"),
        )

    def wake_channel(self, shard: int) -> str:
        """Published when a job of `shard` is due at once (workers listen to every shard's)."""
        return self._space.in_shard(shard, "jobs", "wake")

    @property
    def wake_channels(self) -> list[str]:
        return [self.wake_channel(shard) for shard in self.shards]

    @property
    def shards(self) -> range:
        return self._space.shards

    def prepare(
        self, kind: str, payload: dict[str, Any], *, run_at: float | None = None, attempt: int = 0
    ) -> PreparedJob:
        """A job to store with another change; it runs at `run_at` (now by default)."""
        at = self._clock.now() if run_at is None else run_at
        return PreparedJob(new_id(), _body(kind, payload, attempt), at)

    async def enqueue(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        shard: int,
        run_at: float | None = None,
        attempt: int = 0,
    ) -> None:
        """Store a job in the queue of `shard`, to run at `run_at` (now by default)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            job = self.prepare(kind, payload, run_at=run_at, attempt=attempt)
            self.store_in(pipe, shard, [job])
            await pipe.execute()

    def store_in(self, pipe: Pipeline, shard: int, jobs: list[PreparedJob]) -> None:
        """Add the commands that store `jobs` to `pipe`, so they go with the caller's own."""
        keys = self.keys(shard)
        now = self._clock.now()
        for job in jobs:
            pipe.hset(keys.data, job.id, job.body)
            pipe.zadd(keys.due, {job.id: job.run_at})
        if any(job.run_at <= now for job in jobs):
            if self._sharded:
                pipe.spublish(self.wake_channel(shard), b"1")
            else:
                pipe.publish(self.wake_channel(shard), b"1")

    async def claim(self, shard: int, limit: int = 50) -> list[Job]:
        """Take up to `limit` due jobs of `shard` under a lease."""
        now = self._clock.now()
        keys = self.keys(shard)
        flat = await self._claim(
            {"due": keys.due, "leased": keys.leased, "data": keys.data},
            {"now": repr(now), "lease_until": repr(now + LEASE_SECONDS), "limit": limit},
        )
        jobs = []
        for i in range(0, len(flat), 2):
            body = orjson.loads(flat[i + 1])
            attempt = int(body.get("attempt", 0))
            jobs.append(Job(flat[i], body["kind"], body["payload"], attempt, shard))
        return jobs

    async def done(self, job: Job) -> None:
        keys = self.keys(job.shard)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.leased, job.id)
            pipe.hdel(keys.data, job.id)
            await pipe.execute()

    async def next_due(self, shard: int) -> float | None:
        first = await self._redis.zrange(self.keys(shard).due, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def depth(self) -> int:
        """Jobs stored in every shard (waiting, leased or due)."""
        return sum([await self._redis.hlen(self.keys(shard).data) for shard in self.shards])
