"""What the attack tests share: a server that lives for a whole module, people and phones to
set up on it, the error-shape check, forged JWS, and socket helpers.

Everything here talks to the server from outside (HTTP, WebSocket, or Redis for reading
state); nothing calls route code directly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import websockets
from argon2 import PasswordHasher

from app.core.clock import Clock, SystemClock
from app.core.signatures import sign_decision
from app.db.accounts import create_api_key, create_user
from app.db.migrate import upgrade_async
from app.delivery.push import Providers
from app.main import create_app
from tests.fixtures.app import PASSWORD, LiveServer, Phone, free_port, make_settings

CHROME = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
EVIL = "https://evil.example"


def unique_email(name: str = "user") -> str:
    return f"{name}-{secrets.token_hex(4)}@example.com"


# --- the shape every error has ----------------------------------------------------------------


def assert_error(
    response: httpx.Response, status: int | set[int], code: str | set[str] | None = None
) -> dict[str, Any]:
    """The response is a protocol error: the status, JSON `{"error","message"}`, the code."""
    allowed = {status} if isinstance(status, int) else status
    assert response.status_code in allowed, (
        f"{response.request.method} {response.request.url.path}: "
        f"{response.status_code} {response.text[:300]}"
    )
    return assert_error_shape(response, code)


def assert_error_shape(
    response: httpx.Response, code: str | set[str] | None = None
) -> dict[str, Any]:
    assert response.headers.get("content-type", "").startswith("application/json"), (
        response.status_code,
        response.headers.get("content-type"),
        response.text[:200],
    )
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    if code is not None:
        codes = {code} if isinstance(code, str) else code
        assert body["error"] in codes, body
    return body


def assert_sane(response: httpx.Response, allowed: set[int]) -> None:
    """Never a 5xx; a status from `allowed`; every error in the protocol's shape."""
    assert response.status_code < 500, (
        f"{response.request.method} {response.request.url.path}: "
        f"{response.status_code} {response.text[:300]}"
    )
    assert response.status_code in allowed, (
        f"{response.request.method} {response.request.url.path}: "
        f"{response.status_code} not in {sorted(allowed)}: {response.text[:300]}"
    )
    if response.status_code >= 400:
        assert_error_shape(response)


