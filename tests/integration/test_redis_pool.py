"""The Redis connection pool waits for a free connection instead of failing, never opens
more than its limit, gives up with a 503-able ConnectionError after POOL_WAIT, and
survives a connection that is released twice."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.store import redis as store_redis
from app.store.redis import BoundedPool

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    pool = BoundedPool.from_url(redis_url, max_connections=2, decode_responses=True)
    redis = aioredis.Redis(connection_pool=pool)
    yield redis
    await redis.aclose(close_connection_pool=True)


async def test_more_callers_than_connections_wait_their_turn(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    key = redis_prefix + "queue"
    # Ten callers block in Redis for a moment each; only two connections exist.
    results = await asyncio.gather(*(client.blpop([key], timeout=0.1) for _ in range(10)))

    assert results == [None] * 10
    pool = client.connection_pool
    assert len(pool._available_connections) + len(pool._in_use_connections) == 2


async def test_a_caller_gives_up_when_no_connection_frees_in_time(
    client: aioredis.Redis,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_redis, "POOL_WAIT", 0.2)
    key = redis_prefix + "held"
    # Two callers block in BLPOP until this test pushes to the list: both connections stay
    # taken for as long as the test needs, however slow the machine.
    holders = [asyncio.create_task(client.blpop([key], timeout=0)) for _ in range(2)]
    pool = client.connection_pool
    deadline = time.monotonic() + 10
    while len(pool._in_use_connections) < 2:
        assert time.monotonic() < deadline, "the holders never took both connections"
        await asyncio.sleep(0.01)

    with pytest.raises(RedisConnectionError, match="No connection available"):
        await client.get(redis_prefix + "other")
    await redis_client.rpush(key, "a", "b")  # another client: this pool has none to spare
    assert sorted([tuple(await holder) for holder in holders]) == [(key, "a"), (key, "b")]
    assert await client.get(redis_prefix + "other") is None  # usable again


async def test_a_connection_released_twice_frees_one_permit(
    client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_redis, "POOL_WAIT", 0.1)
    pool = client.connection_pool
    first = await pool.get_connection()
    await pool.release(first)
    await pool.release(first)  # an error path releasing again must not add a permit

    held = [await pool.get_connection(), await pool.get_connection()]
    with pytest.raises(RedisConnectionError, match="No connection available"):
        await pool.get_connection()  # a third permit would have been one too many
    for connection in held:
        await pool.release(connection)
