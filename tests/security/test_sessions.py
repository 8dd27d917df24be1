"""What SECURITY.md and PROTOCOL §6 promise about cookies and how long they count: every
cookie (`tapprove_session`, `tapprove_login`, `tapprove_trust`) is HttpOnly and
SameSite=Strict, and Secure when the public URL is https; a session lasts 12 hours from
sign-in however much it is used; a remembered browser is remembered for 30 days.

Lifetimes are read where the server keeps them (the TTL Redis reports, the cookie's
Max-Age) or crossed with a ManualClock the server runs on; nothing sleeps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlmodel import select

from app.core.clock import ManualClock
from app.core.tokens import hash_token
from app.db.models import TrustedBrowser
from app.store.sessions import SESSION_TTL
from tests.fixtures.app import PASSWORD, LiveServer, ServerFactory
from tests.security.harness import (
    CHROME,
    add_user,
    approved_on_socket,
    assert_error,
    person_via_routes,
    unique_email,
)

pytestmark = pytest.mark.timeout(120)

TWELVE_HOURS = 12 * 3600
THIRTY_DAYS = 30 * 86400


@dataclass(frozen=True)
class SetCookie:
    """One `Set-Cookie` header: the cookie and its attributes (names lower-cased; flags map
    to "")."""

    name: str
    value: str
    attributes: dict[str, str]


def set_cookies(response: httpx.Response) -> dict[str, SetCookie]:
    found: dict[str, SetCookie] = {}
    for header in response.headers.get_list("set-cookie"):
        first, *rest = header.split(";")
        name, _, value = first.strip().partition("=")
        attributes = {}
        for part in rest:
            key, _, given = part.strip().partition("=")
            attributes[key.lower()] = given
        found[name] = SetCookie(name, value, attributes)
    return found


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_every_cookie_is_httponly_samesite_strict_and_secure_behind_https(
    server_factory: ServerFactory, scheme: str
) -> None:
    """Every place that sets a cookie, on a live server: the password-only sign-in
    (restricted session), the sign-in waiting for the phone (login cookie), `complete`
    (session and trust cookie), the remembered browser's sign-in (session), and sign-out."""
    if scheme == "https":
        server = await server_factory(public_url="https://mfa.example.test")
    else:
        server = await server_factory()
    origin = server.settings.public_url
    email = unique_email("cookies")
    await add_user(server, email)
    seen: list[SetCookie] = []
    # The server is reached over plain HTTP here, where a client keeps no Secure cookie; so
    # this client sends each cookie itself, as the browser on https would.
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Origin": origin, "User-Agent": CHROME}, timeout=30
    ) as client:

        async def call(
            method: str, path: str, cookies: dict[str, str] | None = None, **kwargs: Any
        ) -> tuple[httpx.Response, dict[str, SetCookie]]:
            client.cookies.clear()
            headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in (cookies or {}).items())}
            response = await client.request(
                method, path, headers=headers if cookies else {}, **kwargs
            )
            found = set_cookies(response)
            seen.extend(found.values())
            return response, found

        credentials = {"email": email, "password": PASSWORD}
        answer, found = await call("POST", "/api/login", json=credentials)
        assert answer.json() == {"status": "enrollment_required"}, answer.text
        restricted = found["tapprove_session"]
        answer, _ = await call(
            "POST", "/api/devices/enrollments", cookies={"tapprove_session": restricted.value}
        )
        assert answer.status_code == 201, answer.text
        phone = await server.enroll_with_code(answer.json()["code"])

        answer, found = await call(
            "POST", "/api/login", json={**credentials, "remember_browser": True}
        )
        assert answer.status_code == 202, answer.text
        started, login_cookie = answer.json(), found["tapprove_login"]
        async with httpx.AsyncClient(base_url=server.url, headers=phone.auth) as app:
            approval = (await app.get(f"/api/approvals/{started['approval_id']}")).json()
            decided = await app.post(
                f"/api/approvals/{started['approval_id']}/decision",
                json={"jws": phone.sign(approval, number=started["number"])},
            )
        assert decided.json() == {"status": "approved"}
        answer, found = await call(
            "POST",
            f"/api/login/{started['approval_id']}/complete",
            cookies={"tapprove_login": login_cookie.value},
        )
        assert answer.status_code == 200, answer.text
        session, trust = found["tapprove_session"], found["tapprove_trust"]

        answer, found = await call(
            "POST", "/api/login", json=credentials, cookies={"tapprove_trust": trust.value}
        )
        assert answer.json() == {"status": "authenticated"}, answer.text
        trusted_session = found["tapprove_session"]
        answer, found = await call(
            "POST", "/api/logout", cookies={"tapprove_session": trusted_session.value}
        )
        assert answer.status_code == 200, answer.text
        signed_out = found["tapprove_session"]

    assert [c.name for c in seen] == [
        "tapprove_session",
        "tapprove_login",
        "tapprove_trust",
        "tapprove_session",
        "tapprove_session",
        "tapprove_session",
    ], seen
    for cookie in seen:
        assert "httponly" in cookie.attributes, cookie
        assert cookie.attributes.get("samesite", "").lower() == "strict", cookie
        assert cookie.attributes.get("path") == "/", cookie
        assert ("secure" in cookie.attributes) == (scheme == "https"), cookie
    # How long each lives in the browser: sessions until the browser closes (the server
    # ends them after 12 h), the login binding a little past its approval, the trust 30 days.
    for cookie in (restricted, session, trusted_session):
        assert "max-age" not in cookie.attributes and "expires" not in cookie.attributes, cookie
    assert int(login_cookie.attributes["max-age"]) == server.settings.approval_ttl + 300
    assert int(trust.attributes["max-age"]) == THIRTY_DAYS
    assert signed_out.value in ("", '""') and int(signed_out.attributes["max-age"]) == 0
    # Sessions of every kind last 12 hours on the server, counted from the sign-in.
    for cookie in (restricted, session):
        key = server.services.keys.session(hash_token(cookie.value))
        ttl = await server.services.redis.ttl(key)
        assert TWELVE_HOURS - 60 <= ttl <= TWELVE_HOURS, (cookie.name, ttl)
    # Sessions are server-side: the one signed out is gone, whatever its cookie says.
    signed_out_key = server.services.keys.session(hash_token(trusted_session.value))
    assert not await server.services.redis.exists(signed_out_key)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        cookie = {"Cookie": f"tapprove_session={trusted_session.value}"}
        assert_error(await client.get("/api/account", headers=cookie), 401, "unauthorized")
        cookie = {"Cookie": f"tapprove_session={session.value}"}
        assert (await client.get("/api/account", headers=cookie)).json()["email"] == email


