"""Reaching a phone that is not connected, through the real server: FCM (pyfcm) and APNs
(aioapns) against local fakes, retries, dead tokens, expiry, the ack time-out, many devices.

Providers are built from the fixtures' TAPPROVE_* values exactly as `tapprove serve` builds
them, and handed to an in-process server on real Redis and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
import orjson
import pytest
import websockets
from sqlmodel import select

from app import metrics
from app.db.accounts import create_user
from app.db.models import AuditEvent, Device
from app.delivery.providers import build_providers
from app.delivery.push import Providers
from app.settings import Settings
from tests.fakes import apns as apns_replies
from tests.fakes import fcm as fcm_replies
from tests.fakes import wait_until
from tests.fakes.apns import ApnsKey, FakeApns
from tests.fakes.fcm import FakeFcm, ServiceAccount
from tests.fixtures.app import PASSWORD, LiveServer, Phone, ServerFactory
from tests.fixtures.providers import APNS_TOPIC, settings_fields
from tests.integration.test_login_loop import device_socket, login_stream, next_frame

pytestmark = pytest.mark.timeout(90)

# Generous: a loaded two-core machine runs several test sessions at once.
WAIT = 30.0


# --- helpers shared with test_sms_fallback ------------------------------------------------


async def providers_for(env: Mapping[str, str]) -> Providers:
    """The providers `tapprove serve` would build from these TAPPROVE_* values."""
    return await build_providers(Settings.model_validate(settings_fields(env)))


class BrowserStream:
    """The browser's `/ws/login/<id>` stream, read in the background into `frames`."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in self.ws:
                self.frames.append(json.loads(message))

    async def wait_for(self, timeout: float = WAIT, **fields: Any) -> dict[str, Any]:
        """The first frame with these fields, waiting for it if need be."""

        def found() -> dict[str, Any] | None:
            return next(
                (f for f in self.frames if all(f.get(k) == v for k, v in fields.items())), None
            )

        await wait_until(lambda: found() is not None, timeout=timeout)
        frame = found()
        assert frame is not None
        return frame

    def delivered(self) -> set[str]:
        return {f["channel"] for f in self.frames if f["type"] == "delivered"}

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader


@contextlib.asynccontextmanager
async def watch(
    server: LiveServer, browser: httpx.AsyncClient, approval_id: str
) -> AsyncIterator[BrowserStream]:
    """Follow a sign-in's stream the way the login page does."""
    ws = await login_stream(server, browser, approval_id)
    stream = BrowserStream(ws)
    try:
        yield stream
    finally:
        await stream.close()


async def start_login(server: LiveServer, browser: httpx.AsyncClient, email: str) -> dict[str, Any]:
    response = await server.login(browser, email)
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


async def audit_events(server: LiveServer, approval_id: str, kind: str) -> list[dict[str, Any]]:
    """The approval's audit events of one kind, oldest first, with their details parsed."""
    await server.audit_filed()
    async with server.services.db() as db:
        rows = await db.exec(
            select(AuditEvent)
            .where(AuditEvent.approval_id == approval_id, AuditEvent.kind == kind)
            .order_by(AuditEvent.id)  # type: ignore[arg-type]
        )
        return [
            {"device_id": e.device_id, "at": e.at, **orjson.loads(e.detail)} for e in rows.all()
        ]


async def push_token(server: LiveServer, device_id: str) -> str | None:
    async with server.services.db() as db:
        device = await db.get(Device, device_id)
        assert device is not None
        return device.push_token


