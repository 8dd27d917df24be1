"""Cross-site request forgery and cross-site WebSocket hijacking: a page on another site can
make the victim's browser send its cookies, so every cookie-authenticated write refuses a
foreign Origin (403), and the login stream refuses a foreign Origin or a missing cookie at
the handshake (403).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from tests.fixtures.app import LiveServer
from tests.security.harness import (
    EVIL,
    MakePerson,
    add_user,
    approve,
    assert_error,
    login_stream,
    pending_login,
    person,
    unique_email,
)
from tests.security.routes import ROUTES, RouteSpec, target

pytestmark = pytest.mark.timeout(120)

UNSAFE = {"POST", "PATCH", "PUT", "DELETE"}
CSRF_ROUTES = [s for s in ROUTES if s.csrf]


def test_every_cookie_authenticated_write_is_checked_for_csrf() -> None:
    unchecked = [
        s.key
        for s in ROUTES
        if s.method in UNSAFE and s.auth in ("session", "login") and not s.csrf
    ]
    assert not unchecked, f"cookie-authenticated writes without a CSRF test: {unchecked}"


@pytest.mark.parametrize("spec", CSRF_ROUTES, ids=[s.key for s in CSRF_ROUTES])
async def test_a_foreign_origin_is_refused_even_with_valid_cookies(
    server: LiveServer, spec: RouteSpec
) -> None:
    t = await target(server, spec)
    body = await t.body() if spec.body else None
    # A browser that sends no Origin still says where the request came from.
    bare = httpx.AsyncClient(base_url=server.url, cookies=t.client.cookies)
    async with bare:
        attempts = [
            await t.send(json_body=body, headers={"Origin": EVIL}),
            await t.send(json_body=body, headers={"Origin": "null"}),
            await t.send(json_body=body, headers={"Origin": f"{server.origin}.evil.example"}),
            await bare.request(
                spec.method, t.url, json=body, headers={"Sec-Fetch-Site": "cross-site"}
            ),
            await bare.request(
                spec.method, t.url, json=body, headers={"Sec-Fetch-Site": "same-site"}
            ),
        ]
    for response in attempts:
        assert_error(response, 403, "csrf")
    # The same request from the right origin goes through: the Origin was the only problem,
    # and the refused attempts changed nothing (a revoked device would now be 404, say).
    if spec.body:
        body = await t.body()
    control = await t.send(json_body=body)
    assert control.status_code == spec.ok, control.text


async def test_a_forged_logout_keeps_the_session(
    server: LiveServer, make_person: MakePerson
) -> None:
    who = await make_person(server, "logout")
    refused = await who.session.post("/api/logout", headers={"Origin": EVIL})
    assert_error(refused, 403, "csrf")
    assert (await who.session.get("/api/account")).status_code == 200


async def test_a_forged_complete_gives_no_session(
    server: LiveServer, make_person: MakePerson
) -> None:
    who = await make_person(server, "complete")
    login = await pending_login(server, who, fresh=False, remember_browser=True)
    await approve(server, who, login)
    forged = await login.browser.post(
        f"/api/login/{login.approval_id}/complete", headers={"Origin": EVIL}
    )
    assert_error(forged, 403, "csrf")
    assert "tapprove_session" not in forged.cookies and "tapprove_trust" not in forged.cookies
    done = await login.browser.post(f"/api/login/{login.approval_id}/complete")
    assert done.status_code == 200, done.text


async def test_a_forged_enrollment_from_a_password_only_session_is_refused(
    server: LiveServer,
) -> None:
    """The first-device path, forged: a page on another site makes the browser that just
    signed in with the password (a restricted session) ask for an enrollment code."""
    email = unique_email("firstdevice")
    await add_user(server, email)
    browser = server.browser()
    signed_in = await server.login(browser, email)
    assert signed_in.json() == {"status": "enrollment_required"}, signed_in.text
    for headers in ({"Origin": EVIL}, {"Origin": "null"}):
        assert_error(await browser.post("/api/devices/enrollments", headers=headers), 403, "csrf")
    bare = httpx.AsyncClient(base_url=server.url, cookies=browser.cookies)
    async with bare:
        forged = await bare.post(
            "/api/devices/enrollments", headers={"Sec-Fetch-Site": "cross-site"}
        )
    assert_error(forged, 403, "csrf")

    async def codes_created() -> int:
        events = (await browser.get("/api/account/activity")).json()["events"]
        return [e["kind"] for e in events].count("device.enrollment_started")

    assert await codes_created() == 0
    # From the right origin the same session gets its code: only the Origin was refused.
    assert (await browser.post("/api/devices/enrollments")).status_code == 201
    assert await codes_created() == 1


async def test_the_login_stream_refuses_foreign_origins_and_missing_cookies(
    server: LiveServer,
) -> None:
    who = await person(server, "stream")
    first = await pending_login(server, who)
    cookie = first.browser.cookies["tapprove_login"]
    other_person = await person(server, "other")
    other = await pending_login(server, other_person)
    other_cookie = other.browser.cookies["tapprove_login"]
    refused = [
        dict(approval_id=first.approval_id, cookie=None, origin=server.origin),
        dict(approval_id=first.approval_id, cookie=cookie, origin=EVIL),
        dict(approval_id=first.approval_id, cookie=cookie, origin=None),
        dict(approval_id=first.approval_id, cookie=cookie, origin="null"),
        dict(
            approval_id=first.approval_id,
            cookie=cookie,
            origin=server.origin.replace("http://", "https://"),
        ),
        dict(approval_id=first.approval_id, cookie="x" * 43, origin=server.origin),
        dict(approval_id=first.approval_id, cookie=other_cookie, origin=server.origin),
        dict(approval_id=other.approval_id, cookie=cookie, origin=server.origin),
        dict(approval_id="0" * 32, cookie=cookie, origin=server.origin),
        dict(approval_id="%00", cookie=cookie, origin=server.origin),
    ]
    for attempt in refused:
        with pytest.raises(websockets.InvalidStatus) as caught:
            async with login_stream(
                server,
                str(attempt["approval_id"]),
                cookie=attempt["cookie"],
                origin=attempt["origin"],
            ):
                pass
        assert caught.value.response.status_code == 403, attempt
    async with login_stream(
        server, first.approval_id, cookie=cookie, origin=server.origin
    ) as stream:
        frame = await stream.recv()
        assert '"pending"' in str(frame)


async def test_the_login_stream_ignores_what_the_browser_sends(server: LiveServer) -> None:
    """The stream is one-way: frames from the browser change nothing, oversized ones close it."""
    who = await person(server, "chatty")
    login = await pending_login(server, who)
    cookie = login.browser.cookies["tapprove_login"]
    async with login_stream(
        server, login.approval_id, cookie=cookie, origin=server.origin
    ) as stream:
        assert json.loads(await stream.recv())["type"] == "status"
        for frame in ["not json", '{"type": "result", "status": "approved"}', b"\x00\xff", ""]:
            await stream.send(frame)
        await approve(server, who, login)
        frames = [json.loads(await asyncio.wait_for(stream.recv(), 10))]
        while frames[-1]["type"] != "result":
            frames.append(json.loads(await asyncio.wait_for(stream.recv(), 10)))
        assert frames[-1] == {"type": "result", "status": "approved", "reason": "device"}
    other = await pending_login(server, who)
    async with login_stream(
        server,
        other.approval_id,
        cookie=other.browser.cookies["tapprove_login"],
        origin=server.origin,
    ) as stream:
        await stream.recv()
        await stream.send("x" * (70 * 1024))
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(stream.recv(), 10)
        assert stream.close_code == 1009
    assert (await other.browser.get(f"/api/login/{other.approval_id}")).json()[
        "status"
    ] == "pending"
