"""Reaching a browser phone whose page is closed, by Web Push, through the real server: the
real sender (pywebpush encryption, py-vapid signature, our aiohttp session) against a fake
push service on 127.0.0.1 that checks the VAPID token and decrypts every message with the
keys a browser would hold. Dead subscriptions, retries, the SSRF guard at send time.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from app.delivery.push import PushMessage
from app.delivery.push_endpoints import EndpointPolicy
from app.delivery.webpush import Subscription, WebPushSender, subscription_box
from app.server import startup_banner
from app.server_keys import vapid_private_key
from app.settings import Settings
from tests.fakes import wait_until
from tests.fakes import webpush as replies
from tests.fakes.webpush import BrowserSubscription, FakePushService, unb64url
from tests.fixtures.app import LiveServer, Phone, ServerFactory
from tests.fixtures.providers import settings_fields
from tests.integration.test_login_loop import device_socket, next_frame
from tests.integration.test_push_delivery import (
    WAIT,
    add_user_with_phone,
    attempts_counted,
    audit_events,
    decide_over_http,
    providers_for,
    push_token,
    start_login,
    watch,
)

pytestmark = pytest.mark.timeout(90)

TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


async def webpush_server(
    server_factory: ServerFactory, env: dict[str, str], **overrides: Any
) -> LiveServer:
    """A server that sends Web Push to the fake (providers built as `tapprove serve` does)."""
    return await server_factory(
        providers=await providers_for(env), **settings_fields(env), **overrides
    )


async def subscribe(
    server: LiveServer, phone: Phone, fake: FakePushService
) -> BrowserSubscription:
    """What the /phone page does after "Turn on notifications": fetch the server's key,
    subscribe (here: the fake, as the browser would), register the subscription."""
    async with httpx.AsyncClient(base_url=server.url) as client:
        key = (await client.get("/api/webpush/key")).json()["public_key"]
        subscription = fake.subscribe(key)
        answer = await client.patch(
            "/api/devices/me",
            json={"push": {"provider": "webpush", "subscription": subscription.to_json()}},
            headers=phone.auth,
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["push"] == "webpush"
    return subscription


async def test_a_closed_phone_page_is_reached_by_web_push_and_approves_over_http(
    server_factory: ServerFactory, webpush_env: dict[str, str], fake_push: FakePushService
) -> None:
    server = await webpush_server(server_factory, webpush_env)
    user_id = await server.add_user("ada@example.com")
    phone = await server.enroll_phone(user_id, name="Pixel browser", platform="web")
    await subscribe(server, phone, fake_push)
    accepted_before = attempts_counted("webpush", "accepted")
    browser = server.browser()

    started = await start_login(server, browser, "ada@example.com")
    assert started["channels"] == ["webpush"]
    approval_id = started["approval_id"]
    async with watch(server, browser, approval_id) as stream:
        delivered = await stream.wait_for(type="delivered")
        assert delivered == {"type": "delivered", "channel": "webpush"}

        [push] = fake_push.delivered()
        # Only the approval id and a short title travel, encrypted for the browser.
        assert push.payload == {
            "type": "approval_request",
            "approval_id": approval_id,
            "expires_at": started["expires_at"],
            "title": "Sign-in request",
        }
        approval = await server.services.approvals.get(approval_id)
        assert approval is not None
        assert approval.challenge.encode() not in push.plaintext  # type: ignore[operator]
        assert started["number"].encode() not in push.body
        assert b"approval_request" not in push.body  # the body is ciphertext
        # RFC 8030 headers: high urgency, a TTL that ends with the approval, a topic.
        assert push.headers["Urgency"] == "high"
        assert 0 < push.ttl <= math.ceil(approval.expires_at - approval.created_at)
        assert push.arrived + push.ttl <= approval.expires_at + 1
        assert TOPIC.match(push.headers["Topic"])
        # RFC 8292: the token is for this push service's origin, from the configured contact.
        assert push.claims is not None
        assert push.claims["aud"] == fake_push.origin
        assert push.claims["sub"] == "mailto:ops@tapprove.test"
        assert time.time() < push.claims["exp"] <= time.time() + 24 * 3600

        answer = await decide_over_http(server, phone, approval_id, started["number"])
        assert answer.status_code == 200 and answer.json() == {"status": "approved"}
        assert (await stream.wait_for(type="result"))["status"] == "approved"

    [attempt] = await audit_events(server, approval_id, "delivery.attempt")
    assert attempt["channel"] == "webpush" and attempt["outcome"] == "accepted"
    assert attempt["device_id"] == phone.device_id
    assert attempts_counted("webpush", "accepted") == accepted_before + 1


async def test_a_newer_request_carries_the_same_topic_so_it_replaces_the_older_one(
    server_factory: ServerFactory, webpush_env: dict[str, str], fake_push: FakePushService
) -> None:
    server = await webpush_server(server_factory, webpush_env)
    user_id = await server.add_user("topic@example.com")
    phone = await server.enroll_phone(user_id, platform="web")
    subscription = await subscribe(server, phone, fake_push)

    first = await start_login(server, server.browser(), "topic@example.com")
    await wait_until(lambda: len(fake_push.delivered()) == 1, timeout=WAIT)
    second = await start_login(server, server.browser(), "topic@example.com")
    await wait_until(lambda: len(fake_push.delivered()) == 2, timeout=WAIT)

    older, newer = fake_push.delivered()
    assert [older.payload, newer.payload] == [
        {**p, "type": "approval_request", "title": "Sign-in request"}
        for p in (
            {"approval_id": first["approval_id"], "expires_at": first["expires_at"]},
            {"approval_id": second["approval_id"], "expires_at": second["expires_at"]},
        )
    ]
    assert older.headers["Topic"] == newer.headers["Topic"]
    # Stable for the subscription, yet not the user's id (it would link their browsers).
    assert user_id not in newer.headers["Topic"]
    assert subscription.endpoint not in newer.headers["Topic"]


async def test_a_410_clears_the_subscription_and_the_sms_fallback_goes_out(
    server_factory: ServerFactory, webpush_env: dict[str, str], fake_push: FakePushService
) -> None:
    server = await webpush_server(server_factory, webpush_env)
    user_id = await add_user_with_phone(server, "gone@example.com")
    phone = await server.enroll_phone(user_id, platform="web")
    await subscribe(server, phone, fake_push)
    fake_push.reply(replies.gone())
    cleared_before = attempts_counted("webpush", "invalid_token")
    browser = server.browser()

    started = await start_login(server, browser, "gone@example.com")
    assert started["channels"] == ["webpush"]
    async with watch(server, browser, started["approval_id"]) as stream:
        assert (await stream.wait_for(type="delivered"))["channel"] == "sms"
        assert stream.delivered() == {"sms"}
    status = (await browser.get(f"/api/login/{started['approval_id']}")).json()
    assert status["channels"] == ["webpush", "sms"]

    assert await push_token(server, phone.device_id) is None
    attempts = await audit_events(server, started["approval_id"], "delivery.attempt")
    assert [(a["channel"], a["outcome"]) for a in attempts] == [
        ("webpush", "invalid_token"),
        ("sms", "accepted"),
    ]
    [cleared] = await audit_events(server, started["approval_id"], "device.push_token_cleared")
    assert cleared["channel"] == "webpush" and cleared["device_id"] == phone.device_id
    assert attempts_counted("webpush", "invalid_token") == cleared_before + 1
    # The device list shows it has no push left; the next sign-in goes by SMS at once.
    async with httpx.AsyncClient(base_url=server.url) as client:
        me = await client.patch("/api/devices/me", json={}, headers=phone.auth)
    assert me.json()["push"] is None


@pytest.mark.parametrize("failure", [replies.too_many(1), replies.unavailable()])
async def test_429_and_5xx_are_retried_until_the_push_service_takes_it(
    server_factory: ServerFactory,
    webpush_env: dict[str, str],
    fake_push: FakePushService,
    failure: replies.Reply,
) -> None:
    server = await webpush_server(server_factory, webpush_env)
    user_id = await server.add_user("busy@example.com")
    phone = await server.enroll_phone(user_id, platform="web")
    await subscribe(server, phone, fake_push)
    fake_push.reply(failure)
    browser = server.browser()

    started = await start_login(server, browser, "busy@example.com")
    async with watch(server, browser, started["approval_id"]) as stream:
        assert (await stream.wait_for(type="delivered"))["channel"] == "webpush"
    assert [r.refused for r in fake_push.requests] == [f"scripted {failure.status}", None]
    attempts = await audit_events(server, started["approval_id"], "delivery.attempt")
    assert [(a["outcome"], a["attempt"]) for a in attempts] == [("retry", 1), ("accepted", 2)]
    assert await push_token(server, phone.device_id) is not None


async def test_a_redirect_from_the_push_service_is_not_followed(
    server_factory: ServerFactory, webpush_env: dict[str, str], fake_push: FakePushService
) -> None:
    server = await webpush_server(server_factory, webpush_env)
    user_id = await server.add_user("redirect@example.com")
    phone = await server.enroll_phone(user_id, platform="web")
    await subscribe(server, phone, fake_push)
    fake_push.reply(replies.redirect(f"{fake_push.url}/elsewhere/internal-admin"))

    started = await start_login(server, server.browser(), "redirect@example.com")
    attempts: list[dict[str, Any]] = []

    async def attempted() -> bool:
        attempts[:] = await audit_events(server, started["approval_id"], "delivery.attempt")
        return bool(attempts)

    deadline = time.monotonic() + WAIT
    while not await attempted():
        assert time.monotonic() < deadline
    [attempt] = attempts
    assert attempt["outcome"] == "failed" and "redirect not followed" in attempt["detail"]
    assert fake_push.elsewhere == []
    assert len(fake_push.requests) == 1
    assert await push_token(server, phone.device_id) is not None  # a 3xx is not "gone"


async def test_a_connected_phone_that_does_not_ack_gets_web_push_after_3_seconds(
    server_factory: ServerFactory, webpush_env: dict[str, str], fake_push: FakePushService
) -> None:
    """The chain: WebSocket first; a phone that is connected but silent (a frozen tab) gets
    Web Push once the ack time-out passes."""
    server = await webpush_server(server_factory, webpush_env)
    user_id = await server.add_user("frozen@example.com")
    phone = await server.enroll_phone(user_id, platform="web")
    await subscribe(server, phone, fake_push)
    socket = await device_socket(server, phone)
    browser = server.browser()
    try:
        started = await start_login(server, browser, "frozen@example.com")
        assert started["channels"] == ["websocket"]
        await next_frame(socket, "approval_request")  # received, never acknowledged
        async with watch(server, browser, started["approval_id"]) as stream:
            assert (await stream.wait_for(type="delivered"))["channel"] == "webpush"
        [push] = fake_push.delivered()
        assert push.payload is not None and push.payload["approval_id"] == started["approval_id"]
        status = (await browser.get(f"/api/login/{started['approval_id']}")).json()
        assert status["channels"] == ["websocket", "webpush"]
        assert status["delivered"] == ["webpush"]
    finally:
        await socket.close()


# --- the SSRF guard at send time (the real sender, no server needed) ----------------------


def sender_for(env: dict[str, str], **overrides: Any) -> tuple[WebPushSender, Settings]:
    settings = Settings.model_validate({**settings_fields(env), **overrides})
    return WebPushSender.from_settings(settings), settings


def stored(settings: Settings, endpoint: str, browser: BrowserSubscription) -> str:
    """A push token as the server stores it, for any endpoint (as if the allow-list had
    changed since it was registered, or a row had been written behind the API's back)."""
    subscription = Subscription(endpoint, unb64url(browser.p256dh), browser.auth)
    return subscription.stored(subscription_box(settings))


def message() -> PushMessage:
    return PushMessage("a" * 32, time.time() + 60, "Sign-in request", "Chrome on Linux")


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("http://fcm.googleapis.com/fcm/send/x", "only https"),
        ("https://push.attacker.example/x", "not an allowed push service"),
        ("https://10.0.0.7/x", "IP address"),
        ("https://[::1]/x", "IP address"),
        ("https://169.254.169.254/latest/meta-data", "IP address"),
        ("https://fcm.googleapis.com:8443/x", "port 443"),
        ("https://fcm.googleapis.com.attacker.example/x", "not an allowed push service"),
    ],
)
async def test_the_sender_refuses_endpoints_outside_the_policy(
    webpush_env: dict[str, str], fake_push: FakePushService, endpoint: str, reason: str
) -> None:
    sender, settings = sender_for(webpush_env)
    browser = fake_push.subscribe("unused")
    try:
        result = await sender.send(stored(settings, endpoint, browser), message(), now=time.time())
    finally:
        await sender.close()
    assert result.outcome == "failed" and reason in result.detail
    assert fake_push.requests == []


