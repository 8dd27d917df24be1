"""Rate limits shared by every process: fixed-window counters in Redis."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from app.core.clock import Clock
from app.store.redis import KeySpace

# KEYS: counter. ARGV: limit, window seconds, cost. Returns {allowed, count, ttl}.
_HIT = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
local limit, window, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if count + cost > limit then
  local ttl = redis.call('TTL', KEYS[1])
  if ttl < 0 then ttl = window end
  return {0, count, ttl}
end
count = redis.call('INCRBY', KEYS[1], cost)
if count == cost then redis.call('EXPIRE', KEYS[1], window) end
return {1, count, redis.call('TTL', KEYS[1])}
"""


# KEYS: counter. Gives one call back, never below zero and never reviving an expired window.
_REFUND = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count > 0 then return redis.call('DECR', KEYS[1]) end
return 0
"""


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
        self._hit = redis.register_script(_HIT)
        self._refund = redis.register_script(_REFUND)

    def key(self, *parts: str) -> str:
        return self._keys("rl", *parts)

    async def hit(self, key: str, *, limit: int, window: int, cost: int = 1) -> Verdict:
        """Count one call against `limit` per `window` seconds."""
        allowed, _count, ttl = await self._hit(keys=[key], args=[limit, window, cost])
        return Verdict(bool(allowed), 0 if allowed else max(1, int(ttl)))

    async def refund(self, key: str) -> None:
        """Give back one call spent by `hit()` (it turned out not to count)."""
        await self._refund(keys=[key])

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
