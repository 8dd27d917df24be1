"""Push bombing (PROTOCOL §3): one pending approval per user, a backoff after every denied or
unanswered one (10 s doubling to 1 h, reset by a success) that never stops the owner from
answering, and a fraud report that locks new approvals until `tapprove user unlock`.

Time is a ManualClock handed to the server, so the backoff is checked to the second
without sleeping.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.clock import ManualClock
from tests.fixtures.app import PASSWORD, LiveServer, ServerFactory
from tests.security.harness import (
    Person,
    api_key,
    assert_error,
    decide,
    device_view,
    person,
    signed_in_browser,
)

pytestmark = pytest.mark.timeout(120)


async def fatigue(server: LiveServer, user_id: str) -> dict[str, str]:
    found: dict[str, str] = await server.services.redis.hgetall(fatigue_key(server, user_id))
    return found


def fatigue_key(server: LiveServer, user_id: str) -> str:
    """Where the approval store keeps the user's push-fatigue failures."""
    return server.services.approvals.keys.user(user_id).fatigue


async def login(server: LiveServer, who: Person) -> httpx.Response:
    return await server.login(server.browser(), who.email)


async def answer(
    server: LiveServer,
    clock: ManualClock,
    who: Person,
    started: httpx.Response,
    decision: str,
    number: str | None = None,
) -> httpx.Response:
    approval_id = started.json()["approval_id"]
    approval = await device_view(server, who.phone, approval_id)
    jws = who.phone.sign(
        approval, decision, number=number or started.json()["number"], iat=clock.now()
    )
    return await decide(server, who.phone, approval_id, jws)


def backed_off(response: httpx.Response, seconds: int) -> None:
    assert_error(response, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) == seconds, response.headers


async def test_backoff_doubles_from_10_s_to_an_hour_and_a_success_resets_it(
    server_factory: ServerFactory,
) -> None:
    clock = ManualClock(time.time())
    server = await server_factory(clock=clock)
    who = await person(server, "bombed")

    # Denied: 10 s.
    started = await login(server, who)
    assert (await answer(server, clock, who, started, "deny")).status_code == 200
    backed_off(await login(server, who), 10)
    state = await fatigue(server, who.user_id)
    assert state["failures"] == "1"
    assert float(state["next_at"]) == pytest.approx(clock.now() + 10)
    clock.advance(9)
    backed_off(await login(server, who), 1)
    clock.advance(1)

    # Unanswered (expired): 20 s.
    started = await login(server, who)
    assert started.status_code == 202, started.text
    clock.advance(server.settings.approval_ttl + 1)
    backed_off(await login(server, who), 20)
    clock.advance(20)

    # A wrong number: 40 s.
    started = await login(server, who)
    wrong = f"{(int(started.json()['number']) + 1) % 100:02d}"
    assert (await answer(server, clock, who, started, "approve", wrong)).status_code == 422
    backed_off(await login(server, who), 40)
    clock.advance(40)

    # Superseded by a newer sign-in: it counts as unanswered, 80 s.
    assert (await login(server, who)).status_code == 202
    newest = await login(server, who)
    assert newest.status_code == 202
    backed_off(await login(server, who), 80)

    # Many failures later the wait is capped at one hour.
    await server.services.redis.hset(fatigue_key(server, who.user_id), "failures", 30)
    assert (await answer(server, clock, who, newest, "deny")).status_code == 200
    backed_off(await login(server, who), 3600)
    clock.advance(3599)
    backed_off(await login(server, who), 1)
    clock.advance(1)

    # Denials never lock the account (only a fraud report does), and a success resets all.
    started = await login(server, who)
    assert started.status_code == 202, started.text
    assert (await answer(server, clock, who, started, "approve")).status_code == 200
    assert await fatigue(server, who.user_id) == {}
    again = await login(server, who)
    assert again.status_code == 202, again.text


async def test_the_owner_can_answer_and_sign_in_while_an_attacker_is_backed_off(
    server_factory: ServerFactory,
) -> None:
    clock = ManualClock(time.time())
    server = await server_factory(clock=clock)
    who = await person(server, "owner")
    trusted = await signed_in_browser(server, who, remember_browser=True)

    # The attacker knows the password: a first request, then a second that supersedes it.
    first = await login(server, who)
    second = await login(server, who)
    assert first.status_code == second.status_code == 202
    backed_off(await login(server, who), 10)
    stale = await answer(server, clock, who, first, "approve")
    assert_error(stale, 410, "expired")

    # The owner's trusted browser is not held back by the backoff...
    owner = await server.login(trusted, who.email)
    assert owner.status_code == 200 and owner.json() == {"status": "authenticated"}
    # ...and the phone can still answer the pending request, however many more are refused.
    for _ in range(5):
        backed_off(await login(server, who), 10)
    denied = await answer(server, clock, who, second, "deny")
    assert denied.status_code == 200 and denied.json() == {"status": "denied"}
    backed_off(await login(server, who), 20)