async def test_a_name_that_resolves_to_a_private_address_is_refused_after_dns(
    webpush_env: dict[str, str], fake_push: FakePushService
) -> None:
    # "localhost" passes the host check (it is on this allow-list) and port 443 is allowed:
    # only the resolved address (127.0.0.1 / ::1) stops it, checked as the connection is made.
    sender, settings = sender_for(webpush_env, webpush_allowed_hosts="localhost")
    browser = fake_push.subscribe("unused")
    try:
        result = await sender.send(
            stored(settings, "https://localhost/push/x", browser), message(), now=time.time()
        )
    finally:
        await sender.close()
    assert result.outcome == "failed"
    assert "non-public address" in result.detail, result.detail


async def test_a_test_endpoint_is_honoured_only_at_its_own_port(
    webpush_env: dict[str, str], fake_push: FakePushService
) -> None:
    sender, settings = sender_for(webpush_env)
    browser = fake_push.subscribe("unused")
    other_port = f"http://127.0.0.1:{fake_push.port + 1}/push/{browser.id}"
    try:
        token = stored(settings, other_port, browser)
        result = await sender.send(token, message(), now=time.time())
    finally:
        await sender.close()
    assert result.outcome == "failed" and "not an allowed push service" in result.detail
    assert EndpointPolicy.from_settings(settings).test_services == {("127.0.0.1", fake_push.port)}