async def eventually(check: Callable[[], Any], timeout: float = WAIT) -> None:
    """Poll an async check until it returns something true."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def deliveries_settled(server: LiveServer, approval_id: str) -> bool:
    """Whether every delivery started for the approval has ended (pushes, ack checks)."""
    store = server.services.approvals
    keys = store.keys.approval(approval_id, store.keys.shard_of(approval_id) or 0)
    return int(await server.services.redis.scard(keys.inflight)) == 0


async def decide_over_http(
    server: LiveServer, phone: Phone, approval_id: str, number: str, decision: str = "approve"
) -> httpx.Response:
    """What the app does after a push: fetch the approval by id, sign, answer over HTTP."""
    async with httpx.AsyncClient(base_url=server.url) as app:
        fetched = await app.get(f"/api/approvals/{approval_id}", headers=phone.auth)
        assert fetched.status_code == 200, fetched.text
        approval = fetched.json()
        return await app.post(
            f"/api/approvals/{approval_id}/decision",
            json={"jws": phone.sign(approval, decision, number=number)},
            headers=phone.auth,
        )


async def add_user_with_phone(
    server: LiveServer, email: str, phone: str = "+14155552671", *, sms_fallback: bool = True
) -> str:
    """A verified user whose phone number is already verified."""
    async with server.services.db() as db:
        user = await create_user(
            db,
            email,
            password=PASSWORD,
            verified=True,
            phone=phone,
            phone_verified=True,
            now=time.time(),
        )
        user.sms_fallback = sms_fallback
        db.add(user)
        await db.commit()
        return user.id


def attempts_counted(channel: str, outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "tapprove_delivery_attempts_total", {"channel": channel, "outcome": outcome}
    )
    return value or 0.0


class TimedRequests(list[Any]):
    """A fake's request list that also notes when each request arrived (Unix seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: list[float] = []

    def append(self, item: Any) -> None:
        self.arrived.append(time.time())
        super().append(item)


# --- FCM ---------------------------------------------------------------------------------


async def test_an_offline_android_phone_is_reached_by_fcm_and_approves_over_http(
    server_factory: ServerFactory,
    fcm_env: dict[str, str],
    fake_fcm: FakeFcm,
    fcm_service_account: ServiceAccount,
) -> None:
    server = await server_factory(providers=await providers_for(fcm_env))
    user_id = await server.add_user("ada@example.com")
    phone = await server.enroll_phone(user_id, push={"provider": "fcm", "token": "fcm-ada"})
    accepted_before = attempts_counted("fcm", "accepted")
    browser = server.browser()

    started = await start_login(server, browser, "ada@example.com")
    assert started["channels"] == ["fcm"]
    approval_id = started["approval_id"]
    async with watch(server, browser, approval_id) as stream:
        first = await stream.wait_for(type="status")
        assert first["status"] == "pending" and first["channels"] == ["fcm"]
        assert await stream.wait_for(type="delivered") == {"type": "delivered", "channel": "fcm"}

        [request] = fake_fcm.requests
        sent = request.message
        assert sent["token"] == "fcm-ada"
        # Data keys are only the three the protocol names; the app fetches everything else.
        assert sent["data"] == {
            "type": "approval_request",
            "approval_id": approval_id,
            "expires_at": started["expires_at"],
        }
        assert sent["android"]["priority"] == "HIGH"
        ttl = int(sent["android"]["ttl"].removesuffix("s"))
        approval = await server.services.approvals.get(approval_id)
        assert approval is not None
        assert 0 < ttl <= math.ceil(approval.expires_at - approval.created_at)
        assert "127.0.0.1" in sent["notification"]["body"]
        # No secret travels in a push.
        raw = json.dumps(request.json)
        assert approval.challenge not in raw
        assert "challenge" not in raw and "number" not in raw
        # The OAuth token came from the service account's token_uri (the fake).
        assert request.authorization == f"Bearer {fake_fcm.issued_tokens[-1]}"
        claims = fake_fcm.token_requests[0].claims(fcm_service_account.public_key_pem)
        assert claims["iss"] == fcm_service_account.client_email

        answer = await decide_over_http(
            server, phone, sent["data"]["approval_id"], started["number"]
        )
        assert answer.status_code == 200 and answer.json() == {"status": "approved"}
        assert (await stream.wait_for(type="result"))["status"] == "approved"

    done = await browser.post(f"/api/login/{approval_id}/complete")
    assert done.status_code == 200 and done.json() == {"status": "authenticated"}

    [attempt] = await audit_events(server, approval_id, "delivery.attempt")
    assert attempt["channel"] == "fcm" and attempt["outcome"] == "accepted"
    assert attempt["device_id"] == phone.device_id
    assert attempt["latency_ms"] >= 0
    assert attempts_counted("fcm", "accepted") == accepted_before + 1


