"""Each error row of PROTOCOL §2, §3 and §5 that the loop tests do not already cover,
sent as the bad input a real client would send.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from app.core.clock import ManualClock
from tests.fixtures.app import LiveServer, ServerFactory, approval_for

pytestmark = pytest.mark.timeout(60)


async def test_unknown_email_and_wrong_password_get_the_same_401(server: LiveServer) -> None:
    await server.add_user("known@example.com")
    unknown = await server.login(server.browser(), "nobody@example.com")
    wrong = await server.login(server.browser(), "known@example.com", "wrong password!")
    assert unknown.status_code == wrong.status_code == 401
    assert (
        unknown.json()
        == wrong.json()
        == {"error": "invalid_credentials", "message": "email or password is wrong"}
    )


async def test_an_unverified_email_is_refused_only_after_a_correct_password(
    server: LiveServer,
) -> None:
    await server.add_user("new@example.com", verified=False)
    wrong = await server.login(server.browser(), "new@example.com", "not the password")
    assert wrong.status_code == 401
    right = await server.login(server.browser(), "new@example.com")
    assert right.status_code == 403 and right.json()["error"] == "email_not_verified"


async def test_a_user_without_a_device_gets_a_restricted_session(server: LiveServer) -> None:
    await server.add_user("first@example.com")
    browser = server.browser()
    response = await server.login(browser, "first@example.com")
    assert response.status_code == 200 and response.json() == {"status": "enrollment_required"}
    enrollment = await browser.post("/api/devices/enrollments")
    assert enrollment.status_code == 201
    body = enrollment.json()
    assert body["uri"].startswith("tapprove://enroll?url=") and body["code"] in body["uri"]
    assert body["qr_svg"].startswith("<svg") and body["expires_at"].endswith("Z")
    # Restricted: the account page, yes; changing settings, no.
    assert (await browser.get("/api/account")).status_code == 200
    assert (await browser.patch("/api/account", json={"sms_fallback": False})).status_code == 403


async def test_a_second_device_needs_a_session_approved_on_the_first(server: LiveServer) -> None:
    user_id = await server.add_user("second@example.com")
    phone = await server.enroll_phone(user_id)
    browser = server.browser()
    assert (await browser.post("/api/devices/enrollments")).status_code == 401
    started = (await server.login(browser, "second@example.com", remember_browser=True)).json()
    approval = await approval_for(phone, server)
    async with httpx.AsyncClient(base_url=server.url) as app:
        await app.post(
            f"/api/approvals/{approval['id']}/decision",
            json={"jws": phone.sign(approval, number=started["number"])},
            headers=phone.auth,
        )
    assert (await browser.post(f"/api/login/{started['approval_id']}/complete")).status_code == 200
    assert "tapprove_trust" in browser.cookies
    # Approved on the phone: this session may add a phone.
    assert (await browser.post("/api/devices/enrollments")).status_code == 201
    await browser.post("/api/logout")
    # The remembered browser skips approval, but such a session may not add a device.
    again = await server.login(browser, "second@example.com")
    assert again.status_code == 200 and again.json() == {"status": "authenticated"}
    refused = await browser.post("/api/devices/enrollments")
    assert refused.status_code == 403 and refused.json()["error"] == "not_allowed"
    trusted = (await browser.get("/api/account")).json()["trusted_browsers"]
    assert len(trusted) == 1
    revoked = await browser.delete(f"/api/account/trusted-browsers/{trusted[0]['id']}")
    assert revoked.status_code == 200 and revoked.json() == {"status": "revoked"}
    assert (await browser.get("/api/account")).json()["trusted_browsers"] == []
    await browser.post("/api/logout")
    after = await server.login(browser, "second@example.com")
    assert after.status_code == 202, "a revoked trusted browser must ask for approval again"


async def test_a_key_that_is_not_a_p256_point_is_422(server: LiveServer) -> None:
    from app.db.accounts import create_enrollment_code

    user_id = await server.add_user("key@example.com")
    async with server.services.db() as db:
        code, _ = await create_enrollment_code(db, user_id, now=time.time())
        await db.commit()
    bad_point = {"kty": "EC", "crv": "P-256", "x": "A" * 43, "y": "A" * 43}
    async with httpx.AsyncClient(base_url=server.url) as app:
        answer = await app.post(
            "/api/devices",
            json={"code": code, "name": "p", "platform": "android", "public_key": bad_point},
        )
        assert answer.status_code == 422 and answer.json()["error"] == "invalid_request"
        assert "public_key" in answer.json()["message"]
        # The code was not spent by the refused request.
        unknown = await app.post(
            "/api/devices",
            json={
                "code": "not-a-code",
                "name": "p",
                "platform": "android",
                "public_key": {"kty": "EC", "crv": "P-256", "x": "x", "y": "y"},
            },
        )
        assert unknown.status_code == 422


async def test_a_decision_after_expiry_is_410_and_the_final_state_stays_readable(
    server_factory: ServerFactory,
) -> None:
    clock = ManualClock(time.time())
    server = await server_factory(clock=clock)
    user_id = await server.add_user("late@example.com")
    phone = await server.enroll_phone(user_id)
    browser = server.browser()
    started = (await server.login(browser, "late@example.com")).json()
    approval = await approval_for(phone, server)
    clock.advance(server.settings.approval_ttl + 1)
    async with httpx.AsyncClient(base_url=server.url) as app:
        answer = await app.post(
            f"/api/approvals/{approval['id']}/decision",
            json={"jws": phone.sign(approval, number=started["number"], iat=clock.now())},
            headers=phone.auth,
        )
        assert answer.status_code == 410
        assert answer.json()["error"] == "expired" and answer.json()["status"] == "expired"
        seen = await app.get(f"/api/approvals/{approval['id']}", headers=phone.auth)
    assert seen.status_code == 200 and seen.json()["status"] == "expired"
    assert (await browser.get(f"/api/login/{started['approval_id']}")).json()["status"] == "expired"
    done = await browser.post(f"/api/login/{started['approval_id']}/complete")
    assert done.status_code == 409 and done.json()["error"] == "not_approved"


async def test_resend_is_allowed_three_times(server: LiveServer) -> None:
    user_id = await server.add_user("resend@example.com")
    await server.enroll_phone(user_id)
    browser = server.browser()
    started = (await server.login(browser, "resend@example.com")).json()
    codes = [
        (await browser.post(f"/api/login/{started['approval_id']}/resend")).status_code
        for _ in range(4)
    ]
    assert codes == [202, 202, 202, 429]


async def test_rp_approvals_of_another_api_key_are_not_found(server: LiveServer) -> None:
    from app.db.accounts import create_api_key

    user_id = await server.add_user("keys@example.com")
    await server.enroll_phone(user_id)
    async with server.services.db() as db:
        _, vpn = await create_api_key(db, "vpn", now=time.time())
        _, ssh = await create_api_key(db, "ssh", now=time.time())
        await db.commit()

    def headers(key: str) -> dict[str, Any]:
        return {"Authorization": f"Bearer {key}"}

    async with httpx.AsyncClient(base_url=server.url) as app:
        created = await app.post(
            "/api/v1/approvals", json={"user": "keys@example.com"}, headers=headers(vpn)
        )
        approval_id = created.json()["approval_id"]
        mine = await app.get(f"/api/v1/approvals/{approval_id}", headers=headers(vpn))
        theirs = await app.get(f"/api/v1/approvals/{approval_id}", headers=headers(ssh))
        bad_ttl = await app.post(
            "/api/v1/approvals",
            json={"user": "keys@example.com", "ttl": 100000},
            headers=headers(vpn),
        )
    assert mine.status_code == 200 and mine.json()["status"] == "pending"
    assert theirs.status_code == 404 and theirs.json()["error"] == "not_found"
    assert bad_ttl.status_code == 422 and "ttl" in bad_ttl.json()["message"]


async def test_unknown_routes_and_methods_answer_json(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as app:
        missing = await app.get("/api/nothing-here")
        wrong_method = await app.get("/api/login")
        huge = await app.post(
            "/api/login",
            content=b"x" * (64 * 1024 + 1),
            headers={"Content-Type": "application/json"},
        )
        broken = await app.post(
            "/api/login", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        missing_field = await app.post("/api/login", json={"email": "a@example.com"})
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "method_not_allowed"
    assert huge.status_code == 413 and huge.json()["error"] == "too_large"
    assert broken.status_code == 422 and broken.json()["error"] == "invalid_request"
    assert missing_field.status_code == 422 and "password" in missing_field.json()["message"]
