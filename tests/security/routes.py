"""The attack surface, route by route: how to reach each route as a legitimate caller (so a
hostile input gets past authentication to the code that parses it), a well-formed body, and
what the route may answer to well-formed nonsense.

`ROUTES` must name every route of `app.main.all_routes()`; test_routes fails otherwise, so a
new route cannot ship without its hostile-input tests.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from app.core.signatures import device_public_jwk
from app.core.tokens import b64url
from app.db.accounts import create_enrollment_code
from tests.fakes.authenticator import SoftAuthenticator
from tests.fixtures.app import PASSWORD, LiveServer
from tests.security.harness import (
    Person,
    api_key,
    device_view,
    forget_fatigue,
    pending_login,
    person,
    unique_email,
)

Auth = Literal["none", "session", "login", "device", "api_key"]


@dataclass(frozen=True)
class RouteSpec:
    """One route as an attacker sees it."""

    method: str  # HTTP method, or "WS" for a WebSocket route, "MOUNT" for static files
    path: str  # the route's template, as in all_routes()
    auth: Auth
    # Whether a well-formed body is JSON the route reads (None: the route reads no body).
    body: Callable[[Target], Awaitable[dict[str, Any]]] | None = None
    # Top-level fields that may be left out or sent as null.
    optional: frozenset[str] = frozenset()
    # What a well-formed body with harmless content gets.
    ok: int = 200
    # Every status a well-formed body with hostile content may get (besides 422).
    outcomes: frozenset[int] = frozenset()
    # A cookie-authenticated write: a foreign Origin must be refused (CSRF).
    csrf: bool = False
    # Whose protocol the route speaks: "duo" mounts answer in Duo's own shapes and have
    # their hostile-input tests in tests/security/test_duo_hostile.py.
    protocol: Literal["tapprove", "duo"] = "tapprove"

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Target:
    """A route made concrete: the URL with real ids, and a client that passes its auth."""

    spec: RouteSpec
    server: LiveServer
    who: Person
    client: httpx.AsyncClient
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    approval: dict[str, Any] | None = None

    async def body(self) -> dict[str, Any]:
        assert self.spec.body is not None
        return copy.deepcopy(await self.spec.body(self))

    async def send(
        self,
        *,
        content: bytes | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        merged = {**self.headers, **(headers or {})}
        if json_body is not None:
            return await self.client.request(
                self.spec.method, self.url, json=json_body, headers=merged
            )
        if content is not None:
            merged.setdefault("Content-Type", "application/json")
        return await self.client.request(
            self.spec.method, self.url, content=content, headers=merged
        )


# --- well-formed bodies -----------------------------------------------------------------------


async def _register(t: Target) -> dict[str, Any]:
    return {"email": unique_email("reg"), "password": "a long enough password"}


async def _token(t: Target) -> dict[str, Any]:
    return {"token": "A" * 43}


async def _email(t: Target) -> dict[str, Any]:
    return {"email": unique_email("resend")}


async def _login(t: Target) -> dict[str, Any]:
    await forget_fatigue(t.server, t.who.user_id)
    return {"email": t.who.email, "password": PASSWORD, "remember_browser": False}


async def _recovery_login(t: Target) -> dict[str, Any]:
    return {"email": t.who.email, "password": PASSWORD, "code": "abcde-fghjk"}


async def _code(t: Target) -> dict[str, Any]:
    return {"code": "123456"}


async def _passcode(t: Target) -> dict[str, Any]:
    return {"passcode": "123456"}


# The authenticator holding each person's passkey (one per user id), for the bodies below.
_AUTHENTICATORS: dict[str, SoftAuthenticator] = {}


async def _creation_options(t: Target) -> dict[str, Any]:
    """What `POST /api/account/passkeys/options` gives, its challenge issued directly (the
    options route has a per-IP budget the hostile-input tests would spend)."""
    settings = t.server.settings
    challenge = await t.server.services.webauthn.issue("register", user_id=t.who.user_id, ttl=300)
    return {
        "rp": {"id": settings.webauthn_rp_id},
        "user": {"id": b64url(t.who.user_id.encode())},
        "challenge": b64url(challenge),
    }


async def _new_passkey(t: Target) -> dict[str, Any]:
    authenticator = _AUTHENTICATORS.setdefault(t.who.user_id, SoftAuthenticator(t.server.origin))
    return {"credential": authenticator.create(await _creation_options(t)), "name": "Laptop"}


async def add_passkey(t: Target) -> str:
    """Give the target's person a passkey through the route; its id."""
    added = await t.who.session.post("/api/account/passkeys", json=await _new_passkey(t))
    assert added.status_code == 201, added.text
    passkey_id: str = added.json()["id"]
    return passkey_id


