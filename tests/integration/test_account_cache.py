"""Relying-party approvals read the user and their devices from a per-process cache that is
checked against the account's version in Redis on every use: once an account is cached a
new approval reads no user or device row, and a change made by another process or by the
CLI is seen by the very next approval."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from app.approval.model import ApprovalContext, new_approval
from app.approval.store import Changed, Created
from app.core.matching import MatchPolicy
from app.db import audit
from app.db.accounts import create_api_key
from app.delivery.push import Providers
from app.store.presence import Snapshot
from tests.fakes import wait_until
from tests.fakes.fcm import FakeFcm
from tests.fixtures.app import LiveServer, Phone, ServerFactory
from tests.integration.test_login_loop import device_socket, next_frame
from tests.integration.test_ops import run_cli
from tests.integration.test_push_delivery import decide_over_http, providers_for

pytestmark = pytest.mark.timeout(90)


async def rp_client(server: LiveServer) -> httpx.AsyncClient:
    async with server.services.db() as db:
        _, api_key = await create_api_key(db, f"rp-{time.monotonic_ns()}", now=time.time())
        await db.commit()
    client = httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    )
    server.clients.append(client)
    return client


async def approved(
    rp: httpx.AsyncClient, decider: LiveServer, phone: Phone, email: str
) -> dict[str, Any]:
    """An RP approval for `email`, approved by `phone` through `decider` (another process)."""
    created = await rp.post("/api/v1/approvals", json={"user": email})
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    answer = await decide_over_http(decider, phone, body["approval_id"], body["number"])
    assert answer.status_code == 200, answer.text
    return body


@contextmanager
def account_reads(server: LiveServer) -> Iterator[list[str]]:
    """SQL statements this server runs against the user and device tables meanwhile."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        lowered = statement.lower()
        if 'from "user"' in lowered or "from device" in lowered:
            seen.append(statement)

    engine = server.services.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def test_an_approval_for_a_cached_account_reads_no_user_or_device_row(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory()
    user_id = await server.add_user("cached@example.com")
    phone = await server.enroll_phone(user_id)
    rp = await rp_client(server)
    with account_reads(server) as first_sight:
        await approved(rp, server, phone, "cached@example.com")
    await approved(rp, server, phone, "cached@example.com")  # cached from here on
    with account_reads(server) as cached:
        created = await rp.post("/api/v1/approvals", json={"user": "cached@example.com"})
    assert created.status_code == 201, created.text
    assert first_sight, "the first approval reads the account from SQL"
    assert cached == []


async def test_a_push_token_registered_on_another_process_is_used_by_the_next_approval(
    server_factory: ServerFactory, fcm_env: dict[str, str], fake_fcm: FakeFcm
) -> None:
    providers = await providers_for(fcm_env)
    here = await server_factory(providers=providers)
    there = await server_factory(providers=providers)
    user_id = await here.add_user("token@example.com")
    phone = await here.enroll_phone(user_id)
    rp = await rp_client(here)
    await approved(rp, there, phone, "token@example.com")
    await approved(rp, there, phone, "token@example.com")

    async with httpx.AsyncClient(base_url=there.url, headers=phone.auth) as app:
        patched = await app.patch(
            "/api/devices/me", json={"push": {"provider": "fcm", "token": "fresh-token"}}
        )
    assert patched.status_code == 200, patched.text
    created = await rp.post("/api/v1/approvals", json={"user": "token@example.com"})

    assert created.status_code == 201, created.text
    assert created.json()["channels"] == ["fcm"]
    await wait_until(lambda: len(fake_fcm.requests) == 1, timeout=30)
    assert fake_fcm.requests[0].message["token"] == "fresh-token"


async def test_a_device_revoked_on_another_process_is_not_a_channel_of_the_next_approval(
    server_factory: ServerFactory, fcm_env: dict[str, str]
) -> None:
    providers = await providers_for(fcm_env)
    here = await server_factory(providers=providers)
    there = await server_factory(providers=providers)
    user_id = await here.add_user("revoke@example.com")
    answering = await here.enroll_phone(user_id)  # no push token: reached over HTTP here
    pushed = await here.enroll_phone(user_id, push={"provider": "fcm", "token": "gone"})
    rp = await rp_client(here)
    assert (await approved(rp, there, answering, "revoke@example.com"))["channels"] == ["fcm"]
    assert (await approved(rp, there, answering, "revoke@example.com"))["channels"] == ["fcm"]

    async with httpx.AsyncClient(base_url=there.url, headers=pushed.auth) as app:
        assert (await app.delete("/api/devices/me")).status_code == 200
    created = await rp.post("/api/v1/approvals", json={"user": "revoke@example.com"})

    assert created.status_code == 201, created.text
    assert created.json()["channels"] == []


async def test_a_fraud_report_on_another_process_locks_at_once_and_the_cli_unlocks_at_once(
    server_factory: ServerFactory,
) -> None:
    here = await server_factory(providers=Providers())
    there = await server_factory(providers=Providers())
    user_id = await here.add_user("fraud@example.com")
    phone = await here.enroll_phone(user_id)
    rp = await rp_client(here)
    await approved(rp, there, phone, "fraud@example.com")
    await approved(rp, there, phone, "fraud@example.com")

    created = await rp.post("/api/v1/approvals", json={"user": "fraud@example.com"})
    assert created.status_code == 201, created.text
    async with httpx.AsyncClient(base_url=there.url) as app:
        approval_id = created.json()["approval_id"]
        fetched = await app.get(f"/api/approvals/{approval_id}", headers=phone.auth)
        reported = await app.post(
            f"/api/approvals/{approval_id}/decision",
            json={"jws": phone.sign(fetched.json(), "deny", reason="fraud")},
            headers=phone.auth,
        )
    assert reported.status_code == 200, reported.text
    locked = await rp.post("/api/v1/approvals", json={"user": "fraud@example.com"})
    assert locked.status_code == 423 and locked.json()["error"] == "locked"

    unlocked = await asyncio.to_thread(run_cli, here, "user", "unlock", "fraud@example.com")
    assert unlocked.returncode == 0, unlocked.stderr.decode()
    reopened = await rp.post("/api/v1/approvals", json={"user": "fraud@example.com"})
    assert reopened.status_code == 201, reopened.text


async def test_a_phone_that_connected_since_the_last_approval_is_planned_for(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory()
    user_id = await server.add_user("fresh@example.com")
    phone = await server.enroll_phone(user_id)
    rp = await rp_client(server)
    assert (await approved(rp, server, phone, "fresh@example.com"))["channels"] == []
    assert (await approved(rp, server, phone, "fresh@example.com"))["channels"] == []

    ws = await device_socket(server, phone)  # the cached view still says: not connected
    created = await rp.post("/api/v1/approvals", json={"user": "fresh@example.com"})

    assert created.status_code == 201, created.text
    assert created.json()["channels"] == ["websocket"]
    request = await next_frame(ws, "approval_request")
    assert request["approval"]["id"] == created.json()["approval_id"]
    await ws.close()


async def test_the_create_step_creates_nothing_from_an_out_of_date_view(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory()
    svc = server.services
    user_id = await server.add_user("stale@example.com")
    now = svc.clock.now()
    approval = new_approval(
        user_id=user_id,
        kind="rp",
        ttl=60,
        policy=MatchPolicy.for_mode("typed"),
        context=ApprovalContext(ip="10.0.0.1", user_agent="ua", browser="b", os="o"),
        now=now,
        shard=svc.approvals.shard_for(user_id),
    )
    current = await svc.presence.snapshot(user_id)
    imagined = Snapshot(connected=frozenset({"a-phone-that-left"}), account_version="")

    outcome = await svc.approvals.create(
        approval, b"{}", audit.line("approval.created", now=now), planned_with=imagined
    )

    assert outcome == Changed(current)
    assert await svc.approvals.get(approval.id) is None
    assert await svc.approvals.pending_for_user(user_id) is None
    created = await svc.approvals.create(
        approval, b"{}", audit.line("approval.created", now=now), planned_with=current
    )
    assert isinstance(created, Created)
