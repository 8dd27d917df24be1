"""One-time codes at rest: a copy of Redis does not give away a short code."""

from __future__ import annotations

import os

import redis.asyncio as aioredis

from app.core.clock import ManualClock
from app.core.tokens import hash_token
from app.server_keys import KeyedHash
from app.store.codes import OneTimeCodes
from app.store.redis import KeySpace


def _codes(redis: aioredis.Redis, prefix: str, master: bytes) -> OneTimeCodes:
    return OneTimeCodes(
        redis, KeySpace(prefix, 1), ManualClock(1000.0), KeyedHash(master, "codes")
    )


async def test_a_stored_code_cannot_be_found_by_trying_every_code(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    master = os.urandom(32)
    codes = _codes(redis_client, redis_prefix, master)
    await codes.issue("sms-login", "approval-1", "123456", life=60, keep=120)
    stored = [
        value
        async for key in redis_client.scan_iter(match=f"{redis_prefix}*")
        for value in (await redis_client.hgetall(key)).values()
    ]
    # What an attacker with the Redis copy would compute for each of the million codes.
    assert hash_token("approval-1:123456") not in stored
    assert KeyedHash(master, "codes")("approval-1:123456") in stored
    assert (await codes.check("sms-login", "approval-1", "123456", max_attempts=5, keep=120)).right


async def test_a_server_with_another_secret_key_does_not_accept_the_code(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    await _codes(redis_client, redis_prefix, os.urandom(32)).issue(
        "phone", "user-1", "654321", life=60, keep=120
    )
    other = _codes(redis_client, redis_prefix, os.urandom(32))
    checked = await other.check("phone", "user-1", "654321", max_attempts=5, keep=120)
    assert checked.issued and not checked.right