# --- a server for a whole module --------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_server(
    tmp_path: Path,
    redis_url: str,
    prefix: str,
    database_url: str,
    *,
    clock: Clock | None = None,
    migrate: bool = True,
    **overrides: Any,
) -> AsyncIterator[tuple[LiveServer, uvicorn.Server]]:
    """A real uvicorn server in this process, like `server_factory`, yielding the uvicorn
    server too so a test can stop it abruptly."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = make_settings(
        tmp_path,
        redis_url,
        prefix,
        database_url,
        public_url=overrides.pop("public_url", url),
        **overrides,
    )
    if migrate:
        await upgrade_async(settings)
    app = create_app(settings, clock=clock or SystemClock(), providers=Providers(), run_worker=True)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        ws="websockets-sansio",
        ws_max_size=64 * 1024,
        ws_per_message_deflate=False,
        log_level="warning",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(1000):
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    live = LiveServer(url, app, settings)
    try:
        yield live, server
    finally:
        for client in live.clients:
            await client.aclose()
        server.should_exit = True
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, timeout=10)


async def clear_limits(server: LiveServer) -> None:
    """Forget every rate-limit counter and push-fatigue backoff of the whole server: only for
    the few tests that need a clean slate on purpose (each says why). Tests are kept apart
    without it: each has its own people and its own source IP (see conftest.py)."""
    redis = server.services.redis
    prefix = server.settings.redis_prefix
    # Fatigue keys carry their user's shard tag: {prefix}{s<k>}:user:<id>:fatigue.
    for pattern in (f"{prefix}rl:*", f"{prefix}*user:*:fatigue"):
        async for key in redis.scan_iter(match=pattern, count=1000):
            await redis.delete(key)


# --- people, phones, sessions -----------------------------------------------------------------


@dataclass
class Person:
    """A verified user with one enrolled phone and a full (device-approved) session.

    Two ways to make one: `person()` writes the code and the session straight into the
    database and Redis (fast, for the many tests about something else), `person_via_routes()`
    goes through the public routes only. A test of a security rule runs at least once with
    the second (the `make_person` fixture gives each test both)."""

    email: str
    user_id: str
    phone: Phone
    session: httpx.AsyncClient


# argon2 at its real cost takes about a second on a loaded test machine; people in these
# tests get a cheap hash of the same password (verification works the same way). Only the
# timing test, which compares against the server's real-cost dummy hash, needs the real one.
_QUICK = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@functools.cache
def quick_hash(password: str) -> str:
    return _QUICK.hash(password)


async def add_user(
    server: LiveServer, email: str, password: str = PASSWORD, *, verified: bool = True
) -> str:
    """A user whose password hash is cheap to verify."""
    async with server.services.db() as db:
        user = await create_user(
            db, email, password_hash=quick_hash(password), verified=verified, now=time.time()
        )
        await db.commit()
        return user.id


async def person(server: LiveServer, name: str = "user", *, phone: bool = True) -> Person:
    """The fast way: the enrollment code from the database, the session written into Redis."""
    email = unique_email(name)
    user_id = await add_user(server, email)
    device = await server.enroll_phone(user_id) if phone else None
    session = server.browser()
    token = await server.services.sessions.create(user_id, approved_with_device=True)
    session.cookies.set("tapprove_session", token)
    return Person(email, user_id, device, session)  # type: ignore[arg-type]


async def person_via_routes(server: LiveServer, name: str = "user") -> Person:
    """A person set up only as a real one is, through the public routes (the account itself
    comes from the database: registration has tests of its own): the password signs in to a
    restricted session (`enrollment_required`), which creates an enrollment code (`POST
    /api/devices/enrollments`) that the phone uses (`POST /api/devices`); the next sign-in is
    approved from the phone's WebSocket and completed. Rate limits and backoffs apply all
    the way, as they would to anyone."""
    email = unique_email(name)
    user_id = await add_user(server, email)
    restricted = server.browser()
    first = await server.login(restricted, email)
    assert first.status_code == 200, first.text
    assert first.json() == {"status": "enrollment_required"}, first.text
    code = await server.enrollment_code_over_http(restricted)
    phone = await server.enroll_with_code(code)
    session = await approved_on_socket(server, email, phone)
    return Person(email, user_id, phone, session)


async def approved_on_socket(
    server: LiveServer, email: str, phone: Phone, **extra: Any
) -> httpx.AsyncClient:
    """A new browser signed in with the password, the approval answered over the phone's
    WebSocket (ack, then a signed decision), and completed."""
    ws = await device_socket(server, phone)
    browser = server.browser()
    try:
        started = await server.login(browser, email, **extra)
        assert started.status_code == 202, started.text
        login = started.json()
        request = await next_frame(ws, "approval_request")
        assert request["approval"]["id"] == login["approval_id"], request
        await ws.send(json.dumps({"type": "ack", "id": login["approval_id"]}))
        jws = phone.sign(request["approval"], number=login["number"])
        await ws.send(json.dumps({"type": "decision", "jws": jws}))
        result = await next_frame(ws, "decision_result")
        assert result == {
            "type": "decision_result",
            "id": login["approval_id"],
            "status": "approved",
        }, result
    finally:
        await ws.close()
    done = await browser.post(f"/api/login/{login['approval_id']}/complete")
    assert done.status_code == 200 and done.json() == {"status": "authenticated"}, done.text
    return browser


MakePerson = Callable[..., Awaitable[Person]]


async def api_key(server: LiveServer, name: str = "rp") -> str:
    async with server.services.db() as db:
        _, key = await create_api_key(db, f"{name}-{secrets.token_hex(4)}", now=time.time())
        await db.commit()
    return key


async def forget_fatigue(server: LiveServer, user_id: str) -> None:
    await server.services.approvals.clear_fatigue(user_id)


def approval_key(server: LiveServer, approval_id: str) -> str:
    """The Redis hash the approval store keeps an approval in."""
    keys = server.services.approvals.keys
    return keys.approval(approval_id, keys.shard_of(approval_id) or 0).hash


@dataclass
class PendingLogin:
    """A browser waiting on an approval, and what the server told it."""

    browser: httpx.AsyncClient
    approval_id: str
    number: str
    body: dict[str, Any]


async def pending_login(
    server: LiveServer, who: Person, *, fresh: bool = True, **extra: Any
) -> PendingLogin:
    """Sign in from a new browser and stop at `approval_required`."""
    if fresh:
        await forget_fatigue(server, who.user_id)
    browser = server.browser()
    response = await server.login(browser, who.email, **extra)
    assert response.status_code == 202, response.text
    body = response.json()
    return PendingLogin(browser, body["approval_id"], body["number"], body)


async def device_view(server: LiveServer, phone: Phone, approval_id: str) -> dict[str, Any]:
    """The Approval object as the phone reads it (with its challenge)."""
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get(f"/api/approvals/{approval_id}", headers=phone.auth)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


async def decide(
    server: LiveServer,
    phone: Phone,
    approval_id: str,
    jws: str,
    client: httpx.AsyncClient | None = None,
) -> httpx.Response:
    if client is None:
        async with httpx.AsyncClient(base_url=server.url) as own:
            return await own.post(
                f"/api/approvals/{approval_id}/decision", json={"jws": jws}, headers=phone.auth
            )
    return await client.post(
        f"/api/approvals/{approval_id}/decision", json={"jws": jws}, headers=phone.auth
    )


async def approve(server: LiveServer, who: Person, login: PendingLogin) -> None:
    approval = await device_view(server, who.phone, login.approval_id)
    answer = await decide(
        server, who.phone, login.approval_id, who.phone.sign(approval, number=login.number)
    )
    assert answer.status_code == 200, answer.text


async def signed_in_browser(server: LiveServer, who: Person, **extra: Any) -> httpx.AsyncClient:
    """A browser that went through login, approval on the phone and complete."""
    login = await pending_login(server, who, **extra)
    await approve(server, who, login)
    done = await login.browser.post(f"/api/login/{login.approval_id}/complete")
    assert done.status_code == 200, done.text
    return login.browser


# --- forged decisions -------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def claims_for(
    approval: dict[str, Any], *, decision: str = "approve", number: Any = None, **extra: Any
) -> dict[str, Any]:
    claims = {
        "aid": approval["id"],
        "chl": approval["challenge"],
        "decision": decision,
        "number": number,
        "iat": int(time.time()),
    }
    claims.update(extra)
    return claims


def unsigned(kid: str, claims: dict[str, Any]) -> str:
    """`alg: none`: no signature at all."""
    return f"{segment({'alg': 'none', 'kid': kid})}.{segment(claims)}."


def hs256_with(secret: bytes, kid: str, claims: dict[str, Any]) -> str:
    """HS256 keyed with `secret` (the classic attack: the device's public key as HMAC key)."""
    signing_input = f"{segment({'alg': 'HS256', 'kid': kid})}.{segment(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def signed(phone: Phone, claims: dict[str, Any], kid: str | None = None) -> str:
    return sign_decision(phone.key, kid or phone.device_id, claims)


# --- sockets ----------------------------------------------------------------------------------


async def device_socket(server: LiveServer, phone: Phone, url: str | None = None) -> Any:
    """An authenticated device socket (after `ready`)."""
    ws = await websockets.connect(f"{url or server.ws_url}/ws/device", max_size=None)
    await ws.send(json.dumps({"type": "auth", "token": phone.token}))
    ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert ready == {"type": "ready", "device_id": phone.device_id}, ready
    return ws


async def next_frame(ws: Any, kind: str, timeout: float = 10) -> dict[str, Any]:
    """Skip frames until one of `kind` arrives."""
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame["type"] == kind:
            return frame


async def close_code(ws: Any, timeout: float = 10) -> int | None:
    """Read until the server closes; the close code it sent."""
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    return ws.close_code  # type: ignore[no-any-return]


def login_stream(
    server: LiveServer, approval_id: str, *, cookie: str | None, origin: str | None = None
) -> Any:
    headers = {"Cookie": f"tapprove_login={cookie}"} if cookie else {}
    return websockets.connect(
        f"{server.ws_url}/ws/login/{approval_id}",
        origin=origin,  # type: ignore[arg-type]
        additional_headers=headers,
    )
