"""Offline passcodes over HTTP against a real server: a phone without network reads a code
off its screen and the browser (or a relying party) approves with it.

The server's clock is a ManualClock, so a test can move to the next 30-second step without
waiting for it; the phone computes its codes from the seed the server gave it, with pyotp,
as any authenticator app would.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from app.core.clock import ManualClock
from app.db.models import AuditEvent, Device
from tests.fixtures.app import LiveServer, Phone, ServerFactory
from tests.security.harness import (
    Person,
    api_key,
    device_socket,
    forget_fatigue,
    next_frame,
    pending_login,
    person,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def clock() -> ManualClock:
    # Mid-step, so a test's own steps never straddle a boundary by accident.
    now = time.time()
    return ManualClock(now - now % 30 + 15)


@pytest.fixture
async def live(server_factory: ServerFactory, clock: ManualClock) -> LiveServer:
    return await server_factory(clock=clock)


def phone_of(who: Person) -> Phone:
    return who.phone


def relying_party(server: LiveServer, key: str) -> httpx.AsyncClient:
    client = server.browser()
    client.headers["Authorization"] = f"Bearer {key}"
    return client


async def enter(browser: httpx.AsyncClient, approval_id: str, code: str) -> httpx.Response:
    return await browser.post(f"/api/login/{approval_id}/passcode", json={"code": code})


async def status_of(server: LiveServer, approval_id: str) -> dict[str, Any]:
    found = await server.services.approvals.get(approval_id)
    assert found is not None
    return {"status": found.status.value, "reason": found.final_reason, "by": found.decided_by}


async def test_enrollment_gives_the_phone_its_seed_once(live: LiveServer) -> None:
    who = await person(live, "seed")
    secret = phone_of(who).passcode_secret
    assert secret is not None and len(secret) == 32
    async with live.services.db() as db:
        device = await db.get(Device, who.phone.device_id)
        assert device is not None
        # Sealed at rest, never the seed itself; delivered (the answer carried it).
        assert device.passcode_seed is not None and secret not in device.passcode_seed
        assert device.passcode_confirmed_at is not None


async def test_a_passcode_completes_a_browser_sign_in_like_an_approval(
    live: LiveServer, clock: ManualClock
) -> None:
    who = await person(live, "offline")
    login = await pending_login(live, who)

    answer = await enter(login.browser, login.approval_id, who.phone.passcode(clock.now()))

    assert (answer.status_code, answer.json()) == (200, {"status": "approved"})
    assert await status_of(live, login.approval_id) == {
        "status": "approved",
        "reason": "passcode",
        "by": who.phone.device_id,
    }
    polled = await login.browser.get(f"/api/login/{login.approval_id}")
    assert (polled.json()["status"], polled.json()["reason"]) == ("approved", "passcode")
    done = await login.browser.post(f"/api/login/{login.approval_id}/complete")
    assert (done.status_code, done.json()) == (200, {"status": "authenticated"})
    account = await login.browser.get("/api/account")
    assert account.status_code == 200 and account.json()["restricted"] is False
    # A code from the phone proves the phone, as an approval does: this session may add one.
    enrolling = await login.browser.post("/api/devices/enrollments")
    assert enrolling.status_code == 201, enrolling.text
    await live.audit_filed()
    async with live.services.db() as db:
        from sqlmodel import select

        rows = (
            await db.exec(
                select(AuditEvent).where(
                    AuditEvent.approval_id == login.approval_id,
                    AuditEvent.kind == "approval.decided",
                )
            )
        ).all()
    [decided] = rows
    assert decided.device_id == who.phone.device_id
    assert '"via":"passcode"' in decided.detail.replace(" ", "")


async def test_a_code_works_once_and_the_next_steps_code_works_again(
    live: LiveServer, clock: ManualClock
) -> None:
    who = await person(live, "replay")
    code = who.phone.passcode(clock.now())
    first = await pending_login(live, who)
    assert (await enter(first.browser, first.approval_id, code)).status_code == 200

    second = await pending_login(live, who)
    replayed = await enter(second.browser, second.approval_id, code)
    assert replayed.status_code == 400 and replayed.json()["error"] == "invalid_code"
    assert (await status_of(live, second.approval_id))["status"] == "pending"

    clock.advance(30)
    fresh = await enter(second.browser, second.approval_id, who.phone.passcode(clock.now()))
    assert fresh.status_code == 200, fresh.text


@pytest.mark.parametrize(
    ("drift", "accepted"), [(-30, True), (30, True), (-60, False), (60, False)]
)
async def test_one_step_of_clock_drift_is_allowed(
    live: LiveServer, clock: ManualClock, drift: int, accepted: bool
) -> None:
    who = await person(live, "drift")
    login = await pending_login(live, who)
    answer = await enter(login.browser, login.approval_id, who.phone.passcode(clock.now() + drift))
    assert answer.status_code == (200 if accepted else 400), answer.text


async def test_a_relying_party_approves_with_a_passcode_the_person_read_out(
    live: LiveServer, clock: ManualClock
) -> None:
    who = await person(live, "rp-passcode")
    key = await api_key(live)
    rp = relying_party(live, key)
    created = await rp.post("/api/v1/approvals", json={"user": who.email})
    assert created.status_code == 201, created.text
    approval_id = created.json()["approval_id"]

    other = relying_party(live, await api_key(live, "other"))
    foreign = await other.post(
        f"/api/v1/approvals/{approval_id}/passcode",
        json={"passcode": who.phone.passcode(clock.now())},
    )
    assert foreign.status_code == 404  # only the key that asked may answer
    answer = await rp.post(
        f"/api/v1/approvals/{approval_id}/passcode",
        json={"passcode": who.phone.passcode(clock.now())},
    )

    assert (answer.status_code, answer.json()) == (200, {"status": "approved"})
    final = await rp.get(f"/api/v1/approvals/{approval_id}")
    assert (final.json()["status"], final.json()["reason"]) == ("approved", "passcode")
    again = await rp.post(
        f"/api/v1/approvals/{approval_id}/passcode",
        json={"passcode": who.phone.passcode(clock.now() + 30)},
    )
    assert (again.status_code, again.json()["error"]) == (409, "already_decided")


async def test_five_wrong_passcodes_deny_the_request_and_count_toward_the_backoff(
    live: LiveServer, clock: ManualClock
) -> None:
    who = await person(live, "wrong")
    login = await pending_login(live, who)
    right = who.phone.passcode(clock.now())
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"

    answers = [await enter(login.browser, login.approval_id, wrong) for _ in range(5)]

    assert [a.status_code for a in answers] == [400] * 5
    assert [a.json().get("status") for a in answers] == [None] * 4 + ["denied"]
    assert await status_of(live, login.approval_id) == {
        "status": "denied",
        "reason": "too_many_codes",
        "by": None,
    }
    late = await enter(login.browser, login.approval_id, right)
    assert (late.status_code, late.json()["error"]) == (409, "already_decided")
    # Like a wrong number, the denial makes the next request wait.
    again = await live.login(live.browser(), who.email)
    assert again.status_code == 429 and int(again.headers["Retry-After"]) > 0


async def test_wrong_passcodes_are_limited_per_user_across_requests(
    live: LiveServer, clock: ManualClock
) -> None:
    who = await person(live, "budget")
    right = who.phone.passcode(clock.now())
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    for _ in range(2):  # two requests, five wrong codes each
        login = await pending_login(live, who)
        for _ in range(5):
            assert (await enter(login.browser, login.approval_id, wrong)).status_code == 400
    login = await pending_login(live, who)  # forgets the backoff, not the passcode budget

    limited = await enter(login.browser, login.approval_id, right)

    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    assert limited.json()["error"] == "rate_limited"
    assert (await status_of(live, login.approval_id))["status"] == "pending"


async def test_the_answer_says_nothing_about_the_users_devices(
    live: LiveServer, clock: ManualClock
) -> None:
    key = await api_key(live)
    rp = relying_party(live, key)
    with_phone = await person(live, "phone")
    without = await person(live, "nophone", phone=False)
    revoked = await person(live, "revoked")
    gone = await rp.delete("/api/devices/me", headers=revoked.phone.auth)
    assert gone.status_code == 200
    answers = []
    for who, code in (
        (with_phone, f"{(int(with_phone.phone.passcode(clock.now())) + 1) % 10**6:06d}"),
        (without, "123456"),
        (revoked, revoked.phone.passcode(clock.now())),  # a revoked phone's code is no code
    ):
        await forget_fatigue(live, who.user_id)
        created = await rp.post("/api/v1/approvals", json={"user": who.email})
        assert created.status_code == 201, created.text
        answer = await rp.post(
            f"/api/v1/approvals/{created.json()['approval_id']}/passcode", json={"passcode": code}
        )
        answers.append((answer.status_code, answer.json()))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0] == (400, {"error": "invalid_code", "message": "that passcode is not right"})


async def test_a_device_enrolled_before_passcodes_gets_its_seed_over_its_socket_until_it_acks(
    live: LiveServer, clock: ManualClock
) -> None:
    who = await person(live, "older")
    async with live.services.db() as db:
        await db.exec(
            update(Device)
            .where(Device.id == who.phone.device_id)  # type: ignore[arg-type]
            .values(passcode_seed=None, passcode_confirmed_at=None)
        )
        await db.commit()

    ws = await device_socket(live, who.phone)
    offered = await next_frame(ws, "passcode_seed")
    await ws.close()
    # No ack (the phone crashed before storing it): offered again, the same seed.
    ws = await device_socket(live, who.phone)
    again = await next_frame(ws, "passcode_seed")
    assert again == offered
    seed = offered["passcode"]
    assert (seed["digits"], seed["period"], seed["algorithm"]) == (6, 30, "SHA1")
    await ws.send('{"type":"passcode_seed_ack"}')
    await ws.send('{"type":"ack","id":"none"}')  # answered in order: the ack was handled first
    await next_frame(ws, "error")
    await ws.close()

    async with live.services.db() as db:
        device = await db.get(Device, who.phone.device_id)
        assert device is not None and device.passcode_confirmed_at is not None
    ws = await device_socket(live, who.phone)
    await ws.send('{"type":"ack","id":"none"}')
    assert (await next_frame(ws, "error"))["error"] == "not_found"  # no seed before it
    await ws.close()

    who.phone.passcode_secret = seed["secret"]
    login = await pending_login(live, who)
    answer = await enter(login.browser, login.approval_id, who.phone.passcode(clock.now()))
    assert answer.status_code == 200, answer.text


async def test_a_passcode_for_an_expired_request_is_too_late(
    live: LiveServer, clock: ManualClock
) -> None:
    who = await person(live, "late")
    login = await pending_login(live, who)
    key = await api_key(live)
    rp = relying_party(live, key)
    created = await rp.post("/api/v1/approvals", json={"user": who.email, "ttl": 10})
    assert created.status_code == 201, created.text  # it replaced the sign-in's approval
    clock.advance(11)

    code = who.phone.passcode(clock.now())
    by_rp = await rp.post(
        f"/api/v1/approvals/{created.json()['approval_id']}/passcode", json={"passcode": code}
    )
    by_browser = await enter(login.browser, login.approval_id, code)

    assert (by_rp.status_code, by_rp.json()["error"]) == (410, "expired")
    assert (by_browser.status_code, by_browser.json()["error"]) == (410, "expired")
    # The code was not spent on them: it still approves a live request.
    fresh = await pending_login(live, who)
    assert (await enter(fresh.browser, fresh.approval_id, code)).status_code == 200
