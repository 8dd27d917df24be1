"""Why an approval ended, as every waiting party sees it: the relying party (plain and long
poll), the browser (`GET /api/login/<id>` and the stream's `result` frame) and the devices
(`approval_resolved`). A superseded approval and one nobody answered both end `expired`;
only `reason` tells them apart. Real server, real Redis and PostgreSQL, real sockets; time
is a ManualClock, so "nobody answered" needs no waiting.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import websockets

from app.approval.model import Status
from app.approval.rules import Outcome
from app.core.clock import ManualClock
from app.db.accounts import create_api_key
from app.store.events import Event
from tests.fakes import wait_until
from tests.fakes.twilio import FakeTwilio
from tests.fixtures.app import LiveServer, Phone, ServerFactory
from tests.integration.test_push_delivery import add_user_with_phone, providers_for
from tests.integration.test_sms_fallback import code_in, not_the
from tests.integration.test_waiters import pending

pytestmark = pytest.mark.timeout(90)

WAIT = 20  # generous: a loaded 2-core machine

# How an approval is ended → the (status, reason) everyone must report.
ENDINGS: dict[str, tuple[str, str]] = {
    "approve": ("approved", "device"),
    "deny": ("denied", "denied"),
    "fraud": ("denied", "fraud"),
    "wrong_number": ("denied", "wrong_number"),
    "supersede": ("expired", "superseded"),
    "timeout": ("expired", "timeout"),
}
# A device's answer goes over HTTP or over its socket (the one-step decide): both must say why.
VIAS = ("http", "socket")
CASES = [
    (ending, via)
    for ending in ENDINGS
    for via in (VIAS if ending in ("approve", "deny", "fraud", "wrong_number") else ("http",))
]


class Device:
    """An enrolled phone with its socket open, reading every frame in the background."""

    def __init__(self, server: LiveServer, phone: Phone, ws: Any) -> None:
        self.server, self.phone, self.ws = server, phone, ws
        self.frames: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, server: LiveServer, phone: Phone) -> Device:
        ws = await websockets.connect(f"{server.ws_url}/ws/device")
        await ws.send(json.dumps({"type": "auth", "token": phone.token}))
        assert json.loads(await ws.recv())["type"] == "ready"
        return cls(server, phone, ws)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self.frames.append(json.loads(message))
        except websockets.ConnectionClosed:
            pass

    async def frame(self, kind: str, approval_id: str) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next(
                (
                    f
                    for f in self.frames
                    if f["type"] == kind
                    and (f.get("id") or f.get("approval", {}).get("id")) == approval_id
                ),
                None,
            )

        await wait_until(lambda: found() is not None, timeout=WAIT)
        frame = found()
        assert frame is not None
        return frame

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


async def answer(
    server: LiveServer, device: Device, approval_id: str, number: str, ending: str, via: str
) -> None:
    """The phone ends the approval the way `ending` says, over `via`."""
    approval = (await device.frame("approval_request", approval_id))["approval"]
    wrong = f"{(int(number) + 1) % 100:02d}"
    jws = {
        "approve": lambda: device.phone.sign(approval, number=number),
        "deny": lambda: device.phone.sign(approval, "deny"),
        "fraud": lambda: device.phone.sign(approval, "deny", reason="fraud"),
        "wrong_number": lambda: device.phone.sign(approval, number=wrong),
    }[ending]()
    if via == "socket":
        await device.ws.send(json.dumps({"type": "decision", "jws": jws}))
        return
    async with httpx.AsyncClient(base_url=server.url) as app:
        response = await app.post(
            f"/api/approvals/{approval_id}/decision", json={"jws": jws}, headers=device.phone.auth
        )
    assert response.status_code in (200, 422), response.text


async def registered_waiter(server: LiveServer, approval_id: str) -> None:
    """Wait until a long poll or a stream is registered to hear the approval's end, so the
    end reaches it as an event (the path the reason has to travel)."""
    svc = server.services
    keys = svc.approvals.keys
    key = keys.approval(approval_id, keys.shard_of(approval_id) or 0).waiters
    deadline = time.monotonic() + WAIT
    while not await svc.redis.exists(key):
        assert time.monotonic() < deadline, "nobody registered to wait for the approval"
        await asyncio.sleep(0.01)


async def setup(
    server_factory: ServerFactory, email: str
) -> tuple[LiveServer, ManualClock, Device]:
    clock = ManualClock(time.time())
    server = await server_factory(clock=clock)
    user_id = await server.add_user(email)
    device = await Device.connect(server, await server.enroll_phone(user_id))
    return server, clock, device


async def end(
    server: LiveServer,
    clock: ManualClock,
    device: Device,
    approval_id: str,
    number: str,
    ending: str,
    via: str,
    supersede: Callable[[], Awaitable[None]],
) -> None:
    if ending == "supersede":
        await supersede()
    elif ending == "timeout":
        clock.advance(server.settings.approval_ttl + 1)  # the expiry sweeper ends it
    else:
        await answer(server, device, approval_id, number, ending, via)


@pytest.mark.parametrize(("ending", "via"), CASES)
async def test_a_relying_party_is_told_why_its_approval_ended(
    server_factory: ServerFactory, ending: str, via: str
) -> None:
    server, clock, device = await setup(server_factory, "rp@example.com")
    async with server.services.db() as db:
        _, api_key = await create_api_key(db, "vpn", now=clock.now())
        await db.commit()
    status, reason = ENDINGS[ending]
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60
    ) as rp:

        async def create() -> dict[str, Any]:
            created = await rp.post("/api/v1/approvals", json={"user": "rp@example.com"})
            assert created.status_code == 201, created.text
            body: dict[str, Any] = created.json()
            return body

        async def supersede() -> None:
            await create()

        started = await create()
        approval_id = started["approval_id"]
        pending = (await rp.get(f"/api/v1/approvals/{approval_id}")).json()
        assert pending["status"] == "pending" and pending["reason"] is None

        long_poll = asyncio.create_task(rp.get(f"/api/v1/approvals/{approval_id}?wait=30"))
        await registered_waiter(server, approval_id)
        await end(server, clock, device, approval_id, started["number"], ending, via, supersede)
        held = await asyncio.wait_for(long_poll, WAIT)
        assert held.status_code == 200, held.text
        assert (held.json()["status"], held.json()["reason"]) == (status, reason)
        assert "decided_at" in held.json()

        plain = (await rp.get(f"/api/v1/approvals/{approval_id}")).json()
        assert (plain["status"], plain["reason"]) == (status, reason)
        assert plain == held.json()  # the event told the long poll all a read would

    resolved = await device.frame("approval_resolved", approval_id)
    assert (resolved["status"], resolved["reason"]) == (status, reason)
    await device.close()


async def login_stream(server: LiveServer, browser: httpx.AsyncClient, approval_id: str) -> Any:
    return await websockets.connect(
        f"{server.ws_url}/ws/login/{approval_id}",
        origin=server.origin,  # type: ignore[arg-type]
        additional_headers={"Cookie": f"tapprove_login={browser.cookies['tapprove_login']}"},
    )


async def until_closed(stream: Any) -> list[dict[str, Any]]:
    """Every frame the server sends until it closes the stream."""

    async def read() -> list[dict[str, Any]]:
        return [json.loads(message) async for message in stream]

    return await asyncio.wait_for(read(), WAIT)


async def start_login(server: LiveServer, browser: httpx.AsyncClient, email: str) -> dict[str, Any]:
    response = await server.login(browser, email)
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize(("ending", "via"), CASES)
async def test_a_browser_is_told_why_its_sign_in_ended(
    server_factory: ServerFactory, ending: str, via: str
) -> None:
    server, clock, device = await setup(server_factory, "web@example.com")
    browser = server.browser()
    status, reason = ENDINGS[ending]

    async def supersede() -> None:
        await start_login(server, server.browser(), "web@example.com")

    started = await start_login(server, browser, "web@example.com")
    approval_id = started["approval_id"]
    before = (await browser.get(f"/api/login/{approval_id}")).json()
    assert before["status"] == "pending" and before["reason"] is None

    stream = await login_stream(server, browser, approval_id)
    # The first frame comes after the stream registered to hear the end.
    assert json.loads(await asyncio.wait_for(stream.recv(), WAIT))["status"] == "pending"
    await end(server, clock, device, approval_id, started["number"], ending, via, supersede)
    frames = await until_closed(stream)
    assert frames[-1] == {"type": "result", "status": status, "reason": reason}
    assert stream.close_code == 1000

    polled = (await browser.get(f"/api/login/{approval_id}")).json()
    assert (polled["status"], polled["reason"]) == (status, reason)
    # A browser that connects after the end gets the same result at once.
    late = await login_stream(server, browser, approval_id)
    assert json.loads(await asyncio.wait_for(late.recv(), WAIT)) == frames[-1]
    await late.close()
    await device.close()


@pytest.mark.parametrize(
    ("ending", "tries", "status"),
    [("sms_code", 1, "approved"), ("too_many_codes", 5, "denied")],
)
async def test_a_sign_in_ended_by_sms_codes_says_so(
    server_factory: ServerFactory,
    twilio_env: dict[str, str],
    fake_twilio: FakeTwilio,
    ending: str,
    tries: int,
    status: str,
) -> None:
    server = await server_factory(providers=await providers_for(twilio_env))
    user_id = await add_user_with_phone(server, "sms@example.com")
    await server.enroll_phone(user_id)  # away and without push: the code goes out at once
    browser = server.browser()
    started = await start_login(server, browser, "sms@example.com")
    approval_id = started["approval_id"]
    await wait_until(lambda: len(fake_twilio.requests) == 1, timeout=WAIT)
    code = code_in(fake_twilio.requests[0].form["Body"])
    typed = code if ending == "sms_code" else not_the(code)

    stream = await login_stream(server, browser, approval_id)
    assert json.loads(await asyncio.wait_for(stream.recv(), WAIT))["status"] == "pending"
    for _ in range(tries):
        await browser.post(f"/api/login/{approval_id}/code", json={"code": typed})
    frames = await until_closed(stream)
    assert frames[-1] == {"type": "result", "status": status, "reason": ending}
    polled = (await browser.get(f"/api/login/{approval_id}")).json()
    assert (polled["status"], polled["reason"]) == (status, ending)


@pytest.mark.parametrize("ending", ["supersede", "timeout", "approve"])
async def test_the_result_event_a_waiter_hears_carries_the_reason(
    server_factory: ServerFactory, ending: str
) -> None:
    clock = ManualClock(time.time())
    svc = (await server_factory(clock=clock, run_worker=False)).services
    approval = await pending(svc)
    heard: asyncio.Queue[Event] = asyncio.Queue()
    async with svc.waiters.watch(approval.id, heard.put_nowait) as current:
        assert current is not None and current.status is Status.PENDING
        if ending == "supersede":
            await pending(svc)  # the same user's next approval
        elif ending == "timeout":
            clock.advance(61)
            assert await svc.approvals.expire_if_due(approval) is Status.EXPIRED
        else:
            await svc.approvals.decide(approval, Outcome(Status.APPROVED), audit_line=b"{}")
        event = await asyncio.wait_for(heard.get(), WAIT)
    status, reason = ENDINGS[ending]
    assert (event["type"], event["status"], event["reason"]) == ("result", status, reason)
    ended = approval.ended(event)  # all a waiter needs, without reading the approval again
    assert ended is not None and (ended.status.value, ended.final_reason) == (status, reason)
