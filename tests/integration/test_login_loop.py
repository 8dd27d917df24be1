"""The core loop through a real server: login → Redis → phone over WebSocket → signed
decision → browser stream → complete. Real Redis, real PostgreSQL, real sockets.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import websockets

from tests.fixtures.app import LiveServer, Phone, approval_for

pytestmark = pytest.mark.timeout(60)


async def device_socket(server: LiveServer, phone: Phone) -> Any:
    ws = await websockets.connect(f"{server.ws_url}/ws/device")
    await ws.send(json.dumps({"type": "auth", "token": phone.token}))
    ready = json.loads(await ws.recv())
    assert ready == {"type": "ready", "device_id": phone.device_id}
    return ws


async def next_frame(ws: Any, kind: str, timeout: float = 5) -> dict[str, Any]:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        assert frame["type"] != "error" or kind == "error", frame
        if frame["type"] == kind:
            return frame


def login_stream(
    server: LiveServer, browser: httpx.AsyncClient, approval_id: str, origin: str | None = None
) -> Any:
    cookie = browser.cookies.get("tapprove_login")
    headers = {"Cookie": f"tapprove_login={cookie}"} if cookie else {}
    return websockets.connect(
        f"{server.ws_url}/ws/login/{approval_id}",
        origin=origin or server.origin,  # type: ignore[arg-type]
        additional_headers=headers,
    )


async def test_a_phone_approves_a_login_and_the_browser_signs_in(server: LiveServer) -> None:
    user_id = await server.add_user("ada@example.com")
    phone = await server.enroll_phone(user_id)
    ws = await device_socket(server, phone)
    browser = server.browser()

    response = await server.login(browser, "ada@example.com")
    assert response.status_code == 202, response.text
    started = response.json()
    assert started["status"] == "approval_required"
    assert started["match"] == {"mode": "typed", "digits": 2}
    assert len(started["number"]) == 2 and started["number"].isdigit()
    assert started["channels"] == ["websocket"]
    assert started["stream"] == f"/ws/login/{started['approval_id']}"
    assert started["expires_at"].endswith("Z")

    async with login_stream(server, browser, started["approval_id"]) as stream:
        first = json.loads(await stream.recv())
        assert first == {"type": "status", "status": "pending", "channels": ["websocket"]}

        request = await next_frame(ws, "approval_request")
        approval = request["approval"]
        assert approval["id"] == started["approval_id"]
        assert "number" not in approval and started["number"] not in json.dumps(approval["match"])
        assert approval["context"]["browser"].startswith("Chrome")
        assert approval["context"]["os"] == "Linux"
        assert approval["context"]["ip"] == "127.0.0.1"
        await ws.send(json.dumps({"type": "ack", "id": approval["id"]}))
        assert json.loads(await stream.recv()) == {"type": "delivered", "channel": "websocket"}

        await ws.send(
            json.dumps({"type": "decision", "jws": phone.sign(approval, number=started["number"])})
        )
        # Every device hears that it ended; the deciding one also gets its own result.
        frames = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(2)]
        assert sorted(frames, key=lambda f: f["type"]) == [
            {
                "type": "approval_resolved",
                "id": approval["id"],
                "status": "approved",
                "reason": "device",
            },
            {"type": "decision_result", "id": approval["id"], "status": "approved"},
        ]
        assert json.loads(await stream.recv()) == {
            "type": "result",
            "status": "approved",
            "reason": "device",
        }
        with pytest.raises(websockets.ConnectionClosedOK):
            await stream.recv()

    done = await browser.post(f"/api/login/{started['approval_id']}/complete")
    assert done.status_code == 200 and done.json() == {"status": "authenticated"}
    assert "tapprove_session" in browser.cookies
    account = await browser.get("/api/account")
    assert account.status_code == 200 and account.json()["email"] == "ada@example.com"
    again = await browser.post(f"/api/login/{started['approval_id']}/complete")
    assert again.status_code == 409 and again.json()["error"] == "already_completed"
    await ws.close()


async def test_a_denied_login_cannot_be_completed(server: LiveServer) -> None:
    user_id = await server.add_user("bob@example.com")
    phone = await server.enroll_phone(user_id)
    browser = server.browser()
    started = (await server.login(browser, "bob@example.com")).json()
    approval = await approval_for(phone, server)
    async with httpx.AsyncClient(base_url=server.url) as app:
        answer = await app.post(
            f"/api/approvals/{approval['id']}/decision",
            json={"jws": phone.sign(approval, "deny")},
            headers=phone.auth,
        )
    assert answer.status_code == 200 and answer.json() == {"status": "denied"}
    async with login_stream(server, browser, started["approval_id"]) as stream:
        assert json.loads(await stream.recv()) == {
            "type": "result",
            "status": "denied",
            "reason": "denied",
        }
    status = await browser.get(f"/api/login/{started['approval_id']}")
    assert status.json()["status"] == "denied"
    done = await browser.post(f"/api/login/{started['approval_id']}/complete")
    assert done.status_code == 409 and done.json()["error"] == "not_approved"


async def test_a_wrong_number_denies_the_approval(server: LiveServer) -> None:
    user_id = await server.add_user("cy@example.com")
    phone = await server.enroll_phone(user_id)
    browser = server.browser()
    started = (await server.login(browser, "cy@example.com")).json()
    approval = await approval_for(phone, server)
    wrong = f"{(int(started['number']) + 1) % 100:02d}"
    async with httpx.AsyncClient(base_url=server.url) as app:
        answer = await app.post(
            f"/api/approvals/{approval['id']}/decision",
            json={"jws": phone.sign(approval, number=wrong)},
            headers=phone.auth,
        )
        assert answer.status_code == 422 and answer.json()["error"] == "wrong_number"
        # The right number afterwards is too late: the approval is already denied.
        retry = await app.post(
            f"/api/approvals/{approval['id']}/decision",
            json={"jws": phone.sign(approval, number=started["number"])},
            headers=phone.auth,
        )
    assert retry.status_code == 409 and retry.json()["error"] == "already_decided"
    assert (await browser.get(f"/api/login/{started['approval_id']}")).json()["status"] == "denied"


async def test_racing_decisions_have_exactly_one_winner(server: LiveServer) -> None:
    user_id = await server.add_user("race@example.com")
    phone = await server.enroll_phone(user_id)
    browser = server.browser()
    started = (await server.login(browser, "race@example.com")).json()
    approval = await approval_for(phone, server)
    async with httpx.AsyncClient(base_url=server.url) as app:
        answers = await asyncio.gather(
            *(
                app.post(
                    f"/api/approvals/{approval['id']}/decision",
                    json={
                        "jws": phone.sign(
                            approval, "approve" if i % 2 else "deny", number=started["number"]
                        )
                    },
                    headers=phone.auth,
                )
                for i in range(20)
            )
        )
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) == 1, codes
    assert codes.count(409) == 19


async def test_a_forged_signature_is_refused(server: LiveServer) -> None:
    user_id = await server.add_user("eve@example.com")
    phone = await server.enroll_phone(user_id)
    other = await server.enroll_phone(user_id, name="other")
    browser = server.browser()
    started = (await server.login(browser, "eve@example.com")).json()
    approval = await approval_for(phone, server)
    # Signed by another key, but claiming to be `phone`.
    forged = Phone(phone.device_id, phone.token, other.key).sign(approval, number=started["number"])
    async with httpx.AsyncClient(base_url=server.url) as app:
        answer = await app.post(
            f"/api/approvals/{approval['id']}/decision", json={"jws": forged}, headers=phone.auth
        )
        assert answer.status_code == 400 and answer.json()["error"] == "bad_signature"
        stale = phone.sign(approval, number=started["number"], iat=time.time() - 301)
        answer = await app.post(
            f"/api/approvals/{approval['id']}/decision", json={"jws": stale}, headers=phone.auth
        )
        assert answer.status_code == 400 and answer.json()["error"] == "bad_signature"
        garbage = await app.post(
            f"/api/approvals/{approval['id']}/decision",
            json={"jws": "not.a.jws"},
            headers=phone.auth,
        )
        assert garbage.status_code == 400 and garbage.json()["error"] == "bad_signature"
    assert (await browser.get(f"/api/login/{started['approval_id']}")).json()["status"] == "pending"


async def test_another_users_device_sees_not_found(server: LiveServer) -> None:
    alice = await server.add_user("alice@example.com")
    mallory = await server.add_user("mallory@example.com")
    alice_phone = await server.enroll_phone(alice)
    mallory_phone = await server.enroll_phone(mallory)
    browser = server.browser()
    await server.login(browser, "alice@example.com")
    approval = await approval_for(alice_phone, server)
    async with httpx.AsyncClient(base_url=server.url) as app:
        seen = await app.get(f"/api/approvals/{approval['id']}", headers=mallory_phone.auth)
        assert seen.status_code == 404 and seen.json()["error"] == "not_found"
        answer = await app.post(
            f"/api/approvals/{approval['id']}/decision",
            json={"jws": mallory_phone.sign(approval, number="00")},
            headers=mallory_phone.auth,
        )
        assert answer.status_code == 404 and answer.json()["error"] == "not_found"
        nobody = await app.get(f"/api/approvals/{approval['id']}")
        assert nobody.status_code == 401


async def test_the_stream_refuses_browsers_without_cookie_or_with_a_foreign_origin(
    server: LiveServer,
) -> None:
    user_id = await server.add_user("ws@example.com")
    await server.enroll_phone(user_id)
    browser = server.browser()
    started = (await server.login(browser, "ws@example.com")).json()
    stranger = server.browser()
    with pytest.raises(websockets.InvalidStatus) as no_cookie:
        async with login_stream(server, stranger, started["approval_id"]):
            pass
    assert no_cookie.value.response.status_code == 403
    with pytest.raises(websockets.InvalidStatus) as foreign:
        async with login_stream(
            server, browser, started["approval_id"], origin="https://evil.example"
        ):
            pass
    assert foreign.value.response.status_code == 403
    assert (await stranger.get(f"/api/login/{started['approval_id']}")).status_code == 403
    assert (await stranger.post(f"/api/login/{started['approval_id']}/complete")).status_code == 403


async def test_an_enrollment_code_works_once(server: LiveServer) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from app.core.signatures import device_public_jwk
    from app.db.accounts import create_enrollment_code

    user_id = await server.add_user("once@example.com")
    async with server.services.db() as db:
        code, _ = await create_enrollment_code(db, user_id, now=time.time())
        await db.commit()

    def body() -> dict[str, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        return {
            "code": code,
            "name": "p",
            "platform": "ios",
            "public_key": device_public_jwk(key.public_key()),
        }

    async with httpx.AsyncClient(base_url=server.url) as app:
        results = await asyncio.gather(*(app.post("/api/devices", json=body()) for _ in range(5)))
    codes = sorted(r.status_code for r in results)
    assert codes == [201, 400, 400, 400, 400]
    refused = next(r for r in results if r.status_code == 400)
    assert refused.json()["error"] == "invalid_or_expired_code"


async def test_a_new_login_supersedes_the_pending_one_and_backoff_follows(
    server: LiveServer,
) -> None:
    user_id = await server.add_user("sup@example.com")
    phone = await server.enroll_phone(user_id)
    first_browser, second_browser = server.browser(), server.browser()
    first = (await server.login(first_browser, "sup@example.com")).json()
    second = await server.login(second_browser, "sup@example.com")
    assert second.status_code == 202
    old = await first_browser.get(f"/api/login/{first['approval_id']}")
    assert old.json()["status"] == "expired"
    pending = await approval_for(phone, server)
    assert pending["id"] == second.json()["approval_id"]
    # The superseded request counts as unanswered: the next one waits (push-fatigue backoff).
    third = await server.login(server.browser(), "sup@example.com")
    assert third.status_code == 429 and third.json()["error"] == "rate_limited"
    assert 1 <= int(third.headers["Retry-After"]) <= 10


async def test_a_fraud_report_locks_new_approvals(server: LiveServer) -> None:
    user_id = await server.add_user("fraud@example.com")
    phone = await server.enroll_phone(user_id)
    browser = server.browser()
    await server.login(browser, "fraud@example.com")
    approval = await approval_for(phone, server)
    async with httpx.AsyncClient(base_url=server.url) as app:
        answer = await app.post(
            f"/api/approvals/{approval['id']}/decision",
            json={"jws": phone.sign(approval, "deny", reason="fraud")},
            headers=phone.auth,
        )
    assert answer.status_code == 200 and answer.json() == {"status": "denied"}
    locked = await server.login(server.browser(), "fraud@example.com")
    assert locked.status_code == 423 and locked.json()["error"] == "locked"


async def test_the_device_socket_replays_pending_approvals_on_connect(server: LiveServer) -> None:
    user_id = await server.add_user("late@example.com")
    phone = await server.enroll_phone(user_id)
    started = (await server.login(server.browser(), "late@example.com")).json()
    ws = await device_socket(server, phone)
    request = await next_frame(ws, "approval_request")
    assert request["approval"]["id"] == started["approval_id"]
    await ws.close()


async def test_relying_party_long_poll_sees_the_decision(server: LiveServer) -> None:
    from app.db.accounts import create_api_key

    user_id = await server.add_user("rp@example.com")
    phone = await server.enroll_phone(user_id)
    async with server.services.db() as db:
        _, api_key = await create_api_key(db, "vpn", now=time.time())
        await db.commit()
    rp = httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=40
    )
    async with rp:
        created = await rp.post(
            "/api/v1/approvals", json={"user": "rp@example.com", "context": {"ip": "10.1.2.3"}}
        )
        assert created.status_code == 201, created.text
        body = created.json()
        assert set(body) >= {"approval_id", "number", "expires_at"}
        waiting = asyncio.create_task(rp.get(f"/api/v1/approvals/{body['approval_id']}?wait=20"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        approval = await approval_for(phone, server)
        assert approval["context"]["ip"] == "10.1.2.3"
        async with httpx.AsyncClient(base_url=server.url) as app:
            await app.post(
                f"/api/approvals/{approval['id']}/decision",
                json={"jws": phone.sign(approval, number=body["number"])},
                headers=phone.auth,
            )
        result = await asyncio.wait_for(waiting, 10)
        assert result.status_code == 200 and result.json()["status"] == "approved"
        # The long poll answered from the result event; it says what a fresh read says.
        now_read = await rp.get(f"/api/v1/approvals/{body['approval_id']}")
        assert now_read.json() == result.json()
        assert set(result.json()) == {
            "approval_id",
            "status",
            "created_at",
            "expires_at",
            "decided_at",
            "reason",
        }
        assert result.json()["reason"] == "device"
        unknown = await rp.post("/api/v1/approvals", json={"user": "nobody@example.com"})
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_user"
        bad_wait = await rp.get(f"/api/v1/approvals/{body['approval_id']}?wait=31")
        assert bad_wait.status_code == 422
    no_key = await httpx.AsyncClient(base_url=server.url).post(
        "/api/v1/approvals", json={"user": "rp@example.com"}
    )
    assert no_key.status_code == 401