async def test_a_503_with_retry_after_is_retried_and_then_delivered(
    server_factory: ServerFactory, fcm_env: dict[str, str], fake_fcm: FakeFcm
) -> None:
    server = await server_factory(providers=await providers_for(fcm_env))
    user_id = await server.add_user("retry@example.com")
    phone = await server.enroll_phone(user_id, push={"provider": "fcm", "token": "fcm-retry"})
    fake_fcm.requests = TimedRequests()  # type: ignore[assignment]
    fake_fcm.reply(fcm_replies.unavailable(retry_after=2))
    browser = server.browser()

    started = await start_login(server, browser, "retry@example.com")
    async with watch(server, browser, started["approval_id"]) as stream:
        assert (await stream.wait_for(type="delivered"))["channel"] == "fcm"
        assert len(fake_fcm.requests) == 2
        arrived = fake_fcm.requests.arrived  # type: ignore[attr-defined]
        # Retry-After is a floor for the next attempt (slack for clock granularity only).
        assert arrived[1] - arrived[0] >= 1.9
        answer = await decide_over_http(server, phone, started["approval_id"], started["number"])
        assert answer.json() == {"status": "approved"}

    attempts = await audit_events(server, started["approval_id"], "delivery.attempt")
    assert [(a["outcome"], a["attempt"]) for a in attempts] == [("retry", 1), ("accepted", 2)]
    assert await push_token(server, phone.device_id) == "fcm-retry"


async def test_a_provider_down_for_the_whole_approval_ends_expired_with_no_send_after_it(
    server_factory: ServerFactory, fcm_env: dict[str, str], fake_fcm: FakeFcm
) -> None:
    server = await server_factory(providers=await providers_for(fcm_env), approval_ttl=5)
    user_id = await server.add_user("down@example.com")
    await server.enroll_phone(user_id, push={"provider": "fcm", "token": "fcm-down"})
    fake_fcm.reply(*[fcm_replies.unavailable(retry_after=None)] * 200)
    browser = server.browser()

    started = await start_login(server, browser, "down@example.com")
    assert started["channels"] == ["fcm"]  # a failing push never fails the sign-in
    async with watch(server, browser, started["approval_id"]) as stream:
        assert (await stream.wait_for(type="result"))["status"] == "expired"
        assert stream.delivered() == set()

    # Once no job of this approval is queued or running and no delivery is under way,
    # nothing can send for it any more: then the count is final.
    async def nothing_left() -> bool:
        queued = await queued_jobs_of(server, started["approval_id"])
        return not queued and await deliveries_settled(server, started["approval_id"])

    await eventually(nothing_left)
    sent = len(fake_fcm.requests)
    assert sent >= 2, "transient failures are retried"
    # Each send started at least a second before the end, by the server's own clock: FCM
    # needs a TTL of at least 1 s, and each request carries the time the approval had left.
    ttls = [request.message["android"]["ttl"] for request in fake_fcm.requests]
    assert all(re.fullmatch(r"[1-9][0-9]*s", ttl) for ttl in ttls), ttls
    attempts = await audit_events(server, started["approval_id"], "delivery.attempt")
    assert len(attempts) == sent and {a["outcome"] for a in attempts} == {"retry"}
    assert (await browser.get(f"/api/login/{started['approval_id']}")).json()["status"] == (
        "expired"
    )


# --- APNs --------------------------------------------------------------------------------


