"""TAPPROVE_REDIS_SHARDS: a user's keys and their approvals' keys share one hash tag (what a
Redis Cluster needs of the scripts that touch them together), the approval id names it,
and everything works the same with several shards: sign-in, answer, long poll, the
audit writer, the expiry sweeper."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from app.core.clock import ManualClock
from tests.fixtures.app import LiveServer, Phone, ServerFactory
from tests.integration.test_login_loop import device_socket, next_frame
from tests.security.harness import api_key

pytestmark = pytest.mark.timeout(90)

SHARDS = 4


async def people(server: LiveServer, count: int) -> list[tuple[str, str, Phone]]:
    """(email, user id, phone) of `count` users, enough to land on every shard."""
    found = []
    for i in range(count):
        email = f"shard-{i}@example.com"
        user_id = await server.add_user(email)
        found.append((email, user_id, await server.enroll_phone(user_id)))
    return found


async def keys_tagged_with(server: LiveServer, text: str) -> dict[str, str]:
    """Every key of this server's prefix that names `text`, with the hash tag it carries."""
    found: dict[str, str] = {}
    async for key in server.services.redis.scan_iter(match=f"{server.settings.redis_prefix}*"):
        if text in key:
            found[key] = key[key.index("{") : key.index("}") + 1] if "{" in key else ""
    return found


async def test_an_approval_lives_in_its_users_shard_and_the_flow_works(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(redis_shards=SHARDS)
    svc = server.services
    key = await api_key(server)
    shards_used = set()
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}
    ) as rp:
        for email, user_id, phone in await people(server, 8):
            shard = svc.keys.shard_of(user_id)
            shards_used.add(shard)
            ws = await device_socket(server, phone)
            created = await rp.post("/api/v1/approvals", json={"user": email})
            assert created.status_code == 201, created.text
            approval_id = created.json()["approval_id"]
            assert int(approval_id[:2], 16) == shard  # the id names the user's shard

            tags = await keys_tagged_with(server, approval_id)
            tags |= await keys_tagged_with(server, user_id)
            assert set(tags.values()) == {f"{{s{shard}}}"}, tags

            request = await next_frame(ws, "approval_request")
            jws = phone.sign(request["approval"], number=created.json()["number"])
            await ws.send(json.dumps({"type": "decision", "jws": jws}))
            assert (await next_frame(ws, "decision_result"))["status"] == "approved"
            polled = await rp.get(f"/api/v1/approvals/{approval_id}?wait=5")
            assert polled.json()["status"] == "approved"
            await ws.close()
    assert len(shards_used) > 1
    await server.audit_filed()  # the writer files every shard's stream


async def test_the_sweeper_expires_approvals_in_every_shard(
    server_factory: ServerFactory,
) -> None:
    clock = ManualClock(time.time())
    server = await server_factory(redis_shards=SHARDS, clock=clock)
    svc = server.services
    started = {}
    for email, user_id, _ in await people(server, 8):
        browser = server.browser()
        response = await server.login(browser, email)
        assert response.status_code == 202, response.text
        started[response.json()["approval_id"]] = svc.keys.shard_of(user_id)
    assert len(set(started.values())) > 1
    clock.advance(server.settings.approval_ttl + 1)

    # Nobody asks about them: only the sweeper can end them.
    deadline = time.monotonic() + 20
    for approval_id in started:
        while (found := await svc.approvals.get(approval_id)) is None or found.status != "expired":
            assert time.monotonic() < deadline, f"{approval_id} was never swept"
            await asyncio.sleep(0.05)


async def test_an_approval_id_that_names_no_shard_is_not_found(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(redis_shards=SHARDS)
    _, _, phone = (await people(server, 1))[0]
    assert await server.services.approvals.get(f"{SHARDS:02x}" + "0" * 30) is None
    async with httpx.AsyncClient(base_url=server.url, headers=phone.auth) as client:
        answer = await client.get(f"/api/approvals/{SHARDS:02x}{'0' * 30}")
    assert answer.status_code == 404
