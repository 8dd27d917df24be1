"""Approval audit lines travel through a Redis Stream, appended by the same Lua step as the
change they report, and a worker files them into SQL: each line once, none lost when a
writer dies, and readers (the activity list, `tapprove audit`) see lines not yet filed."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from app import audit_trail
from app.db import audit
from app.db.models import AuditEvent
from app.services import Services
from app.store.audit_stream import AuditStream
from tests.fixtures.app import LiveServer, Phone, ServerFactory, approval_for
from tests.integration.test_ops import run_cli

pytestmark = pytest.mark.timeout(90)


def stream_of(svc: Services, consumer: str) -> AuditStream:
    """The audit stream these tests' approvals go to (one shard unless configured)."""
    assert list(svc.keys.shards) == [0]
    return AuditStream(svc.redis, svc.keys, consumer, 0)

async def rows_for(server: LiveServer, approval_id: str) -> list[AuditEvent]:
    """The approval's `approval.*` rows in SQL (the lines that come through the stream)."""
    async with server.services.db() as db:
        found = await db.exec(
            select(AuditEvent)
            .where(AuditEvent.approval_id == approval_id)
            .where(col(AuditEvent.kind).startswith("approval."))
            .order_by(col(AuditEvent.id))
        )
        return list(found.all())


async def signed_in_with_approval(
    server: LiveServer, email: str
) -> tuple[httpx.AsyncClient, Phone, str]:
    """A browser signed in through a phone approval; returns it, the phone, the approval id."""
    user_id = await server.add_user(email)
    phone = await server.enroll_phone(user_id)
    browser = server.browser()
    started = await server.login(browser, email)
    assert started.status_code == 202, started.text
    approval = await approval_for(phone, server)
    async with httpx.AsyncClient(base_url=server.url, headers=phone.auth) as app:
        decided = await app.post(
            f"/api/approvals/{approval['id']}/decision",
            json={"jws": phone.sign(approval, "approve", started.json()["number"])},
        )
    assert decided.status_code == 200, decided.text
    done = await browser.post(f"/api/login/{approval['id']}/complete")
    assert done.status_code == 200, done.text
    return browser, phone, approval["id"]


async def test_an_approval_s_lines_are_filed_into_sql_once_each(server: LiveServer) -> None:
    _, phone, approval_id = await signed_in_with_approval(server, "filed@example.com")
    await server.audit_filed()

    rows = await rows_for(server, approval_id)
    assert [r.kind for r in rows] == ["approval.created", "approval.decided"]
    created, decided = rows
    assert created.ip == "127.0.0.1" and json.loads(created.detail)["kind"] == "login"
    assert decided.device_id == phone.device_id
    assert json.loads(decided.detail) == {"reason": "", "status": "approved"}
    assert all(r.stream_id for r in rows)
    svc = server.services
    assert await svc.redis.xlen(stream_of(svc, "reader").key) == 0


async def test_the_activity_list_shows_lines_no_worker_has_filed_yet(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(run_worker=False)
    browser, _, approval_id = await signed_in_with_approval(server, "early@example.com")

    before = (await browser.get("/api/account/activity")).json()["events"]
    assert await rows_for(server, approval_id) == []  # nothing filed: no worker runs
    await server.audit_filed()  # files them itself
    after = (await browser.get("/api/account/activity")).json()["events"]

    def of_this_approval(events: list[dict[str, Any]]) -> list[str]:
        return [
            e["kind"]
            for e in events
            if e["approval_id"] == approval_id and e["kind"].startswith("approval.")
        ]

    assert of_this_approval(before) == ["approval.decided", "approval.created"]
    assert of_this_approval(after) == ["approval.decided", "approval.created"]
    assert len(await rows_for(server, approval_id)) == 2


async def test_a_line_copied_twice_is_stored_once(server_factory: ServerFactory) -> None:
    server = await server_factory(run_worker=False)
    _, _, approval_id = await signed_in_with_approval(server, "twice@example.com")
    svc = server.services
    lines = await stream_of(svc, "reader").newest(100)
    # Oldest first, as a writer reads them.
    mine = [line for line in reversed(lines) if line.fields.get("approval_id") == approval_id]
    assert len(mine) == 2

    for _ in range(2):  # a writer that died after its commit, and the one that took over
        async with svc.db() as db:
            await audit.insert_streamed(db, mine)
            await db.commit()

    assert [r.kind for r in await rows_for(server, approval_id)] == [
        "approval.created",
        "approval.decided",
    ]


async def test_lines_a_dead_writer_took_are_filed_by_another(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_trail, "RECLAIM_IDLE_MS", 200)
    monkeypatch.setattr(audit_trail, "RECLAIM_EVERY", 0.1)
    quiet = await server_factory(run_worker=False)
    _, _, approval_id = await signed_in_with_approval(quiet, "orphan@example.com")
    svc = quiet.services
    dead = stream_of(svc, "writer-that-died")
    await dead.ensure_group()
    taken = await dead.read_new(count=100, block_ms=None)  # ... and it never files them
    assert {line.fields.get("approval_id") for line in taken} >= {approval_id}

    await server_factory(run_worker=True)  # a live writer on the same Redis and database

    async def filed() -> int:
        return len(await rows_for(quiet, approval_id))

    deadline = time.monotonic() + 30
    while await filed() < 2:
        assert time.monotonic() < deadline, "the orphaned lines were never filed"
        await asyncio.sleep(0.05)
    assert await svc.redis.xlen(dead.key) == 0


async def test_tapprove_audit_files_waiting_lines_first(server_factory: ServerFactory) -> None:
    server = await server_factory(run_worker=False)
    _, phone, approval_id = await signed_in_with_approval(server, "cli@example.com")

    listed = await asyncio.to_thread(
        run_cli, server, "audit", "--user", "cli@example.com", "--json"
    )

    assert listed.returncode == 0, listed.stderr.decode()
    events = json.loads(listed.stdout)["events"]
    decided = [e for e in events if e["kind"] == "approval.decided"]
    assert [(e["approval_id"], e["device_id"]) for e in decided] == [
        (approval_id, phone.device_id)
    ]
    assert len(await rows_for(server, approval_id)) == 2
