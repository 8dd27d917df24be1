"""API keys are cached per process for a few seconds: a revoked key stops working once the
cache entry expires, and an unknown key is never cached as valid."""

from __future__ import annotations

import time

import httpx
import pytest
from sqlmodel import select

from app.core.clock import ManualClock, to_datetime
from app.db.accounts import create_api_key
from app.db.models import ApiKey
from app.services import API_KEY_CACHE_SECONDS
from tests.fixtures.app import ServerFactory

pytestmark = pytest.mark.timeout(60)


async def test_a_revoked_key_is_refused_once_the_cache_entry_expires(
    server_factory: ServerFactory,
) -> None:
    clock = ManualClock(time.time())
    server = await server_factory(clock=clock)
    await server.add_user("cache@example.com")
    async with server.services.db() as db:
        key, api_key = await create_api_key(db, "vpn", now=clock.now())
        await db.commit()
    auth = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth) as rp:
        first = await rp.post("/api/v1/approvals", json={"user": "cache@example.com"})
        assert first.status_code == 201, first.text
        async with server.services.db() as db:
            row = (await db.exec(select(ApiKey).where(ApiKey.id == key.id))).one()
            row.revoked_at = to_datetime(clock.now())
            db.add(row)
            await db.commit()
        approval_id = first.json()["approval_id"]
        # Still inside the cache window: the key that was live a moment ago is accepted.
        assert (await rp.get(f"/api/v1/approvals/{approval_id}")).status_code == 200
        clock.advance(API_KEY_CACHE_SECONDS + 0.1)
        refused = await rp.get(f"/api/v1/approvals/{approval_id}")
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"


async def test_an_unknown_key_stays_unknown(server_factory: ServerFactory) -> None:
    server = await server_factory()
    auth = {"Authorization": "Bearer tap_" + "x" * 40}
    async with httpx.AsyncClient(base_url=server.url, headers=auth) as rp:
        for _ in range(2):
            answer = await rp.post("/api/v1/approvals", json={"user": "a@example.com"})
            assert answer.status_code == 401
    assert len(server.services.api_keys) == 0