async def test_one_pending_approval_per_user_across_processes(
    server_factory: ServerFactory,
) -> None:
    first, second = await server_factory(), await server_factory()
    who = await person(first, "single")
    browsers = [first.browser(), second.browser(), first.browser(), second.browser()]
    answers = await asyncio.gather(
        *((first if i % 2 == 0 else second).login(b, who.email) for i, b in enumerate(browsers))
    )
    codes = sorted(a.status_code for a in answers)
    # The first creates, the second supersedes it, and the backoff that starts refuses the
    # rest; whatever the interleaving, one approval is left pending.
    assert codes.count(202) == 2 and codes.count(429) == 2, codes
    async with httpx.AsyncClient(base_url=first.url, headers=who.phone.auth) as phone:
        pending = (await phone.get("/api/devices/me/approvals")).json()["approvals"]
    assert len(pending) == 1
    started = [a.json()["approval_id"] for a in answers if a.status_code == 202]
    assert pending[0]["id"] in started
    statuses = {}
    for response, browser in zip(answers, browsers, strict=True):
        if response.status_code == 202:
            approval_id = response.json()["approval_id"]
            statuses[approval_id] = (await browser.get(f"/api/login/{approval_id}")).json()[
                "status"
            ]
    assert sorted(statuses.values()) == ["expired", "pending"]


async def _cli(server: LiveServer, tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    env = {
        **os.environ,
        "TAPPROVE_DATABASE_URL": server.settings.sqlalchemy_url,
        "TAPPROVE_REDIS_URL": server.settings.redis_url or "",
        "TAPPROVE_REDIS_PREFIX": server.settings.redis_prefix,
        "TAPPROVE_DATA_DIR": str(tmp_path / "cli"),
    }
    tapprove = Path(sys.executable).with_name("tapprove")
    process = await asyncio.create_subprocess_exec(
        str(tapprove),
        *args,
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    lines = out.decode().splitlines()
    assert len(lines) == 1, (out, err)
    return process.returncode, json.loads(lines[0])


async def test_a_fraud_report_locks_until_an_operator_unlocks(
    server: LiveServer,
    tmp_path: Path,
) -> None:
    who = await person(server, "fraud")
    key = await api_key(server)
    started = await login(server, who)
    approval = await device_view(server, who.phone, started.json()["approval_id"])
    reported = await decide(
        server, who.phone, approval["id"], who.phone.sign(approval, "deny", reason="fraud")
    )
    assert reported.status_code == 200 and reported.json() == {"status": "denied"}

    # Locked: 423 (it takes precedence over the backoff the denial started), for every path
    # to a new approval, and the user's sessions are gone.
    assert (await fatigue(server, who.user_id))["failures"] == "1"
    assert_error(await login(server, who), 423, "locked")
    rp = await server.browser().post(
        "/api/v1/approvals", json={"user": who.email}, headers={"Authorization": f"Bearer {key}"}
    )
    assert_error(rp, 423, "locked")
    assert_error(await who.session.get("/api/account"), 401, "unauthorized")
    async with server.services.db() as db:
        from app.db.accounts import get_user_by_email

        user = await get_user_by_email(db, who.email)
        assert user is not None and user.locked
    assert_error(
        await server.login(server.browser(), who.email, "wrong password"),
        401,
        "invalid_credentials",
    )

    code, body = await _cli(server, tmp_path, "user", "unlock", who.email.upper())
    assert code == 0 and body == {"email": who.email, "locked": False}, body
    # The unlock clears the backoff too: the owner can sign in at once.
    assert await fatigue(server, who.user_id) == {}
    again = await login(server, who)
    assert again.status_code == 202, again.text

    code, body = await _cli(server, tmp_path, "user", "unlock", "nobody@example.com")
    assert code != 0 and body["error"] == "unknown_user", body


async def test_fraud_reports_and_denials_do_not_lock_out_other_users(
    server: LiveServer,
) -> None:
    victim = await person(server, "victim")
    bystander = await person(server, "bystander")
    started = await login(server, victim)
    approval = await device_view(server, victim.phone, started.json()["approval_id"])
    await decide(
        server, victim.phone, approval["id"], victim.phone.sign(approval, "deny", reason="fraud")
    )
    response = await server.login(server.browser(), bystander.email, PASSWORD)
    assert response.status_code == 202, response.text
