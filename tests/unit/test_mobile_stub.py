"""The reference phone (mobile_stub): keys, decisions, links, state, backoff, and its socket
conversation, driven against a small scripted device server (no tapprove server needed)."""

from __future__ import annotations

import ast
import asyncio
import base64
import json
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

import mobile_stub.client as client_module
from mobile_stub import (
    ApiError,
    Backoff,
    Decision,
    DeviceAuthError,
    DeviceKey,
    DeviceState,
    EnrollLinkError,
    EnrollTarget,
    PhoneClient,
    StateError,
    always,
    enroll,
    load_state,
    parse_enroll,
    save_state,
)
from mobile_stub.cli import Output, event_printer, main
from mobile_stub.protocol import close_is_fatal, decision_claims, device_ws_url, seconds_left
from mobile_stub.state import check_writable

ROOT = Path(__file__).resolve().parents[2]
FAST = Backoff(base=0.01, cap=0.05)


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_state(server_url: str = "http://127.0.0.1:9", key: DeviceKey | None = None) -> DeviceState:
    return DeviceState(
        server_url=server_url,
        device_id="dev-1",
        device_token="device-token-1",
        private_key_pem=(key or DeviceKey.generate()).private_pem(),
        user_email="alice@example.com",
        name="test phone",
        platform="android",
    )


def make_approval(aid: str = "apr-1", **extra: Any) -> dict[str, Any]:
    return {
        "id": aid,
        "status": "pending",
        "created_at": "2026-11-22T10:00:00Z",
        "expires_at": "2026-11-22T10:02:00Z",
        "context": {"ip": "203.0.113.5", "user_agent": "UA", "browser": "Firefox", "os": "Linux"},
        "match": {"mode": "typed", "digits": 2},
        "challenge": "Y2hhbGxlbmdlLWNoYWxsZW5nZS1jaGFsbGVuZ2UtMzI",
        **extra,
    }


# -- keys and decisions --------------------------------------------------------------------


def test_public_jwk_is_a_p256_point_with_32_byte_coordinates() -> None:
    # Enough keys that some coordinates start with a zero byte (the padding edge case).
    for _ in range(300):
        key = DeviceKey.generate()
        jwk = key.public_jwk()
        assert set(jwk) == {"kty", "crv", "x", "y"}
        assert (jwk["kty"], jwk["crv"]) == ("EC", "P-256")
        for coord in ("x", "y"):
            assert "=" not in jwk[coord] and "+" not in jwk[coord] and "/" not in jwk[coord]
            assert len(b64url_decode(jwk[coord])) == 32
        x = int.from_bytes(b64url_decode(jwk["x"]), "big")
        y = int.from_bytes(b64url_decode(jwk["y"]), "big")
        # Building the public key checks that (x, y) lies on the curve.
        point = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        assert isinstance(point, ec.EllipticCurvePublicKey)
        assert DeviceKey.from_pem(key.private_pem()).public_jwk() == jwk


def test_public_jwk_is_accepted_by_pyjwt() -> None:
    jwk = DeviceKey.generate().public_jwk()
    assert isinstance(jwt.PyJWK(jwk).key, ec.EllipticCurvePublicKey)


def test_device_key_refuses_other_curves() -> None:
    with pytest.raises(ValueError, match="P-256"):
        DeviceKey(ec.generate_private_key(ec.SECP384R1()))


def test_an_approval_jws_verifies_with_the_enrolled_jwk_and_has_the_exact_header_and_claims() -> (
    None
):
    key = DeviceKey.generate()
    phone = PhoneClient(make_state(key=key), clock=lambda: 1_800_000_000.7)
    approval = make_approval()

    token = phone.sign(approval, Decision.approve(" 42 "))

    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "dev-1"}
    public = jwt.PyJWK(key.public_jwk()).key
    claims = jwt.decode(token, public, algorithms=["ES256"], options={"verify_iat": False})
    assert claims == {
        "aid": "apr-1",
        "chl": approval["challenge"],
        "decision": "approve",
        "number": "42",
        "iat": 1_800_000_000,
    }
    # ES256 in JWS is the raw 64-byte r||s, not DER.
    assert len(b64url_decode(token.split(".")[2])) == 64