async def test_a_stored_subscription_whose_auth_was_sealed_for_another_endpoint_is_dropped(
    webpush_env: dict[str, str], fake_push: FakePushService
) -> None:
    sender, settings = sender_for(webpush_env)
    browser = fake_push.subscribe("unused")
    token = orjson.loads(stored(settings, browser.endpoint, browser))
    token["endpoint"] = browser.endpoint + "x"  # someone rewrote the row's endpoint
    try:
        result = await sender.send(orjson.dumps(token).decode(), message(), now=time.time())
    finally:
        await sender.close()
    assert result.outcome == "invalid_token"
    assert fake_push.requests == []


async def test_the_vapid_key_the_page_gets_is_the_one_pushes_are_signed_with(
    server_factory: ServerFactory, webpush_env: dict[str, str]
) -> None:
    server = await webpush_server(server_factory, webpush_env)
    async with httpx.AsyncClient(base_url=server.url) as client:
        answer = await client.get("/api/webpush/key")
    assert answer.status_code == 200
    key = answer.json()["public_key"]
    point = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
    assert len(point) == 65 and point[0] == 4
    expected = vapid_private_key(server.settings).public_key().public_numbers()
    assert int.from_bytes(point[1:33]) == expected.x


async def test_the_whole_chain_websocket_then_web_push_then_sms(
    server_factory: ServerFactory, webpush_env: dict[str, str], fake_push: FakePushService
) -> None:
    """A connected phone that stays silent gets Web Push after 3 s; its subscription is gone
    (410), so nothing reached anyone and the SMS code goes out."""
    server = await webpush_server(server_factory, webpush_env)
    user_id = await add_user_with_phone(server, "chain@example.com")
    phone = await server.enroll_phone(user_id, platform="web")
    await subscribe(server, phone, fake_push)
    fake_push.reply(replies.gone())
    socket = await device_socket(server, phone)
    browser = server.browser()
    try:
        started = await start_login(server, browser, "chain@example.com")
        assert started["channels"] == ["websocket"]
        await next_frame(socket, "approval_request")  # never acknowledged
        async with watch(server, browser, started["approval_id"]) as stream:
            assert (await stream.wait_for(type="delivered"))["channel"] == "sms"
        status = (await browser.get(f"/api/login/{started['approval_id']}")).json()
        assert status["channels"] == ["websocket", "webpush", "sms"]
        assert status["delivered"] == ["sms"]
        assert await push_token(server, phone.device_id) is None
    finally:
        await socket.close()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TAPPROVE_WEBPUSH_TEST_ENDPOINTS": "127.0.0.1:9"}, "needs TAPPROVE_TEST_MODE"),
        (
            {"TAPPROVE_TEST_MODE": "true", "TAPPROVE_PUBLIC_URL": "https://mfa.example.com"},
            "refused with an https TAPPROVE_PUBLIC_URL",
        ),
    ],
)
@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["worker"]])
async def test_the_server_refuses_to_start_with_test_endpoints_outside_tests(
    tmp_path: Path, env: dict[str, str], message: str, command: list[str]
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TAPPROVE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.cli",
        *command,
        env={**clean, "TAPPROVE_DATA_DIR": str(tmp_path), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 1
    assert message in err.decode()
    assert "invalid settings" in err.decode()


def test_the_start_up_block_says_where_web_push_goes_and_when_test_mode_is_on(
    tmp_path: Path,
) -> None:
    plain = startup_banner(Settings(data_dir=tmp_path), "test")
    [row] = [line for line in plain.splitlines() if line.strip().startswith("Web Push")]
    assert "fcm.googleapis.com, push.services.mozilla.com" in row
    assert f"VAPID key {tmp_path.resolve() / 'vapid.pem'}" in row
    assert "only from an https public URL" in row and "TEST MODE" not in row
    testing = startup_banner(
        Settings(data_dir=tmp_path, test_mode=True, webpush_test_endpoints="127.0.0.1:4000"),
        "test",
    )
    assert "TEST MODE, also http to 127.0.0.1:4000" in testing