async def test_an_iphone_gets_an_apns_alert_with_category_priority_expiry_and_collapse_id(
    server_factory: ServerFactory,
    apns_env: dict[str, str],
    fake_apns: FakeApns,
    apns_key: ApnsKey,
) -> None:
    server = await server_factory(providers=await providers_for(apns_env))
    user_id = await server.add_user("ios@example.com")
    device_token = "a1" * 32
    phone = await server.enroll_phone(
        user_id, name="iPhone", platform="ios", push={"provider": "apns", "token": device_token}
    )
    browser = server.browser()

    started = await start_login(server, browser, "ios@example.com")
    assert started["channels"] == ["apns"]
    approval_id = started["approval_id"]
    async with watch(server, browser, approval_id) as stream:
        assert (await stream.wait_for(type="delivered"))["channel"] == "apns"
        [request] = fake_apns.requests
        assert request.path == f"/3/device/{device_token}"
        approval = await server.services.approvals.get(approval_id)
        assert approval is not None
        headers = request.headers
        assert headers["apns-priority"] == "10"
        assert headers["apns-push-type"] == "alert"
        assert headers["apns-topic"] == APNS_TOPIC
        assert headers["apns-collapse-id"] == approval_id
        expiration = int(headers["apns-expiration"])
        assert math.floor(approval.expires_at) - 1 <= expiration <= approval.expires_at

        payload = request.payload
        assert set(payload) == {"aps", "type", "approval_id", "expires_at"}
        assert payload["type"] == "approval_request"
        assert payload["approval_id"] == approval_id
        assert payload["expires_at"] == started["expires_at"]
        aps = payload["aps"]
        assert aps["category"] == "TAPPROVE_APPROVAL"
        assert aps["alert"]["title"] == "Sign-in request"
        assert "127.0.0.1" in aps["alert"]["body"] and "Chrome" in aps["alert"]["body"]
        assert approval.challenge not in request.body.decode()

        # Token-based provider authentication: an ES256 JWT from the team's .p8 key.
        header = request.jwt_header()
        assert (header["alg"], header["kid"]) == ("ES256", apns_key.key_id)
        claims = request.jwt_claims(apns_key.public_key_pem)
        assert claims["iss"] == apns_key.team_id
        assert abs(claims["iat"] - time.time()) < 3600

        answer = await decide_over_http(server, phone, approval_id, started["number"])
        assert answer.json() == {"status": "approved"}
        assert (await stream.wait_for(type="result"))["status"] == "approved"
    [attempt] = await audit_events(server, approval_id, "delivery.attempt")
    assert (attempt["channel"], attempt["outcome"]) == ("apns", "accepted")


async def test_apns_503_without_retry_after_is_retried_with_backoff(
    server_factory: ServerFactory, apns_env: dict[str, str], fake_apns: FakeApns
) -> None:
    server = await server_factory(providers=await providers_for(apns_env))
    user_id = await server.add_user("busy@example.com")
    await server.enroll_phone(
        user_id, platform="ios", push={"provider": "apns", "token": "b2" * 32}
    )
    fake_apns.reply(apns_replies.service_unavailable(), apns_replies.too_many_requests(1))
    browser = server.browser()

    started = await start_login(server, browser, "busy@example.com")
    async with watch(server, browser, started["approval_id"]) as stream:
        assert (await stream.wait_for(type="delivered"))["channel"] == "apns"
    attempts = await audit_events(server, started["approval_id"], "delivery.attempt")
    assert [a["outcome"] for a in attempts] == ["retry", "retry", "accepted"]
    assert len(fake_apns.requests) == 3


