"""Redis goes away and comes back: a real server on a private redis-server that the test
kills and restarts on the same port (empty, as after a crash without persistence).

While Redis is down every call that needs it answers 503 JSON and /readyz names it;
/healthz keeps answering. Once Redis is back the service recovers by itself: ready again,
sign-ins work, and the phone's socket carries events again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from app.db.accounts import create_api_key, create_enrollment_code
from mobile_stub import Backoff, Decision, EnrollTarget, PhoneClient, enroll
from mobile_stub.client import Approval
from tests.fakes import wait_until
from tests.fixtures.app import LiveServer, ServerFactory, free_port

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

# Generous: a loaded two-core machine runs several test sessions at once.
WAIT = 60.0


class PrivateRedis:
    """A redis-server of this test's own, without persistence, on a fixed port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + WAIT
        try:
            while True:
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        return
                assert self.process.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """Gone at once, like a crash: no goodbye to the clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    found = PrivateRedis(tmp_path)
    found.start()
    try:
        yield found
    finally:
        found.kill()


class Numbers:
    """The number each approval's browser shows, handed to the phone once the test knows it."""

    def __init__(self) -> None:
        self._futures: defaultdict[str, asyncio.Future[str]] = defaultdict(
            lambda: asyncio.get_running_loop().create_future()
        )

    def tell(self, approval_id: str, number: str) -> None:
        self._futures[approval_id].set_result(number)

    async def decide(self, approval: Approval) -> Decision:
        return Decision.approve(await self._futures[approval["id"]])


@contextlib.asynccontextmanager
async def phone_of(
    server: LiveServer, user_id: str, numbers: Numbers
) -> AsyncIterator[PhoneClient]:
    """The reference phone, enrolled for the user and holding its socket (fast reconnects)."""
    async with server.services.db() as db:
        code, _ = await create_enrollment_code(db, user_id, now=time.time())
        await db.commit()
    state = await enroll(EnrollTarget(server.url, code), name="outage phone", platform="android")
    phone = PhoneClient(state, backoff=Backoff(0.05, 0.5))
    async with phone, phone.running(numbers.decide):
        await phone.wait_for("ready", timeout=WAIT)
        yield phone


async def sign_in(
    server: LiveServer, phone: PhoneClient, numbers: Numbers, email: str
) -> list[str]:
    """A whole sign-in: password, approval on the phone, session; returns its channels."""
    browser = server.browser()
    started = await server.login(browser, email)
    assert started.status_code == 202, started.text
    approval_id, number = started.json()["approval_id"], started.json()["number"]
    numbers.tell(approval_id, number)
    result = await phone.wait_for("decision_result", id=approval_id, timeout=WAIT)
    assert result["status"] == "approved"
    completed = await browser.post(f"/api/login/{approval_id}/complete")
    assert completed.status_code == 200, completed.text
    found: list[str] = started.json()["channels"]
    return found


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.request.url, response.text)
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == "unavailable"
    assert response.headers["Retry-After"]


async def test_while_redis_is_down_calls_answer_503_and_the_service_recovers_by_itself(
    server_factory: ServerFactory, private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app.store.events")
    server = await server_factory(redis_url=private_redis.url)
    user_id = await server.add_user("outage@example.com")
    async with server.services.db() as db:
        _, api_key = await create_api_key(db, "vpn", time.time())
        await db.commit()
    relying_party = {"Authorization": f"Bearer {api_key}"}
    numbers = Numbers()
    async with phone_of(server, user_id, numbers) as phone:
        await sign_in(server, phone, numbers, "outage@example.com")
        pending = await server.login(server.browser(), "outage@example.com")
        assert pending.status_code == 202
        pending_id = pending.json()["approval_id"]
        device_auth = {"Authorization": f"Bearer {phone.state.device_token}"}
        stale_session = {"Cookie": f"tapprove_session={'x' * 43}"}

        private_redis.kill()

        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            health = await client.get("/healthz")
            ready = await client.get("/readyz")
            calls = [
                await client.post(
                    "/api/login", json={"email": "outage@example.com", "password": "whatever"}
                ),
                await client.post(
                    "/api/register", json={"email": "new@example.com", "password": "long enough"}
                ),
                await client.get("/api/devices/me/approvals", headers=device_auth),
                await client.get(f"/api/approvals/{pending_id}", headers=device_auth),
                await client.get("/api/account", headers=stale_session),
                await client.post(
                    "/api/v1/approvals", json={"user": "outage@example.com"}, headers=relying_party
                ),
                await client.get(f"/api/v1/approvals/{pending_id}?wait=5", headers=relying_party),
            ]
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert ready.status_code == 503
        assert ready.json()["failing"] == ["redis"]
        for response in calls:
            assert_unavailable(response)

        # Long enough that the event bus has lost Redis and failed to get it back at least once.
        await wait_until(
            lambda: any("cannot resubscribe" in r.getMessage() for r in caplog.records),
            timeout=WAIT,
        )
        private_redis.start()  # same port, empty: whatever Redis held is gone

        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            deadline = time.monotonic() + WAIT
            while (await client.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "not ready again after Redis came back"
                await asyncio.sleep(0.1)
        # The server tells Redis again that the phone is here (its socket may never have closed)...
        deadline = time.monotonic() + WAIT
        while not await server.services.presence.connected_devices(user_id):
            assert time.monotonic() < deadline, "the connected phone was not announced again"
            await asyncio.sleep(0.1)
        # ...and events reach it again.
        channels = await sign_in(server, phone, numbers, "outage@example.com")
        assert channels == ["websocket"]