async def _passkey_answer(t: Target) -> dict[str, Any]:
    if t.who.user_id not in _AUTHENTICATORS:
        await add_passkey(t)
    challenge = await t.server.services.webauthn.issue("login", user_id=None, ttl=300)
    options = {"rpId": t.server.settings.webauthn_rp_id, "challenge": b64url(challenge)}
    return {"credential": _AUTHENTICATORS[t.who.user_id].get(options)}


async def _passkey_name(t: Target) -> dict[str, Any]:
    return {"name": "Renamed laptop"}


async def _sms_fallback(t: Target) -> dict[str, Any]:
    return {"sms_fallback": True}


async def _phone(t: Target) -> dict[str, Any]:
    return {"phone": "+14155552671"}


async def _enroll(t: Target) -> dict[str, Any]:
    async with t.server.services.db() as db:
        code, _ = await create_enrollment_code(db, t.who.user_id, now=time.time())
        await db.commit()
    key = ec.generate_private_key(ec.SECP256R1())
    return {
        "code": code,
        "name": "Pixel 9",
        "platform": "android",
        "public_key": device_public_jwk(key.public_key()),
        "push": {"provider": "fcm", "token": "fcm-registration-token"},
    }


async def _device_update(t: Target) -> dict[str, Any]:
    return {"name": "Renamed", "push": {"provider": "apns", "token": "apns-device-token"}}


async def _decision(t: Target) -> dict[str, Any]:
    assert t.approval is not None
    return {"jws": t.who.phone.sign(t.approval, "deny")}


async def _rp_create(t: Target) -> dict[str, Any]:
    await forget_fatigue(t.server, t.who.user_id)
    return {
        "user": t.who.email,
        "ttl": 60,
        "context": {"ip": "10.0.0.1", "user_agent": "OpenSSH_9.6", "browser": "ssh", "os": "Linux"},
    }


_ANY_ERROR = frozenset({400, 401, 403, 404, 409, 410, 422, 429})

