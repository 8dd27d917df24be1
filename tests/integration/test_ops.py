"""Operations through a real server: health and readiness, Prometheus metrics, structured
logs with a request id that follows an approval, and `tapprove audit`.

Every in-process server shares one metrics registry, so metric checks compare a scrape
before and after, never absolute values (except gauges read from this test's database).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from app.core.clock import ManualClock, to_datetime
from app.core.tokens import new_id
from app.db.models import Device, OutboxMessage
from app.delivery.push import Providers
from app.logs import ConsoleFormatter, JsonFormatter, request_id_bound
from app.main import create_app
from app.settings import Settings
from tests.fakes import wait_until
from tests.fakes.fcm import FakeFcm
from tests.fixtures.app import PASSWORD, LiveServer, ServerFactory, approval_for
from tests.integration.test_login_loop import device_socket
from tests.integration.test_push_delivery import providers_for

pytestmark = pytest.mark.timeout(90)

WAIT = 30.0


class Scrape:
    """One `GET /metrics` answer, parsed."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                self.samples[key] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(server: LiveServer) -> Scrape:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def grew(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


# --- health ----------------------------------------------------------------------------


async def test_healthz_and_readyz_answer_when_everything_is_up(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        health = await client.get("/healthz")
        ready = await client.get("/readyz")

    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan, called in-process (no socket needed for these checks)."""
    app = create_app(settings, providers=Providers())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def test_without_the_database_readyz_names_it_and_calls_answer_503_json(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        database_url="postgresql+asyncpg://postgres@127.0.0.1:1/nowhere",
    )
    async with app_client(settings) as client:
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        login = await client.post("/api/login", json={"email": "a@example.com", "password": "x"})

    assert health.status_code == 200
    assert ready.status_code == 503
    assert ready.json()["failing"] == ["database"]
    assert ready.json()["error"] == "unavailable"
    assert login.status_code == 503
    assert login.json()["error"] == "unavailable"
    assert "database" in login.json()["message"]


# --- metrics ---------------------------------------------------------------------------


async def test_an_approved_login_is_counted_once_with_its_decision_time(
    server: LiveServer,
) -> None:
    user_id = await server.add_user("metrics@example.com")
    phone = await server.enroll_phone(user_id)
    browser = server.browser()
    before = await scrape(server)

    started = await server.login(browser, "metrics@example.com")
    assert started.status_code == 202, started.text
    approval = await approval_for(phone, server)
    async with httpx.AsyncClient(base_url=server.url, headers=phone.auth) as client:
        path = f"/api/approvals/{approval['id']}/decision"
        jws = phone.sign(approval, "approve", started.json()["number"])
        first = await client.post(path, json={"jws": jws})
        again = await client.post(path, json={"jws": jws})
    completed = await browser.post(f"/api/login/{approval['id']}/complete")
    after = await scrape(server)

    assert first.json() == {"status": "approved"}, first.text
    assert again.status_code == 409 and again.json()["error"] == "already_decided"
    assert completed.json() == {"status": "authenticated"}, completed.text
    assert grew(before, after, "tapprove_approvals_started_total", kind="login") == 1
    assert grew(before, after, "tapprove_approvals_total", outcome="approved") == 1
    assert grew(before, after, "tapprove_approvals_total", outcome="denied") == 0
    assert grew(before, after, "tapprove_decision_seconds_count") == 1
    assert grew(before, after, "tapprove_logins_total", result="approval_required") == 1
    assert grew(before, after, "tapprove_logins_total", result="completed") == 1


async def test_an_expired_approval_is_counted_once_whoever_notices(
    server_factory: ServerFactory,
) -> None:
    clock = ManualClock(time.time())
    server = await server_factory(clock=clock)  # its sweeper races the browser's poll
    user_id = await server.add_user("expiry@example.com")
    await server.enroll_phone(user_id)
    browser = server.browser()
    before = await scrape(server)

    started = await server.login(browser, "expiry@example.com")
    assert started.status_code == 202, started.text
    approval_id = started.json()["approval_id"]
    clock.advance(server.settings.approval_ttl + 1)
    polls = await asyncio.gather(*(browser.get(f"/api/login/{approval_id}") for _ in range(5)))
    # Whoever else looks now finds it already over.
    approval = await server.services.approvals.get(approval_id)
    assert approval is not None
    assert await server.services.approvals.expire_if_due(approval) is not None
    after = await scrape(server)

    assert {p.json()["status"] for p in polls} == {"expired"}
    assert grew(before, after, "tapprove_approvals_total", outcome="expired") == 1
    assert grew(before, after, "tapprove_decision_seconds_count") == 0


async def test_a_superseded_approval_counts_as_expired(server: LiveServer) -> None:
    user_id = await server.add_user("twice@example.com")
    await server.enroll_phone(user_id)
    before = await scrape(server)

    first = await server.login(server.browser(), "twice@example.com")
    second = await server.login(server.browser(), "twice@example.com")
    after = await scrape(server)

    assert first.status_code == second.status_code == 202
    assert grew(before, after, "tapprove_approvals_started_total", kind="login") == 2
    assert grew(before, after, "tapprove_approvals_total", outcome="expired") == 1


async def test_failed_sign_ins_and_rate_limit_hits_are_counted(server: LiveServer) -> None:
    await server.add_user("guess@example.com")
    browser = server.browser()
    before = await scrape(server)

    answers = [
        (await server.login(browser, "guess@example.com", "wrong password")).status_code
        for _ in range(11)
    ]
    after = await scrape(server)

    assert answers == [401] * 10 + [429]
    assert grew(before, after, "tapprove_logins_total", result="invalid_credentials") == 10
    assert grew(before, after, "tapprove_logins_total", result="rate_limited") == 1
    assert grew(before, after, "tapprove_rate_limited_total", what="/api/login") == 1


async def test_open_device_sockets_are_a_gauge(server: LiveServer) -> None:
    user_id = await server.add_user("socket@example.com")
    phone = await server.enroll_phone(user_id)
    before = (await scrape(server)).value("tapprove_open_sockets", kind="device")

    ws = await device_socket(server, phone)
    while_open = (await scrape(server)).value("tapprove_open_sockets", kind="device")
    await ws.close()

    async def gauge() -> float:
        return (await scrape(server)).value("tapprove_open_sockets", kind="device")

    deadline = time.monotonic() + WAIT
    while await gauge() != before:
        assert time.monotonic() < deadline, "the gauge did not come back down"
        await asyncio.sleep(0.05)
    assert while_open == before + 1


async def test_outbox_depth_and_dead_messages_are_read_at_scrape_time(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(run_worker=False)  # nobody sends the queued one
    now = to_datetime(time.time())
    async with server.services.db() as db:
        for status in ("queued", "dead", "dead", "sent"):
            db.add(
                OutboxMessage(
                    id=new_id(),
                    channel="email",
                    recipient="someone@example.com",
                    template="verify_email",
                    status=status,
                    created_at=now,
                    next_attempt_at=now,
                    expires_at=now,
                )
            )
        await db.commit()

    found = await scrape(server)

    assert found.value("tapprove_outbox_messages", status="queued") == 1
    assert found.value("tapprove_outbox_messages", status="dead") == 2
    assert found.value("tapprove_outbox_messages", status="processing") == 0


# --- logs ------------------------------------------------------------------------------


def records_for(caplog: pytest.LogCaptureFixture, approval_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "approval_id", None) == approval_id]


async def test_a_request_id_follows_an_approval_from_login_to_push_to_decision(
    server_factory: ServerFactory,
    fake_fcm: FakeFcm,
    fcm_env: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    server = await server_factory(providers=await providers_for(fcm_env))
    user_id = await server.add_user("trace@example.com")
    phone = await server.enroll_phone(user_id, push={"provider": "fcm", "token": "fcm-tok-1"})
    browser = server.browser()
    before = await scrape(server)

    started = await browser.post(
        "/api/login",
        json={"email": "trace@example.com", "password": PASSWORD},
        headers={"X-Request-Id": "signin-7f3a"},
    )
    assert started.status_code == 202, started.text
    assert started.headers["X-Request-Id"] == "signin-7f3a"
    approval_id = started.json()["approval_id"]

    def pushed() -> bool:
        lines = records_for(caplog, approval_id)
        return any(r.getMessage().startswith("delivery of") for r in lines)

    await wait_until(pushed, timeout=WAIT)
    approval = await approval_for(phone, server)
    async with httpx.AsyncClient(base_url=server.url, headers=phone.auth) as client:
        decided = await client.post(
            f"/api/approvals/{approval_id}/decision",
            json={"jws": phone.sign(approval, "approve", started.json()["number"])},
            headers={"X-Request-Id": "phone-req-1"},
        )
    assert decided.status_code == 200, decided.text
    after = await scrape(server)

    traced = {
        " ".join(r.getMessage().split()[:5]): getattr(r, "request_id", None)
        for r in records_for(caplog, approval_id)
    }
    assert traced[f"approval {approval_id} created (login) for"] == "signin-7f3a", traced
    assert traced[f"delivery of approval {approval_id} by"] == "signin-7f3a", traced
    assert traced[f"approval {approval_id} approved by device"] == "signin-7f3a", traced
    access = [r for r in caplog.records if r.name == "tapprove.access"]
    assert any(
        getattr(r, "path", None) == "/api/login"
        and getattr(r, "status", None) == 202
        and getattr(r, "request_id", None) == "signin-7f3a"
        for r in access
    )
    assert any(getattr(r, "request_id", None) == "phone-req-1" for r in access)
    assert (
        grew(before, after, "tapprove_delivery_attempts_total", channel="fcm", outcome="accepted")
        == 1
    )
    assert grew(before, after, "tapprove_delivery_seconds_count", channel="fcm") == 1


async def test_access_lines_carry_the_path_without_its_query_string(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    secret = "verification-token-that-must-not-be-logged"
    async with httpx.AsyncClient(base_url=server.url) as client:
        page = await client.get(f"/verify-email?token={secret}")
        odd = await client.get("/healthz", headers={"X-Request-Id": "not ok; <script>"})
    assert page.status_code == 200
    generated = odd.headers["X-Request-Id"]
    assert len(generated) == 32 and generated.isalnum()

    [line] = [
        r
        for r in caplog.records
        if r.name == "tapprove.access" and getattr(r, "path", None) == "/verify-email"
    ]
    formatted = JsonFormatter().format(line) + ConsoleFormatter().format(line)
    assert secret not in formatted
    assert json.loads(JsonFormatter().format(line))["path"] == "/verify-email"
    assert "GET /verify-email 200" in ConsoleFormatter().format(line)


def test_json_lines_are_single_objects_and_secret_fields_are_redacted() -> None:
    record = logging.makeLogRecord(
        {
            "name": "tapprove.test",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "two\nlines",
            "token": "abc",
            "password": "hunter2",
            "approval_id": "a1",
        }
    )
    with request_id_bound("req-1"):
        from app.logs import RequestIdFilter

        RequestIdFilter().filter(record)
    line = JsonFormatter().format(record)

    assert "\n" not in line
    data = json.loads(line)
    assert data["msg"] == "two\nlines"
    assert data["token"] == data["password"] == "[redacted]"
    assert data["approval_id"] == "a1"
    assert data["request_id"] == "req-1"
    assert "hunter2" not in ConsoleFormatter().format(record)


# --- tapprove audit --------------------------------------------------------------------


def run_cli(server: LiveServer, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPPROVE_")}
    env.update(
        {
            "TAPPROVE_DATABASE_URL": server.settings.sqlalchemy_url,
            "TAPPROVE_REDIS_URL": server.settings.redis_url or "",
            "TAPPROVE_REDIS_PREFIX": server.settings.redis_prefix,
            "TAPPROVE_DATA_DIR": str(server.settings.data_dir),
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )


async def test_tapprove_audit_lists_a_users_events_as_json(server: LiveServer) -> None:
    ada = await server.add_user("ada@example.com")
    await server.add_user("bob@example.com")
    phone = await server.enroll_phone(ada)
    browser = server.browser()
    assert (await server.login(browser, "ada@example.com", "wrong password")).status_code == 401
    assert (await server.login(server.browser(), "bob@example.com", "nope")).status_code == 401
    started = await server.login(browser, "ada@example.com")
    approval = await approval_for(phone, server)
    async with httpx.AsyncClient(base_url=server.url, headers=phone.auth) as client:
        decided = await client.post(
            f"/api/approvals/{approval['id']}/decision",
            json={"jws": phone.sign(approval, "approve", started.json()["number"])},
        )
    assert decided.json() == {"status": "approved"}, decided.text

    done = await asyncio.to_thread(run_cli, server, "audit", "--user", "ada@example.com", "--json")
    everyone = await asyncio.to_thread(run_cli, server, "audit", "--json")
    unknown = await asyncio.to_thread(run_cli, server, "audit", "--user", "x@example.com", "--json")

    assert done.returncode == 0, done.stderr.decode()
    events: list[dict[str, Any]] = json.loads(done.stdout)["events"]
    kinds = [e["kind"] for e in events]
    for kind in ("device.added", "login.failed", "approval.created", "approval.decided"):
        assert kind in kinds, kinds
    assert kinds.index("approval.decided") < kinds.index("login.failed")  # newest first
    assert {e["email"] for e in events} == {"ada@example.com"}
    decided_event = next(e for e in events if e["kind"] == "approval.decided")
    assert decided_event["device_id"] == phone.device_id
    assert decided_event["approval_id"] == approval["id"]
    assert decided_event["ip"] == "127.0.0.1"
    assert decided_event["at"].endswith("Z")

    assert everyone.returncode == 0, everyone.stderr.decode()
    emails = {e["email"] for e in json.loads(everyone.stdout)["events"]}
    assert {"ada@example.com", "bob@example.com"} <= emails

    assert unknown.returncode == 1
    assert json.loads(unknown.stdout)["error"] == "unknown_user"


async def test_a_phone_socket_has_its_access_line_and_request_id(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    user_id = await server.add_user("line@example.com")
    phone = await server.enroll_phone(user_id)
    async with server.services.db() as db:
        before = await db.get(Device, phone.device_id)
        assert before is not None and before.last_seen_at is None

    ws = await websockets.connect(
        f"{server.ws_url}/ws/device", additional_headers={"X-Request-Id": "phone-sock-9"}
    )
    await ws.send(json.dumps({"type": "auth", "token": phone.token}))
    assert json.loads(await ws.recv()) == {"type": "ready", "device_id": phone.device_id}
    await ws.close()

    def logged() -> bool:
        return any(
            r.name == "tapprove.access" and getattr(r, "path", None) == "/ws/device"
            for r in caplog.records
        )

    await wait_until(logged, timeout=WAIT)
    [line] = [
        r
        for r in caplog.records
        if r.name == "tapprove.access" and getattr(r, "path", None) == "/ws/device"
    ]
    assert line.request_id == "phone-sock-9"  # type: ignore[attr-defined]
    assert line.accepted is True and line.close_code == 1000  # type: ignore[attr-defined]
    async with server.services.db() as db:
        seen = await db.get(Device, phone.device_id)
        assert seen is not None and seen.last_seen_at is not None  # connecting marks it seen


async def test_a_server_process_freezes_what_it_holds_after_start_up(
    tmp_path: Path, redis_url: str, redis_prefix: str, fresh_pg_url: str
) -> None:
    settings = Settings(
        data_dir=tmp_path, redis_url=redis_url, redis_prefix=redis_prefix, database_url=fresh_pg_url
    )
    plain = create_app(settings, providers=Providers())
    async with plain.router.lifespan_context(plain):
        assert gc.get_freeze_count() == 0  # apps built for tests leave the collector alone
    served = create_app(settings, providers=Providers(), freeze_startup_objects=True)
    try:
        async with served.router.lifespan_context(served):
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
