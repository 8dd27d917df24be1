"""Rate limits shared by every process: fixed-window counters in Redis."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from app.core.clock import Clock
from app.store.lua import Script
from app.store.redis import KeySpace


@dataclass(frozen=True)
class Verdict:
    """Whether a call may go ahead; if not, how long to wait."""

    allowed: bool
    retry_after: int


class RateLimiter:
    """`hit()` spends from a budget; `peek()` asks without spending."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, clock: Clock) -> None:
        self._redis = redis
        self._keys = keys
        self._clock = clock
        self._hit = Script(redis, "app.store", "ratelimit_hit")
        self._refund = Script(redis, "app.store", "ratelimit_refund")

    def key(self, *parts: str) -> str:
        """A counter of something that belongs to no user (an IP, an address typed in)."""
        return self._keys("rl", *parts)

    def user_key(self, user_id: str, *parts: str) -> str:
        """A counter of one user's calls (or of their approval's), under the user's shard
        tag: on a Redis Cluster it lives with their other keys, so a shard that is down
        stops only its own users."""
        return self._keys.in_shard(self._keys.shard_of(user_id), "rl", *parts)

    async def hit(self, key: str, *, limit: int, window: int, cost: int = 1) -> Verdict:
        """Count one call against `limit` per `window` seconds."""
        allowed, _count, ttl = await self._hit(
            {"counter": key}, {"limit": limit, "window": window, "cost": cost}
        )
        return Verdict(bool(allowed), 0 if allowed else max(1, int(ttl)))

    async def refund(self, key: str) -> None:
        """Give back one call spent by `hit()` (it turned out not to count)."""
        await self._refund({"counter": key}, {})

    async def peek(self, key: str, *, limit: int) -> Verdict:
        """Would one more call be over the limit?"""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.ttl(key)
            count, ttl = await pipe.execute()
        if int(count or 0) >= limit:
            return Verdict(False, max(1, int(ttl)))
        return Verdict(True, 0)

    async def reset(self, key: str) -> None:
        await self._redis.delete(key)