async def test_an_unregistered_token_is_cleared_and_a_refreshed_one_gets_the_resend(
    server_factory: ServerFactory, apns_env: dict[str, str], fake_apns: FakeApns
) -> None:
    server = await server_factory(providers=await providers_for(apns_env))
    user_id = await server.add_user("gone@example.com")
    phone = await server.enroll_phone(
        user_id, platform="ios", push={"provider": "apns", "token": "dead" * 16}
    )
    fake_apns.reply(apns_replies.unregistered())
    browser = server.browser()

    started = await start_login(server, browser, "gone@example.com")
    approval_id = started["approval_id"]
    await eventually(lambda: _token_is(server, phone.device_id, None))
    await eventually(lambda: deliveries_settled(server, approval_id))
    # The sign-in is not failed by it: it waits for the app to open and fetch it.
    status = await browser.get(f"/api/login/{approval_id}")
    assert status.json()["status"] == "pending" and status.json()["delivered"] == []
    [attempt] = await audit_events(server, approval_id, "delivery.attempt")
    assert attempt["outcome"] == "invalid_token"
    [cleared] = await audit_events(server, approval_id, "device.push_token_cleared")
    assert cleared["device_id"] == phone.device_id and cleared["channel"] == "apns"

    # The app refreshes its token (PATCH /api/devices/me); the browser asks to resend.
    async with httpx.AsyncClient(base_url=server.url) as app:
        patched = await app.patch(
            "/api/devices/me",
            json={"push": {"provider": "apns", "token": "f0" * 32}},
            headers=phone.auth,
        )
    assert patched.status_code == 200 and patched.json()["push"] == "apns"
    async with watch(server, browser, approval_id) as stream:
        resent = await browser.post(f"/api/login/{approval_id}/resend")
        assert resent.status_code == 202, resent.text
        assert (await stream.wait_for(type="delivered"))["channel"] == "apns"
    assert fake_apns.requests[-1].device_token == "f0" * 32
    # At most three resends per approval.
    for _ in range(2):
        assert (await browser.post(f"/api/login/{approval_id}/resend")).status_code == 202
    refused = await browser.post(f"/api/login/{approval_id}/resend")
    assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
    assert "Retry-After" in refused.headers
    # Another browser cannot resend someone else's sign-in.
    stranger = await server.browser().post(f"/api/login/{approval_id}/resend")
    assert stranger.status_code == 403


async def _token_is(server: LiveServer, device_id: str, expected: str | None) -> bool:
    return await push_token(server, device_id) == expected


# --- the ack time-out and many devices -----------------------------------------------------


async def test_a_connected_phone_that_never_acks_gets_a_push_after_the_ack_timeout(
    server_factory: ServerFactory, fcm_env: dict[str, str], fake_fcm: FakeFcm
) -> None:
    server = await server_factory(providers=await providers_for(fcm_env))
    user_id = await server.add_user("quiet@example.com")
    phone = await server.enroll_phone(user_id, push={"provider": "fcm", "token": "fcm-quiet"})
    ws = await device_socket(server, phone)
    browser = server.browser()

    started = await start_login(server, browser, "quiet@example.com")
    assert started["channels"] == ["websocket"]
    request = await next_frame(ws, "approval_request")  # received, never acknowledged
    async with watch(server, browser, started["approval_id"]) as stream:
        assert (await stream.wait_for(type="delivered"))["channel"] == "fcm"
        assert fake_fcm.requests[0].message["data"]["approval_id"] == started["approval_id"]
        status = (await browser.get(f"/api/login/{started['approval_id']}")).json()
        assert status["channels"] == ["websocket", "fcm"] and status["delivered"] == ["fcm"]
        await ws.send(
            json.dumps(
                {
                    "type": "decision",
                    "jws": phone.sign(request["approval"], number=started["number"]),
                }
            )
        )
        assert (await stream.wait_for(type="result"))["status"] == "approved"
    await ws.close()


async def test_a_connected_phone_that_acks_gets_no_push(
    server_factory: ServerFactory, fcm_env: dict[str, str], fake_fcm: FakeFcm
) -> None:
    server = await server_factory(providers=await providers_for(fcm_env))
    user_id = await server.add_user("quick@example.com")
    phone = await server.enroll_phone(user_id, push={"provider": "fcm", "token": "fcm-quick"})
    ws = await device_socket(server, phone)

    started = await start_login(server, server.browser(), "quick@example.com")
    request = await next_frame(ws, "approval_request")
    await ws.send(json.dumps({"type": "ack", "id": request["approval"]["id"]}))
    # Once the ack check has run, nothing is left to send.
    await eventually(lambda: deliveries_settled(server, started["approval_id"]))
    assert fake_fcm.requests == []
    await ws.close()