def test_a_fraud_report_is_a_signed_deny_with_reason_fraud() -> None:
    key = DeviceKey.generate()
    token = PhoneClient(make_state(key=key), clock=lambda: 100.0).sign(
        make_approval(), Decision.fraud()
    )
    claims = jwt.decode(
        token, jwt.PyJWK(key.public_jwk()).key, algorithms=["ES256"], options={"verify_iat": False}
    )
    assert claims["decision"] == "deny" and claims["reason"] == "fraud"
    assert set(claims) == {"aid", "chl", "decision", "number", "reason", "iat"}


def test_a_plain_deny_carries_no_reason() -> None:
    claims = decision_claims(make_approval(), Decision.deny(), now=5.0)
    assert claims == {
        "aid": "apr-1",
        "chl": make_approval()["challenge"],
        "decision": "deny",
        "number": "",
        "iat": 5,
    }


def test_a_jws_from_another_key_does_not_verify() -> None:
    token = DeviceKey.generate().sign({"aid": "x"}, kid="dev-1")
    other = jwt.PyJWK(DeviceKey.generate().public_jwk()).key
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, other, algorithms=["ES256"])


# -- enrollment links ----------------------------------------------------------------------


def test_an_enrollment_link_with_a_url_encoded_base_is_decoded() -> None:
    link = "tapprove://enroll?url=https%3A%2F%2Fmfa.example.com%3A8443%2Fauth%2F&code=Zx9_-abc"
    assert parse_enroll(link) == EnrollTarget("https://mfa.example.com:8443/auth", "Zx9_-abc")


def test_a_bare_code_uses_the_server_option() -> None:
    target = parse_enroll("  Zx9abc \n", server="http://127.0.0.1:8000/")
    assert target == EnrollTarget("http://127.0.0.1:8000", "Zx9abc")


def test_the_server_option_overrides_the_link_url() -> None:
    link = "tapprove://enroll?url=https%3A%2F%2Fpublic.example&code=c1"
    assert parse_enroll(link, server="http://10.0.0.2:8000").server_url == "http://10.0.0.2:8000"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc123", "needs --server"),
        ("", "give an enrollment link"),
        ("https://mfa.example.com/enroll?code=x", "scheme must be tapprove://"),
        ("tapprove://pair?url=http%3A%2F%2Fh&code=x", "expected tapprove://enroll"),
        ("tapprove://enroll/extra?url=http%3A%2F%2Fh&code=x", "expected tapprove://enroll"),
        ("tapprove:enroll?url=http%3A%2F%2Fh&code=x", "expected tapprove://enroll"),
        ("tapprove://enroll?url=http%3A%2F%2Fh", "'code' is missing"),
        ("tapprove://enroll?code=x", "'url' is missing"),
        ("tapprove://enroll?url=http%3A%2F%2Fh&code=x&code=y", "'code' appears more than once"),
        ("tapprove://enroll?url=ftp%3A%2F%2Fh&code=x", "http:// or https://"),
        ("tapprove://enroll?url=http%3A%2F%2F&code=x", "http:// or https://"),
        ("tapprove://enroll?url=http%3A%2F%2Fh&code=", "code is empty"),
        ("tapprove://enroll?url=http%3A%2F%2Fh&code=a%20b", "spaces"),
        ("tapprove://enroll?url=http%3A%2F%2Fh&code", "malformed"),
    ],
)
def test_bad_enrollment_links_give_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(EnrollLinkError, match=message):
        parse_enroll(text)


def test_the_device_socket_url_follows_the_server_scheme_and_path() -> None:
    assert device_ws_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/ws/device"
    assert device_ws_url("https://mfa.example.com/auth/") == "wss://mfa.example.com/auth/ws/device"


def test_seconds_left_reads_rfc3339_and_never_goes_negative() -> None:
    approval = make_approval(expires_at="1970-01-01T00:02:00Z")
    assert seconds_left(approval, now=100.0) == 20.0
    assert seconds_left(approval, now=500.0) == 0.0
    assert seconds_left(make_approval(expires_at="soon"), now=0.0) is None


# -- state file ----------------------------------------------------------------------------


def test_the_state_file_is_mode_0600_and_round_trips(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        state = make_state()
        path = tmp_path / "phone.json"
        save_state(path, state)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_state(path) == state
    assert load_state(path).key().public_jwk() == state.key().public_jwk()
    assert [p.name for p in tmp_path.iterdir()] == ["phone.json"]  # no temp file left


def test_saving_refuses_to_overwrite_another_device_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "phone.json"
    path.write_text("{}")
    path.chmod(0o644)
    with pytest.raises(StateError, match="already exists"):
        save_state(path, make_state())
    with pytest.raises(StateError, match="already exists"):
        check_writable(path)
    save_state(path, make_state(), overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found; enroll first"),
        ("not json", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"version": 99}', "version"),
        ('{"version": 1, "server_url": "http://h"}', "'device_id'"),
    ],
)
def test_a_bad_state_file_gives_a_clear_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "phone.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(StateError, match=message):
        load_state(path)


