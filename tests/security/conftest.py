"""A server shared by every test of one module (the attack tests are many and each server
costs a fresh database and migration). Tests keep apart without forgetting anything: each
uses its own people (per-account limits and backoffs are theirs alone) and reaches the
server from a source IP of its own (per-IP limits are its own), so every rate limit and
backoff stays live from the first request of a test to its last."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.fixtures.app import LiveServer, loopback_address
from tests.fixtures.services import _create_database, _drop_database
from tests.security.harness import MakePerson, person, person_via_routes, running_server


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
async def server(shared: LiveServer) -> AsyncIterator[LiveServer]:
    """The module's server, its `browser()` clients coming from this test's own IP."""
    view = LiveServer(shared.url, shared.app, shared.settings, source_ip=loopback_address())
    yield view
    for client in view.clients:
        await client.aclose()


@pytest.fixture(params=["fixture", "routes"])
def make_person(request: pytest.FixtureRequest) -> MakePerson:
    """Each test that takes it runs twice: with a person made the fast way (`person`), and
    with one made only through the public routes (`person_via_routes`)."""
    if request.param == "fixture":
        return person
    return person_via_routes