async def queued_jobs_of(server: LiveServer, approval_id: str) -> list[str]:
    """Kinds of the delivery jobs still stored for the approval (due or under a lease)."""
    queue = server.services.jobs
    shard = server.services.approvals.keys.shard_of(approval_id) or 0
    bodies = await server.services.redis.hvals(queue.keys(shard).data)
    jobs = [orjson.loads(body) for body in bodies]
    return [j["kind"] for j in jobs if j["payload"].get("approval_id") == approval_id]


async def handled(ws: Any) -> None:
    """Wait until the server has handled every frame sent so far on this socket (it answers
    a bad frame in order with an error)."""
    await ws.send("not json")
    await next_frame(ws, "error")


async def test_the_last_connected_phone_to_ack_cancels_the_ack_check(
    server_factory: ServerFactory, fcm_env: dict[str, str], fake_fcm: FakeFcm
) -> None:
    server = await server_factory(providers=await providers_for(fcm_env))
    user_id = await server.add_user("acks@example.com")
    first = await server.enroll_phone(user_id, push={"provider": "fcm", "token": "fcm-1"})
    second = await server.enroll_phone(user_id, push={"provider": "fcm", "token": "fcm-2"})
    sockets = [await device_socket(server, phone) for phone in (first, second)]

    started = await start_login(server, server.browser(), "acks@example.com")
    approval_id = started["approval_id"]
    for ws in sockets:
        await next_frame(ws, "approval_request")
    await sockets[0].send(json.dumps({"type": "ack", "id": approval_id}))
    await handled(sockets[0])
    assert await queued_jobs_of(server, approval_id) == ["ack_check"]  # one phone is silent
    await sockets[1].send(json.dumps({"type": "ack", "id": approval_id}))
    await handled(sockets[1])

    assert await queued_jobs_of(server, approval_id) == []
    assert await deliveries_settled(server, approval_id)
    assert fake_fcm.requests == []
    for ws in sockets:
        await ws.close()


async def test_pushes_to_several_devices_go_out_at_once(
    server_factory: ServerFactory,
    provider_env: dict[str, str],
    fake_fcm: FakeFcm,
    fake_apns: FakeApns,
) -> None:
    server = await server_factory(providers=await providers_for(provider_env))
    user_id = await server.add_user("many@example.com")
    phones = [
        await server.enroll_phone(user_id, name="Pixel", push={"provider": "fcm", "token": "f-1"}),
        await server.enroll_phone(user_id, name="Galaxy", push={"provider": "fcm", "token": "f-2"}),
        await server.enroll_phone(
            user_id, name="iPhone", platform="ios", push={"provider": "apns", "token": "c3" * 32}
        ),
    ]
    # Every provider answers only after a while: one after another would take 3x as long.
    fake_fcm.reply(fcm_replies.ok(delay=6), fcm_replies.ok(delay=6))
    fake_apns.reply(apns_replies.ok(delay=6))
    browser = server.browser()

    started = await start_login(server, browser, "many@example.com")
    assert started["channels"] == ["fcm", "apns"]
    approval_id = started["approval_id"]
    async with watch(server, browser, approval_id) as stream:
        await wait_until(
            lambda: len(fake_fcm.requests) == 2 and len(fake_apns.requests) == 1, timeout=WAIT
        )
        # All three reached their provider before any provider had answered.
        assert await audit_events(server, approval_id, "delivery.attempt") == []
        assert {r.message["token"] for r in fake_fcm.requests} == {"f-1", "f-2"}
        await stream.wait_for(type="delivered", channel="fcm")
        await stream.wait_for(type="delivered", channel="apns")
        await eventually(lambda: deliveries_settled(server, approval_id))
        attempts = await audit_events(server, approval_id, "delivery.attempt")
        assert sorted(a["device_id"] for a in attempts) == sorted(p.device_id for p in phones)
        assert {a["outcome"] for a in attempts} == {"accepted"}
        answer = await decide_over_http(server, phones[2], approval_id, started["number"])
        assert answer.json() == {"status": "approved"}
        assert (await stream.wait_for(type="result"))["status"] == "approved"