ROUTES: list[RouteSpec] = [
    # §6 operations
    RouteSpec("GET", "/healthz", "none"),
    RouteSpec("GET", "/readyz", "none"),
    RouteSpec("GET", "/metrics", "none"),
    RouteSpec("GET", "/openapi.json", "none"),
    # §1 accounts
    RouteSpec("POST", "/api/register", "none", _register, ok=202, outcomes=frozenset({202})),
    RouteSpec("GET", "/verify-email", "none"),
    RouteSpec("POST", "/api/verify-email", "none", _token, ok=400, outcomes=frozenset({400})),
    RouteSpec(
        "POST", "/api/verify-email/resend", "none", _email, ok=202, outcomes=frozenset({202})
    ),
    # §2 browser
    RouteSpec(
        "POST",
        "/api/login",
        "none",
        _login,
        optional=frozenset({"remember_browser"}),
        ok=202,
        outcomes=frozenset({202, 401, 429}),
        csrf=True,
    ),
    RouteSpec(
        "POST",
        "/api/login/recovery",
        "none",
        _recovery_login,
        ok=400,
        outcomes=frozenset({400, 401, 429}),
        csrf=True,
    ),
    RouteSpec("POST", "/api/login/passkey/options", "none", csrf=True),
    RouteSpec(
        "POST",
        "/api/login/passkey",
        "none",
        _passkey_answer,
        optional=frozenset({"credential.response.userHandle"}),
        outcomes=frozenset({400}),
        csrf=True,
    ),
    RouteSpec("GET", "/api/login/{approval_id}", "login"),
    RouteSpec("POST", "/api/login/{approval_id}/complete", "login", ok=409, csrf=True),
    RouteSpec("POST", "/api/login/{approval_id}/resend", "login", ok=202, csrf=True),
    RouteSpec("POST", "/api/login/{approval_id}/sms", "login", ok=409, csrf=True),
    RouteSpec(
        "POST",
        "/api/login/{approval_id}/code",
        "login",
        _code,
        ok=400,
        outcomes=frozenset({400, 409, 410}),
        csrf=True,
    ),
    RouteSpec(
        "POST",
        "/api/login/{approval_id}/passcode",
        "login",
        _code,
        ok=400,
        outcomes=frozenset({400, 409, 410, 429}),
        csrf=True,
    ),
    RouteSpec("POST", "/api/logout", "session", csrf=True),
    RouteSpec("WS", "/ws/login/{approval_id}", "login"),
    RouteSpec("GET", "/api/account", "session"),
    RouteSpec(
        "PATCH",
        "/api/account",
        "session",
        _sms_fallback,
        optional=frozenset({"sms_fallback"}),
        csrf=True,
    ),
    RouteSpec("DELETE", "/api/account/trusted-browsers/{browser_id}", "session", ok=404, csrf=True),
    RouteSpec("GET", "/api/account/activity", "session"),
    RouteSpec("POST", "/api/account/recovery-codes", "session", ok=201, csrf=True),
    RouteSpec("POST", "/api/account/passkeys/options", "session", csrf=True),
    RouteSpec(
        "POST",
        "/api/account/passkeys",
        "session",
        _new_passkey,
        optional=frozenset({"name"}),
        ok=201,
        outcomes=frozenset({201, 400, 409}),
        csrf=True,
    ),
    RouteSpec(
        "PATCH",
        "/api/account/passkeys/{passkey_id}",
        "session",
        _passkey_name,
        outcomes=frozenset({200}),
        csrf=True,
    ),
    RouteSpec("DELETE", "/api/account/passkeys/{passkey_id}", "session", csrf=True),
    RouteSpec(
        "POST",
        "/api/account/phone",
        "session",
        _phone,
        ok=409,
        outcomes=frozenset({409}),
        csrf=True,
    ),
    RouteSpec(
        "POST",
        "/api/account/phone/verify",
        "session",
        _code,
        ok=400,
        outcomes=frozenset({400}),
        csrf=True,
    ),
    # §3 devices
    RouteSpec("POST", "/api/devices/enrollments", "session", ok=201, csrf=True),
    RouteSpec(
        "POST",
        "/api/devices",
        "none",
        _enroll,
        optional=frozenset({"push"}),
        ok=201,
        outcomes=frozenset({201, 400}),
    ),
    RouteSpec("GET", "/api/devices", "session"),
    RouteSpec(
        "PATCH",
        "/api/devices/me",
        "device",
        _device_update,
        optional=frozenset({"name", "push"}),
        outcomes=frozenset({200}),
    ),
    RouteSpec("DELETE", "/api/devices/me", "device"),
    RouteSpec("GET", "/api/devices/me/approvals", "device"),
    RouteSpec("DELETE", "/api/devices/{device_id}", "session", csrf=True),
    RouteSpec("GET", "/api/approvals/{approval_id}", "device"),
    RouteSpec(
        "POST",
        "/api/approvals/{approval_id}/decision",
        "device",
        _decision,
        outcomes=frozenset({400, 404, 409}),
    ),
    RouteSpec("WS", "/ws/device", "device"),
    RouteSpec("GET", "/api/webpush/key", "none"),
    # §5 relying parties
    RouteSpec(
        "POST",
        "/api/v1/approvals",
        "api_key",
        _rp_create,
        optional=frozenset(
            {"context", "ttl", "context.ip", "context.user_agent", "context.browser", "context.os"}
        ),
        ok=201,
        outcomes=frozenset({201, 404}),
    ),
    RouteSpec("GET", "/api/v1/approvals/{approval_id}", "api_key"),
    RouteSpec(
        "POST",
        "/api/v1/approvals/{approval_id}/passcode",
        "api_key",
        _passcode,
        ok=400,
        outcomes=frozenset({400, 409, 410, 429}),
    ),
    # pages and their static files
    RouteSpec("GET", "/", "none"),
    RouteSpec("GET", "/register", "none"),
    RouteSpec("GET", "/account", "none"),
    RouteSpec("GET", "/phone", "none"),
    RouteSpec("GET", "/favicon.ico", "none"),
    RouteSpec("GET", "/phone/manifest.webmanifest", "none"),
    RouteSpec("GET", "/phone/sw.js", "none"),
    RouteSpec("MOUNT", "/static", "none"),
    # the Duo Auth API (signed with an integration's skey; tests/security/test_duo_hostile.py)
    RouteSpec("MOUNT", "/auth/v2", "none", protocol="duo"),
    RouteSpec("MOUNT", "/rest/v1", "none", protocol="duo"),
]