async def test_a_session_ends_12_hours_after_sign_in_however_much_it_is_used(
    server: LiveServer,
) -> None:
    assert SESSION_TTL == TWELVE_HOURS
    who = await person_via_routes(server, "lifetime")
    redis = server.services.redis
    key = server.services.keys.session(hash_token(who.session.cookies["tapprove_session"]))
    assert TWELVE_HOURS - 60 <= await redis.ttl(key) <= TWELVE_HOURS
    # Near the end of its 12 hours (the TTL set as the hours would have left it), using the
    # session does not stretch it: the lifetime is absolute, not counted from the last use.
    await redis.expire(key, 90)
    for path in ("/api/account", "/api/devices", "/api/account/activity"):
        assert (await who.session.get(path)).status_code == 200
    assert 0 < await redis.ttl(key) <= 90
    # And when the 12 hours are up the session is gone, whatever the cookie still says.
    await redis.pexpire(key, 1)
    deadline = time.monotonic() + 10
    while await redis.exists(key):
        assert time.monotonic() < deadline, "the session key outlived its TTL"
    assert_error(await who.session.get("/api/account"), 401, "unauthorized")


async def test_a_remembered_browser_is_remembered_for_30_days_and_no_longer(
    server_factory: ServerFactory,
) -> None:
    clock = ManualClock(time.time())
    server = await server_factory(clock=clock)
    who = await person_via_routes(server, "remembered")
    trusted = await approved_on_socket(server, who.email, who.phone, remember_browser=True)
    async with server.services.db() as db:
        [row] = (
            await db.exec(select(TrustedBrowser).where(TrustedBrowser.user_id == who.user_id))
        ).all()
    assert row.expires_at - row.created_at == timedelta(days=30)

    clock.advance(THIRTY_DAYS - 60)
    still = await server.login(trusted, who.email)
    assert still.status_code == 200 and still.json() == {"status": "authenticated"}, still.text
    clock.advance(120)
    forgotten = await server.login(trusted, who.email)
    assert forgotten.status_code == 202, forgotten.text
    assert forgotten.json()["status"] == "approval_required"
