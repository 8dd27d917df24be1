"""Push bombing (PROTOCOL §3): one pending approval per user, a backoff after every denied or
unanswered one (10 s doubling to 1 h, reset by a success) that never stops the owner from
answering, and a fraud report that locks new approvals until `tapprove user unlock`, emails
the owner and is audited. Relying parties are held to the same rules as sign-ins.

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
from sqlmodel import select

from app.core.clock import ManualClock
from app.db.models import AuditEvent
from tests.fakes import wait_until
from tests.fixtures.app import PASSWORD, LiveServer, ServerFactory, loopback_address
from tests.fixtures.mail import SmtpServer
from tests.security.harness import (
    MakePerson,
    Person,
    api_key,
    approved_on_socket,
    assert_error,
    decide,
    device_socket,
    device_view,
    next_frame,
    person,
)

FIREFOX = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0"

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
    server_factory: ServerFactory, make_person: MakePerson
) -> None:
    clock = ManualClock(time.time())
    server = await server_factory(clock=clock)
    who = await make_person(server, "bombed")

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
    server_factory: ServerFactory, make_person: MakePerson
) -> None:
    clock = ManualClock(time.time())
    server = await server_factory(clock=clock)
    who = await make_person(server, "owner")
    trusted = await approved_on_socket(server, who.email, who.phone, remember_browser=True)

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
    for refused in (a for a in answers if a.status_code == 429):
        assert_error(refused, 429, "rate_limited")
        assert 1 <= int(refused.headers["Retry-After"]) <= 10, refused.headers
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
    server: LiveServer, tmp_path: Path, make_person: MakePerson
) -> None:
    who = await make_person(server, "fraud")
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


async def test_a_fraud_report_emails_the_owner_and_is_audited(
    server_factory: ServerFactory, smtp_server: SmtpServer, make_person: MakePerson
) -> None:
    server = await server_factory(smtp_url=smtp_server.url)
    who = await make_person(server, "reported")
    ws = await device_socket(server, who.phone)
    # The attacker's browser, from an address and with a browser of its own.
    ip = loopback_address()
    attacker = server.browser(
        user_agent=FIREFOX, transport=httpx.AsyncHTTPTransport(local_address=ip)
    )
    started = await server.login(attacker, who.email)
    assert started.status_code == 202, started.text
    approval = (await next_frame(ws, "approval_request"))["approval"]
    jws = who.phone.sign(approval, "deny", reason="fraud")
    await ws.send(json.dumps({"type": "decision", "jws": jws}))
    assert (await next_frame(ws, "decision_result"))["status"] == "denied"
    await ws.close()

    subject = "Suspicious sign-in reported on your account"
    await wait_until(lambda: any(m.subject == subject for m in smtp_server.received), timeout=30)
    [mail] = [m for m in smtp_server.received if m.subject == subject]
    assert mail.recipients == [who.email]
    assert f"From IP:   {ip}" in mail.text, mail.text
    assert "Browser:   Firefox 133 on Windows" in mail.text, mail.text
    assert f"{server.settings.public_url}/account" in mail.text

    await server.audit_filed()
    async with server.services.db() as db:
        rows = (
            await db.exec(select(AuditEvent).where(AuditEvent.user_id == who.user_id))
        ).all()
    decided = [r for r in rows if r.kind == "approval.decided" and r.approval_id == approval["id"]]
    assert len(decided) == 1 and decided[0].device_id == who.phone.device_id, decided
    assert json.loads(decided[0].detail or "{}") == {"status": "denied", "reason": "fraud"}
    [locked] = [r for r in rows if r.kind == "user.locked"]
    assert locked.approval_id == approval["id"]
    detail = json.loads(locked.detail or "{}")
    assert detail["reason"] == "fraud_reported" and detail["login_ip"] == ip, detail
    assert detail["browser"] == "Firefox 133", detail


async def test_relying_parties_get_the_same_one_pending_rule_backoff_and_matching(
    server_factory: ServerFactory, make_person: MakePerson
) -> None:
    clock = ManualClock(time.time())
    server = await server_factory(clock=clock)
    who = await make_person(server, "relied")
    key = await api_key(server)
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as rp:

        async def ask() -> httpx.Response:
            return await rp.post(
                "/api/v1/approvals", json={"user": who.email, "context": {"browser": "ssh"}}
            )

        async def rp_status(approval_id: str) -> str:
            found: str = (await rp.get(f"/api/v1/approvals/{approval_id}")).json()["status"]
            return found

        async def pending_on_phone() -> list[str]:
            async with httpx.AsyncClient(base_url=server.url, headers=who.phone.auth) as app:
                approvals = (await app.get("/api/devices/me/approvals")).json()["approvals"]
            return [a["id"] for a in approvals]

        # One pending request per user: a second supersedes the first...
        first, second = await ask(), await ask()
        assert first.status_code == second.status_code == 201, (first.text, second.text)
        assert await rp_status(first.json()["approval_id"]) == "expired"
        assert await pending_on_phone() == [second.json()["approval_id"]]
        # ...and counts as unanswered: the backoff holds relying parties and sign-ins alike.
        backed_off(await ask(), 10)
        backed_off(await login(server, who), 10)

        # Number matching: a wrong number denies the request and doubles the wait.
        approval = await device_view(server, who.phone, second.json()["approval_id"])
        right = second.json()["number"]
        wrong = f"{(int(right) + 1) % 100:02d}"
        answer = await decide(
            server,
            who.phone,
            approval["id"],
            who.phone.sign(approval, number=wrong, iat=clock.now()),
        )
        assert_error(answer, 422, "wrong_number")
        assert await rp_status(approval["id"]) == "denied"
        backed_off(await ask(), 20)
        clock.advance(20)

        # A sign-in supersedes a relying party's request too: one pending per user, any kind.
        third = await ask()
        assert third.status_code == 201, third.text
        assert (await login(server, who)).status_code == 202
        assert await rp_status(third.json()["approval_id"]) == "expired"
        backed_off(await ask(), 40)
        clock.advance(40)

        # Approved with the right number: the backoff is gone at once.
        fourth = await ask()
        assert fourth.status_code == 201, fourth.text
        approval = await device_view(server, who.phone, fourth.json()["approval_id"])
        answer = await decide(
            server,
            who.phone,
            approval["id"],
            who.phone.sign(approval, number=fourth.json()["number"], iat=clock.now()),
        )
        assert answer.json() == {"status": "approved"}, answer.text
        assert await rp_status(approval["id"]) == "approved"
        assert (await ask()).status_code == 201