# -- backoff -------------------------------------------------------------------------------


@pytest.mark.parametrize("rand", [lambda: 0.0, lambda: 0.5, lambda: 0.999999999, None])
def test_reconnect_delays_stay_within_zero_and_the_cap(rand: Callable[[], float] | None) -> None:
    backoff = Backoff()
    assert (backoff.base, backoff.cap) == (0.5, 30.0)
    for attempt in [*range(200), 10_000, 10**9]:
        delay = backoff.delay(attempt) if rand is None else backoff.delay(attempt, rand)
        assert 0.0 <= delay <= backoff.ceiling(attempt) <= 30.0


def test_the_backoff_ceiling_doubles_from_the_base_up_to_the_cap() -> None:
    backoff = Backoff()
    assert [backoff.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(3, lambda: 0.5) == 2.0  # full jitter: uniform over [0, ceiling]


def test_only_rejections_and_protocol_errors_end_the_session() -> None:
    for code in (1000, 1001, 1006, 1011, 1012, 1013):
        assert not close_is_fatal(code)
    for code in (4401, 4000, 4999, 1008, 1009, 1002):
        assert close_is_fatal(code)


# -- HTTP calls ----------------------------------------------------------------------------


def json_response(status: int, body: Any) -> httpx.Response:
    return httpx.Response(status, json=body)


async def test_enrolling_posts_the_code_name_platform_jwk_and_push() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return json_response(
            201, {"device_id": "d9", "device_token": "t9", "user": {"email": "bob@example.com"}}
        )

    key = DeviceKey.generate()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        state = await enroll(
            EnrollTarget("http://mfa.test", "code-1"),
            name="Pixel",
            platform="android",
            push={"provider": "fcm", "token": "fcm-token"},
            key=key,
            http=http,
        )
    assert str(seen[0].url) == "http://mfa.test/api/devices" and seen[0].method == "POST"
    assert json.loads(seen[0].content) == {
        "code": "code-1",
        "name": "Pixel",
        "platform": "android",
        "public_key": key.public_jwk(),
        "push": {"provider": "fcm", "token": "fcm-token"},
    }
    assert (state.device_id, state.device_token, state.user_email) == (
        "d9",
        "t9",
        "bob@example.com",
    )
    assert state.key().public_jwk() == key.public_jwk()


async def test_an_expired_enrollment_code_raises_the_protocol_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": "invalid_or_expired_code", "message": "The code is invalid or expired."}
        return json_response(400, body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(ApiError) as caught:
            await enroll(
                EnrollTarget("http://mfa.test", "old"), name="n", platform="ios", http=http
            )
    assert (caught.value.status, caught.value.code) == (400, "invalid_or_expired_code")


async def test_an_http_decision_fetches_the_challenge_and_posts_a_signed_jws() -> None:
    key = DeviceKey.generate()
    approval = make_approval("apr-7")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        assert request.headers["Authorization"] == "Bearer device-token-1"
        if request.method == "GET" and request.url.path == "/api/approvals/apr-7":
            return json_response(200, approval)
        if request.method == "POST" and request.url.path == "/api/approvals/apr-7/decision":
            return json_response(200, {"status": "approved"})
        return json_response(404, {"error": "not_found", "message": "no"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        phone = PhoneClient(make_state("http://mfa.test", key=key), http=http)
        assert await phone.decide_http("apr-7", Decision.approve("42")) == {"status": "approved"}
    claims = jwt.decode(
        json.loads(seen[1].content)["jws"],
        jwt.PyJWK(key.public_jwk()).key,
        algorithms=["ES256"],
    )
    assert (claims["aid"], claims["chl"], claims["number"]) == (
        "apr-7",
        approval["challenge"],
        "42",
    )


async def test_pending_and_unenroll_use_the_device_token() -> None:
    calls: list[tuple[str, str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path, request.headers["Authorization"]))
        if request.method == "GET":
            return json_response(200, {"approvals": [make_approval()]})
        return httpx.Response(204)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        phone = PhoneClient(make_state("http://mfa.test"), http=http)
        assert [a["id"] for a in await phone.pending()] == ["apr-1"]
        await phone.unenroll()
    assert calls == [
        ("GET", "/api/devices/me/approvals", "Bearer device-token-1"),
        ("DELETE", "/api/devices/me", "Bearer device-token-1"),
    ]


async def test_a_revoked_token_on_http_is_an_api_error_with_status_401() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return json_response(401, {"error": "unauthorized", "message": "bad token"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(ApiError) as caught:
            await PhoneClient(make_state("http://mfa.test"), http=http).pending()
    assert caught.value.status == 401


# -- the device socket, against a scripted server ------------------------------------------

Script = Callable[[ServerConnection, "FakeServer"], Awaitable[None]]


class FakeServer:
    """A device-socket server that checks auth, then hands each connection to a script."""

    def __init__(
        self,
        script: Script,
        token: str = "device-token-1",
        http: dict[str, tuple[int, Any]] | None = None,
    ) -> None:
        self.script = script
        self.token = token
        self.http = http or {}  # GET path -> (status, JSON body), for plain HTTP requests
        self.connections = 0
        self.received: list[dict[str, Any]] = []  # every frame from the device, in order
        self.url = ""

    async def recv(self, ws: ServerConnection) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await ws.recv())
        self.received.append(frame)
        return frame

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        auth = await self.recv(ws)
        if auth != {"type": "auth", "token": self.token}:
            await ws.close(4401, "invalid token")
            return
        await ws.send(json.dumps({"type": "ready", "device_id": "dev-1"}))
        await self.script(ws, self)

    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        status, body = self.http.get(request.path, (404, {"error": "not_found", "message": ""}))
        return ws.respond(HTTPStatus(status), json.dumps(body))

    def frames(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.received if f.get("type") == kind]


@asynccontextmanager
async def fake_server(script: Script, **kwargs: Any) -> AsyncIterator[FakeServer]:
    fake = FakeServer(script, **kwargs)
    async with serve(fake.handler, "127.0.0.1", 0, process_request=fake.process_request) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        fake.url = f"http://127.0.0.1:{port}"
        yield fake


async def send_request(ws: ServerConnection, approval: dict[str, Any]) -> None:
    await ws.send(json.dumps({"type": "approval_request", "approval": approval}))


async def test_a_device_authenticates_first_acks_then_sends_a_verifiable_decision() -> None:
    key = DeviceKey.generate()
    approval = make_approval("apr-1")

    async def script(ws: ServerConnection, fake: FakeServer) -> None:
        await send_request(ws, approval)
        assert await fake.recv(ws) == {"type": "ack", "id": "apr-1"}
        decision = await fake.recv(ws)
        claims = jwt.decode(decision["jws"], jwt.PyJWK(key.public_jwk()).key, algorithms=["ES256"])
        assert claims["decision"] == "approve" and claims["number"] == "17"
        await ws.send(json.dumps({"type": "decision_result", "id": "apr-1", "status": "approved"}))
        await ws.wait_closed()

    async with fake_server(script) as fake:
        phone = PhoneClient(make_state(fake.url, key=key), backoff=FAST)
        result = await asyncio.wait_for(phone.run(always(Decision.approve("17")), once=True), 5)

    assert result == {"event": "decision_result", "id": "apr-1", "status": "approved"}
    assert fake.received[0] == {"type": "auth", "token": "device-token-1"}
    assert [f["type"] for f in fake.received] == ["auth", "ack", "decision"]
    names = [e["event"] for e in phone.history]
    assert names[:3] == ["connected", "ready", "approval_request"]
    assert names.index("decision_sent") < names.index("decision_result")
    assert names[-1] == "stopped"


async def test_the_device_acks_before_its_decider_answers() -> None:
    release = asyncio.Event()

    async def decide(approval: dict[str, Any]) -> Decision:
        await release.wait()
        return Decision.deny()

    async def script(ws: ServerConnection, fake: FakeServer) -> None:
        await send_request(ws, make_approval())
        assert (await fake.recv(ws))["type"] == "ack"
        release.set()
        assert (await fake.recv(ws))["type"] == "decision"
        await ws.send(json.dumps({"type": "decision_result", "id": "apr-1", "status": "denied"}))
        await ws.wait_closed()

    async with fake_server(script) as fake:
        phone = PhoneClient(make_state(fake.url), backoff=FAST)
        result = await asyncio.wait_for(phone.run(decide, once=True), 5)
    assert result is not None and result["status"] == "denied"


async def test_a_replayed_request_after_a_restart_is_acked_but_never_decided_twice() -> None:
    calls: list[str] = []

    async def decide(approval: dict[str, Any]) -> Decision:
        calls.append(approval["id"])
        return Decision.deny()

    async def script(ws: ServerConnection, fake: FakeServer) -> None:
        await send_request(ws, make_approval())
        if fake.connections == 1:
            await fake.recv(ws)  # ack
            await fake.recv(ws)  # decision, lost in the restart
            await ws.close(1012, "restarting")
            return
        await fake.recv(ws)  # ack of the replay
        await fake.recv(ws)  # the same decision again
        await ws.send(json.dumps({"type": "decision_result", "id": "apr-1", "status": "denied"}))
        await ws.wait_closed()

    async with fake_server(script) as fake:
        phone = PhoneClient(make_state(fake.url), backoff=FAST)
        result = await asyncio.wait_for(phone.run(decide, once=True), 5)

    assert calls == ["apr-1"]
    assert result is not None and result["status"] == "denied"
    decisions = fake.frames("decision")
    assert len(decisions) == 2 and decisions[0] == decisions[1]  # resent, not re-signed
    sent = [e["resent"] for e in phone.history if e["event"] == "decision_sent"]
    assert sent == [False, True]
    assert len(fake.frames("ack")) == 2
    disconnected = next(e for e in phone.history if e["event"] == "disconnected")
    assert disconnected["code"] == 1012
    assert [e["repeat"] for e in phone.history if e["event"] == "approval_request"] == [
        False,
        True,
    ]


async def test_a_request_already_answered_is_not_answered_again_after_a_drop() -> None:
    async def script(ws: ServerConnection, fake: FakeServer) -> None:
        await send_request(ws, make_approval())
        if fake.connections == 1:
            await fake.recv(ws)
            await fake.recv(ws)
            await ws.send(
                json.dumps({"type": "decision_result", "id": "apr-1", "status": "denied"})
            )
            assert ws.transport is not None
            ws.transport.abort()  # a network drop: no close frame (1006)
            return
        await fake.recv(ws)  # ack
        await ws.wait_closed()

    async with (
        fake_server(script) as fake,
        PhoneClient(make_state(fake.url), backoff=FAST).running(always(Decision.deny())) as phone,
    ):
        first = await phone.wait_for("approval_request", id="apr-1")
        await phone.wait_for("decision_result", id="apr-1")
        replay = await phone.wait_for("approval_request", id="apr-1")
        assert (first["repeat"], replay["repeat"]) == (False, True)
        await asyncio.sleep(0.2)  # time for a wrong second decision to arrive
    assert len(fake.frames("decision")) == 1
    assert len(fake.frames("ack")) == 2
    assert any(e.get("code") == 1006 for e in phone.history if e["event"] == "disconnected")


async def test_a_decision_made_offline_for_an_approval_that_ended_is_settled_over_http() -> None:
    async def script(ws: ServerConnection, fake: FakeServer) -> None:
        if fake.connections == 1:
            await send_request(ws, make_approval())
            await fake.recv(ws)  # ack
            await ws.close(1012, "restart")  # the person is still reading the request
            return
        async for raw in ws:  # the approval expired meanwhile: nothing is replayed
            fake.received.append(json.loads(raw))

    release = asyncio.Event()

    async def decide(approval: dict[str, Any]) -> Decision:
        await release.wait()
        return Decision.approve("42")

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "disconnected":
            release.set()  # answer while offline

    expired = (200, make_approval(status="expired"))
    async with fake_server(script, http={"/api/approvals/apr-1": expired}) as fake:
        phone = PhoneClient(
            make_state(fake.url),
            on_event=on_event,
            backoff=Backoff(base=0.2, cap=0.2),
            rand=lambda: 0.99,
            reconcile_after=0.1,
        )
        result = await asyncio.wait_for(phone.run(decide, once=True), 5)

    assert result == {
        "event": "error",
        "id": "apr-1",
        "error": "expired",
        "status": "expired",
        "via": "http",
    }
    assert fake.frames("decision") == []  # nothing stale was sent to the new socket


async def test_a_revoked_token_stops_with_a_clear_error_and_no_reconnect() -> None:
    async def script(ws: ServerConnection, fake: FakeServer) -> None:
        raise AssertionError("never reached")

    async with fake_server(script, token="another-token") as fake:
        phone = PhoneClient(make_state(fake.url), backoff=FAST)
        with pytest.raises(DeviceAuthError, match="revoked or is invalid"):
            await asyncio.wait_for(phone.run(always(Decision.deny())), 5)
    assert fake.connections == 1
    fatal = next(e for e in phone.history if e["event"] == "fatal")
    assert fatal["code"] == 4401
    assert "reconnecting" not in [e["event"] for e in phone.history]


async def test_the_device_reconnects_after_going_away_and_restarts() -> None:
    async def script(ws: ServerConnection, fake: FakeServer) -> None:
        if fake.connections == 1:
            await ws.close(1001, "going away")
        elif fake.connections == 2:
            await ws.close(1012, "restart")
        else:
            await ws.wait_closed()

    async with (
        fake_server(script) as fake,
        PhoneClient(make_state(fake.url), backoff=FAST).running() as phone,
    ):
        for _ in range(3):
            await phone.wait_for("ready")
    retries = [e for e in phone.history if e["event"] == "reconnecting"]
    assert len(retries) == 2 and all(0 <= e["delay"] <= FAST.cap for e in retries)
    codes = [e.get("code") for e in phone.history if e["event"] == "disconnected"]
    assert codes[:2] == [1001, 1012]
    assert fake.connections == 3


async def test_a_server_that_is_down_is_retried_until_stopped() -> None:
    async with fake_server(lambda ws, fake: ws.wait_closed()) as fake:
        url = fake.url  # nobody listens on this port once the server is gone
    phone = PhoneClient(make_state(url), backoff=FAST)
    task = asyncio.create_task(phone.run())
    for _ in range(3):
        await phone.wait_for("reconnecting")
    phone.stop()
    assert await asyncio.wait_for(task, 2) is None
    retries = [e for e in phone.history if e["event"] == "reconnecting"]
    assert all(0 <= e["delay"] <= FAST.cap for e in retries)
    assert [e["attempt"] for e in retries[:3]] == [1, 2, 3]
    assert phone.history[-1]["event"] == "stopped"


async def test_an_approval_resolved_elsewhere_cancels_the_question() -> None:
    cancelled = asyncio.Event()

    async def decide(approval: dict[str, Any]) -> Decision:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    async def script(ws: ServerConnection, fake: FakeServer) -> None:
        await send_request(ws, make_approval())
        await fake.recv(ws)
        await ws.send(json.dumps({"type": "approval_resolved", "id": "apr-1", "status": "expired"}))
        await ws.wait_closed()

    async with (
        fake_server(script) as fake,
        PhoneClient(make_state(fake.url), backoff=FAST).running(decide) as phone,
    ):
        resolved = await phone.wait_for("approval_resolved", id="apr-1")
        await asyncio.wait_for(cancelled.wait(), 2)
    assert resolved["status"] == "expired"
    assert fake.frames("decision") == []


async def test_error_frames_and_unreadable_frames_are_reported_and_the_socket_stays() -> None:
    async def script(ws: ServerConnection, fake: FakeServer) -> None:
        await ws.send("{not json")
        await ws.send(json.dumps({"type": "error", "error": "bad_message"}))
        await send_request(ws, make_approval())
        await fake.recv(ws)
        await fake.recv(ws)
        await ws.send(json.dumps({"type": "error", "id": "apr-1", "error": "wrong_number"}))
        await ws.wait_closed()

    async with fake_server(script) as fake:
        phone = PhoneClient(make_state(fake.url), backoff=FAST)
        result = await asyncio.wait_for(phone.run(always(Decision.approve("99")), once=True), 5)
    assert result == {"event": "error", "id": "apr-1", "error": "wrong_number"}
    names = [e["event"] for e in phone.history]
    assert names.index("bad_frame") < names.index("error")
    assert names.count("connected") == 1


async def test_a_decider_that_returns_none_leaves_the_request_unanswered() -> None:
    async def script(ws: ServerConnection, fake: FakeServer) -> None:
        await send_request(ws, make_approval())
        async for raw in ws:
            fake.received.append(json.loads(raw))

    async def ignore(approval: dict[str, Any]) -> Decision | None:
        return None

    async with (
        fake_server(script) as fake,
        PhoneClient(make_state(fake.url)).running(ignore) as phone,
    ):
        await phone.wait_for("skipped", id="apr-1")
    assert fake.frames("decision") == []
    assert len(fake.frames("ack")) == 1


async def test_wait_for_times_out_with_the_events_seen_so_far() -> None:
    async with (
        fake_server(lambda ws, fake: ws.wait_closed()) as fake,
        PhoneClient(make_state(fake.url)).running() as phone,
    ):
        await phone.wait_for("ready")
        with pytest.raises(TimeoutError, match="connected, ready"):
            await phone.wait_for("decision_result", timeout=0.05)


async def test_wait_for_fails_fast_once_the_run_has_ended() -> None:
    async with fake_server(lambda ws, fake: ws.wait_closed(), token="other") as fake:
        phone = PhoneClient(make_state(fake.url))
        with pytest.raises(DeviceAuthError):
            await phone.run()
    with pytest.raises(RuntimeError, match="stopped before a 'ready' event"):
        await phone.wait_for("ready", timeout=5)


async def test_events_replays_history_then_ends_when_the_run_stops() -> None:
    async with fake_server(lambda ws, fake: ws.wait_closed()) as fake:
        phone = PhoneClient(make_state(fake.url))
        task = asyncio.create_task(phone.run())
        names: list[str] = []
        async for event in phone.events():
            names.append(event["event"])
            if event["event"] == "ready":
                phone.stop()
        await task
    assert names[:2] == ["connected", "ready"] and names[-1] == "stopped"


async def test_tests_can_send_raw_frames_and_cut_the_network() -> None:
    async def script(ws: ServerConnection, fake: FakeServer) -> None:
        async for raw in ws:
            fake.received.append({"raw": raw})
            await ws.send(json.dumps({"type": "error", "error": "bad_message"}))

    async with (
        fake_server(script) as fake,
        PhoneClient(make_state(fake.url), backoff=FAST).running() as phone,
    ):
        await phone.wait_for("ready")
        await phone.send_frame("{oops")
        assert (await phone.wait_for("error"))["error"] == "bad_message"
        phone.drop_connection()
        assert (await phone.wait_for("disconnected"))["code"] == 1006
        await phone.wait_for("ready")
    assert {"raw": "{oops"} in fake.received
    assert fake.connections == 2


# -- command line --------------------------------------------------------------------------


def test_auto_approve_needs_a_number_source(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["run", "--state", "x.json", "--auto", "approve"])
    assert caught.value.code == 2
    assert "--number-from" in capsys.readouterr().err


def test_a_push_provider_needs_a_push_token(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["enroll", "code", "--state", "x.json", "--push-provider", "fcm"])
    assert "--push-token" in capsys.readouterr().err


def test_enroll_json_prints_exactly_one_object_and_saves_a_private_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert str(request.url) == "https://mfa.example.com/api/devices"
        return json_response(
            201, {"device_id": "d1", "device_token": "t1", "user": {"email": "a@example.com"}}
        )

    real_client = httpx.AsyncClient

    def mocked_client(**kwargs: Any) -> httpx.AsyncClient:
        return real_client(transport=httpx.MockTransport(handler), **kwargs)

    monkeypatch.setattr(client_module.httpx, "AsyncClient", mocked_client)
    state_path = tmp_path / "phone.json"
    link = "tapprove://enroll?url=https%3A%2F%2Fmfa.example.com&code=abc"
    code = main(["enroll", link, "--state", str(state_path), "--json"])

    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out) == {"device_id": "d1", "user": {"email": "a@example.com"}}
    assert out.count("\n") == 1
    assert stat.S_IMODE(state_path.stat().st_mode) == 0o600
    assert load_state(state_path).device_token == "t1"


def test_a_missing_state_file_is_a_usage_error_in_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pending", "--state", str(tmp_path / "none.json"), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"] == "usage"


def test_an_unreachable_server_is_named_in_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as closed:  # a port nobody listens on once the socket is closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    link = f"tapprove://enroll?url=http%3A%2F%2F127.0.0.1%3A{port}&code=abc"

    assert main(["enroll", link, "--state", str(tmp_path / "phone.json")]) == 1

    err = capsys.readouterr().err
    assert f"cannot reach the server at http://127.0.0.1:{port}/api/devices" in err
    assert not (tmp_path / "phone.json").exists()


async def test_run_auto_approve_once_reads_the_number_from_stdin(tmp_path: Path) -> None:
    async def script(ws: ServerConnection, fake: FakeServer) -> None:
        await send_request(ws, make_approval(number_choices=["17", "42", "88"]))
        await fake.recv(ws)
        decision = await fake.recv(ws)
        number = jwt.decode(decision["jws"], options={"verify_signature": False})["number"]
        status = "approved" if number == "42" else "denied"
        await ws.send(json.dumps({"type": "decision_result", "id": "apr-1", "status": status}))
        await ws.wait_closed()

    async with fake_server(script) as fake:
        state_path = tmp_path / "phone.json"
        save_state(state_path, make_state(fake.url))
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "mobile_stub", "run", "--state", str(state_path)],
            *["--auto", "approve", "--number-from", "-", "--once", "--json"],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(b"42\n"), 20)

    assert proc.returncode == 0, stderr.decode()
    events = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [e["event"] for e in events][:3] == ["connected", "ready", "approval_request"]
    sent = next(e for e in events if e["event"] == "decision_sent")
    assert (sent["decision"], sent["number"]) == ("approve", "42")
    assert {"event": "decision_result", "id": "apr-1", "status": "approved"} in events


async def _read_until(stream: asyncio.StreamReader, seen: bytearray, marker: bytes) -> None:
    """Read `stream` into `seen` until `seen` holds `marker` (what the person would see)."""
    while marker not in seen:
        chunk = await asyncio.wait_for(stream.read(4096), 20)
        assert chunk, f"output ended before {marker!r}: {bytes(seen)!r}"
        seen += chunk


async def test_interactive_run_asks_again_below_lines_that_arrive_and_keeps_the_request_open(
    tmp_path: Path,
) -> None:
    """A server restart while the question is open: the reconnect lines do not land on the
    prompt's line, the prompt comes back below them, and the replayed request is not called
    handled (it was not); the answer typed afterwards is the one sent."""
    restart = asyncio.Event()

    async def script(ws: ServerConnection, fake: FakeServer) -> None:
        await send_request(ws, make_approval())
        await fake.recv(ws)  # ack
        if fake.connections == 1:
            await restart.wait()
            await ws.close(1012, "service restart")
            return
        decision = await fake.recv(ws)
        number = jwt.decode(decision["jws"], options={"verify_signature": False})["number"]
        status = "approved" if number == "17" else "denied"
        await ws.send(json.dumps({"type": "decision_result", "id": "apr-1", "status": status}))
        await ws.wait_closed()

    prompt = b"Number shown in the browser: "
    async with fake_server(script) as fake:
        state_path = tmp_path / "phone.json"
        save_state(state_path, make_state(fake.url))
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "mobile_stub", "run", "--state", str(state_path), "--once"],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        assert proc.stdin is not None and proc.stdout is not None
        seen = bytearray()
        try:
            await _read_until(proc.stdout, seen, prompt)
            restart.set()
            replayed = b"still waiting for your answer)\n" + prompt
            await _read_until(proc.stdout, seen, replayed)
            proc.stdin.write(b"17\na\n")
            await proc.stdin.drain()
            rest, stderr = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    text = (bytes(seen) + rest).decode()
    assert proc.returncode == 0, text + stderr.decode()
    lines = text.splitlines()
    # Nothing was printed after a prompt on the same line (a pipe echoes no typing).
    assert [line for line in lines if line.startswith(prompt.decode()) and line != prompt.decode()
            and not line.startswith(prompt.decode() + "Approve")] == []  # fmt: skip
    assert "already handled" not in text
    assert (
        "Disconnected (close 1012 service restart)\n" in text
        and "(request apr-1 sent again by the server after a reconnect; still waiting for your "
        "answer)\n" + prompt.decode() + "Approve, deny or report fraud? [a/d/f]: " in text
    ), text
    assert "Result for apr-1: approved" in text


def test_a_wrong_number_reads_as_a_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    show = event_printer(Output(as_json=False))
    show({"event": "error", "id": "apr-1", "error": "wrong_number", "message": "no match"})
    show({"event": "error", "id": "apr-2", "error": "something_new"})
    out = capsys.readouterr().out
    assert out == (
        "Wrong number: the request was denied (request apr-1)\n"
        "Server error for apr-2: something_new\n"
    )


def test_the_stub_imports_nothing_from_the_server() -> None:
    for path in (ROOT / "mobile_stub").glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "app" or n.startswith("app.") for n in names), path
