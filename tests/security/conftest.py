"""A server shared by every test of one module (the attack tests are many and each server
costs a fresh database and migration); tests keep apart by using their own people, and
rate limits and backoffs are forgotten before each test."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.fixtures.app import LiveServer
from tests.fixtures.services import _create_database, _drop_database
from tests.security.harness import clear_limits, running_server


@pytest.fixture(scope="module")
async def shared(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> AsyncIterator[LiveServer]:
    """One running server (real Redis prefix, fresh PostgreSQL) for the whole module."""
    prefix = f"tapprove-test-{secrets.token_hex(6)}:"
    name, url = await _create_database()
    try:
        async with running_server(tmp_path_factory.mktemp("shared"), redis_url, prefix, url) as (
            live,
            _,
        ):
            yield live
    finally:
        await _drop_database(name)
        client = aioredis.Redis.from_url(redis_url)
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            await client.delete(key)
        await client.aclose()


@pytest.fixture
async def server(shared: LiveServer) -> LiveServer:
    """The module's server, with rate limits and push-fatigue backoffs forgotten."""
    await clear_limits(shared)
    return shared