BY_KEY = {spec.key: spec for spec in ROUTES}
BODY_ROUTES = [spec for spec in ROUTES if spec.body is not None]
HTTP_ROUTES = [spec for spec in ROUTES if spec.method not in ("WS", "MOUNT")]


async def target(server: LiveServer, spec: RouteSpec, who: Person | None = None) -> Target:
    """Reach `spec` as its legitimate caller: the right credential and real path ids."""
    who = who or await person(server, "target")
    client: httpx.AsyncClient = server.browser()
    headers: dict[str, str] = {}
    params: dict[str, str] = {}
    approval: dict[str, Any] | None = None
    if spec.auth == "session":
        client = who.session
    elif spec.auth == "login":
        login = await pending_login(server, who)
        client = login.browser
        params["approval_id"] = login.approval_id
    elif spec.auth == "device":
        headers = who.phone.auth
        if "{approval_id}" in spec.path:
            login = await pending_login(server, who)
            params["approval_id"] = login.approval_id
            approval = await device_view(server, who.phone, login.approval_id)
    elif spec.auth == "api_key":
        key = await api_key(server)
        headers = {"Authorization": f"Bearer {key}"}
        if "{approval_id}" in spec.path:
            await forget_fatigue(server, who.user_id)
            created = await client.post(
                "/api/v1/approvals", json={"user": who.email}, headers=headers
            )
            assert created.status_code == 201, created.text
            params["approval_id"] = created.json()["approval_id"]
    if "{device_id}" in spec.path:
        spare = await server.enroll_phone(who.user_id, name="spare")
        params["device_id"] = spare.device_id
    if "{browser_id}" in spec.path:
        params["browser_id"] = "0" * 32
    made = Target(spec, server, who, client, "", headers, approval)
    if "{passkey_id}" in spec.path:
        params["passkey_id"] = await add_passkey(made)
    made.url = spec.path.format(**params) if spec.method != "MOUNT" else "/static/app.css"
    return made


def string_leaves(value: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths to every string in a JSON body."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in string_leaves(v, (*path, k))]
    return [path] if isinstance(value, str) else []


def leaves(value: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths to every member of a JSON body, objects included."""
    if isinstance(value, dict):
        found: list[tuple[str, ...]] = [path] if path else []
        return found + [p for k, v in value.items() for p in leaves(v, (*path, k))]
    return [path]


def get_path(body: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        body = body[part]
    return body


def set_path(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(body)
    here = changed
    for part in path[:-1]:
        here = here[part]
    here[path[-1]] = value
    return changed


def drop_path(body: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    changed = copy.deepcopy(body)
    here = changed
    for part in path[:-1]:
        here = here[part]
    del here[path[-1]]
    return changed
