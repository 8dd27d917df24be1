"""Races, fought across two server processes on one Redis and one database: many decisions
on one approval, a decision against the deadline, logins superseding each other, one
enrollment code used twice, a sign-in completed twice. Each has exactly one winner, and
everything else hears the same final state.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import select

from app.approval.model import ApprovalContext, Status, new_approval
from app.approval.rules import Outcome
from app.core.clock import ManualClock
from app.core.matching import MatchPolicy
from app.core.signatures import device_public_jwk
from app.db.accounts import create_enrollment_code
from app.db.models import AuditEvent, Device, TrustedBrowser
from tests.fixtures.app import LiveServer, ServerFactory
from tests.security.harness import (
    MakePerson,
    add_user,
    approval_key,
    approve,
    decide,
    device_socket,
    device_view,
    login_stream,
    next_frame,
    pending_login,
    person,
    unique_email,
)

pytestmark = pytest.mark.timeout(120)


async def two(server_factory: ServerFactory, **settings: Any) -> tuple[LiveServer, LiveServer]:
    return await server_factory(**settings), await server_factory(**settings)


async def audit_kinds(server: LiveServer, approval_id: str) -> list[str]:
    await server.audit_filed()
    async with server.services.db() as db:
        rows = await db.exec(select(AuditEvent).where(AuditEvent.approval_id == approval_id))
        return [row.kind for row in rows.all()]


async def _ws_decide(ws: Any, jws: str) -> tuple[str, list[dict[str, Any]]]:
    """Send a decision; (`won:<status>` or the error code, every frame seen meanwhile)."""
    await ws.send(json.dumps({"type": "decision", "jws": jws}))
    seen: list[dict[str, Any]] = []
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
        seen.append(frame)
        if frame["type"] == "decision_result":
            return f"won:{frame['status']}", seen
        if frame["type"] == "error":
            return str(frame["error"]), seen


async def test_many_decisions_from_two_processes_have_one_winner(
    server_factory: ServerFactory, make_person: MakePerson
) -> None:
    first, second = await two(server_factory)
    who = await make_person(first, "race")
    tablet = await first.enroll_phone(
        who.user_id, name="tablet", via_http=True, approver=who.phone
    )
    login = await pending_login(first, who)
    approval = await device_view(first, who.phone, login.approval_id)
    sockets = [
        await device_socket(first, who.phone),
        await device_socket(second, tablet),
        await device_socket(second, who.phone),
        await device_socket(first, tablet),
    ]
    for ws in sockets:
        await next_frame(ws, "approval_request")
    phones = [who.phone, tablet]
    async with login_stream(
        first,
        login.approval_id,
        cookie=login.browser.cookies["tapprove_login"],
        origin=first.origin,
    ) as stream:
        assert json.loads(await stream.recv())["type"] == "status"
        clients = [httpx.AsyncClient(base_url=s.url) for s in (first, second)]
        try:
            http = [
                decide(
                    first,
                    phones[i % 2],
                    login.approval_id,
                    phones[i % 2].sign(
                        approval, "approve" if i % 3 else "deny", number=login.number
                    ),
                    clients[i % 2],
                )
                for i in range(24)
            ]
            over_ws = [
                _ws_decide(
                    ws,
                    phones[i % 2].sign(
                        approval, "approve" if i % 2 else "deny", number=login.number
                    ),
                )
                for i, ws in enumerate(sockets)
            ]
            results = await asyncio.gather(*http, *over_ws)
        finally:
            for client in clients:
                await client.aclose()
        http_answers = [r for r in results if isinstance(r, httpx.Response)]
        ws_results = [r for r in results if isinstance(r, tuple)]
        ws_answers = [outcome for outcome, _ in ws_results]
        winners = [r.json()["status"] for r in http_answers if r.status_code == 200]
        winners += [r.split(":")[1] for r in ws_answers if r.startswith("won:")]
        assert len(winners) == 1, (winners, [r.status_code for r in http_answers], ws_answers)
        losers = [r for r in http_answers if r.status_code != 200]
        assert all(
            r.status_code == 409
            and r.json()["error"] == "already_decided"
            and r.json()["status"] == winners[0]
            for r in losers
        )
        assert all(r == "already_decided" for r in ws_answers if not r.startswith("won:"))
        final = json.loads(await asyncio.wait_for(stream.recv(), 10))
        reason = {"approved": "device", "denied": "denied"}[winners[0]]
        assert final == {"type": "result", "status": winners[0], "reason": reason}
    for ws, (_, seen) in zip(sockets, ws_results, strict=True):
        resolved = [f for f in seen if f["type"] == "approval_resolved"]
        if not resolved:
            resolved = [await next_frame(ws, "approval_resolved")]
        assert resolved == [
            {
                "type": "approval_resolved",
                "id": login.approval_id,
                "status": winners[0],
                "reason": reason,
            }
        ]
        await ws.close()
    assert (await audit_kinds(first, login.approval_id)).count("approval.decided") == 1


async def test_a_decision_at_the_deadline(server_factory: ServerFactory) -> None:
    """To the microsecond, with a ManualClock: before the deadline wins, at it is too late."""
    clock = ManualClock(time.time())
    server = await server_factory(clock=clock)
    who = await person(server, "deadline")
    for offset, status in [(-0.001, 200), (0.0, 410)]:
        login = await pending_login(server, who)
        approval = await device_view(server, who.phone, login.approval_id)
        clock.advance(server.settings.approval_ttl + offset)
        answer = await decide(
            server,
            who.phone,
            login.approval_id,
            who.phone.sign(approval, number=login.number, iat=clock.now()),
        )
        assert answer.status_code == status, (offset, answer.text)
        clock.advance(1)


async def test_approve_racing_the_expiry_sweeper(server_factory: ServerFactory) -> None:
    """In real time: answers keep arriving across the deadline while both processes' sweepers
    run; whoever wins, every party sees one consistent outcome."""
    first, second = await two(server_factory, approval_ttl=5)
    who = await person(first, "sweeper")
    login = await pending_login(first, who)
    approval = await device_view(first, who.phone, login.approval_id)
    key = approval_key(first, login.approval_id)
    expires_at = float(await first.services.redis.hget(key, "expires_at"))
    ws = await device_socket(second, who.phone)
    # Aim the first answers a quarter second before the deadline. This is aim, not
    # synchronisation: on a busy machine they may land later, which only changes who wins;
    # every check below holds for either winner.
    await asyncio.sleep(max(0.0, expires_at - time.time() - 0.25))
    clients = [httpx.AsyncClient(base_url=s.url, timeout=30) for s in (first, second)]
    answers: list[httpx.Response] = []

    async def keep_answering(index: int) -> None:
        # At least one answer each, however late this starts, so the approval always ends
        # by an answer or by its deadline, never by the test stopping first.
        while True:
            answers.append(
                await decide(
                    first,
                    who.phone,
                    login.approval_id,
                    who.phone.sign(approval, number=login.number),
                    clients[index % 2],
                )
            )
            if time.time() >= expires_at + 0.25:
                return
            await asyncio.sleep(0.01)

    try:
        await asyncio.gather(*(keep_answering(i) for i in range(6)))
    finally:
        for client in clients:
            await client.aclose()
    # Every device hears the end; only then is the stored state final.
    resolved = await next_frame(ws, "approval_resolved", timeout=30)
    await ws.close()
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 409, 410}, codes
    assert codes.count(200) <= 1
    state = await first.services.redis.hgetall(key)
    final = state["status"]
    assert resolved["status"] == final
    assert final in ("approved", "expired")
    assert (codes.count(200) == 1) == (final == "approved"), (codes, state)
    if final == "approved":
        assert float(state["decided_at"]) < expires_at
        assert all(a.json()["status"] == "approved" for a in answers if a.status_code == 409)
        assert 410 not in codes
    else:
        assert float(state["decided_at"]) >= expires_at
        assert all(a.json()["status"] == "expired" for a in answers if a.status_code != 200)
    browser_view = (await login.browser.get(f"/api/login/{login.approval_id}")).json()
    assert browser_view["status"] == final
    done = await login.browser.post(f"/api/login/{login.approval_id}/complete")
    assert done.status_code == (200 if final == "approved" else 409), done.text


async def test_two_logins_supersede_each_other_cleanly(server_factory: ServerFactory) -> None:
    first, second = await two(server_factory)
    who = await person(first, "supersede")
    ws = await device_socket(first, who.phone)
    browsers = [first.browser(), second.browser()]
    started = await asyncio.gather(
        first.login(browsers[0], who.email), second.login(browsers[1], who.email)
    )
    assert [s.status_code for s in started] == [202, 202]
    ids = [s.json()["approval_id"] for s in started]
    statuses = [
        (await b.get(f"/api/login/{i}")).json()["status"]
        for b, i in zip(browsers, ids, strict=True)
    ]
    assert sorted(statuses) == ["expired", "pending"]
    old = ids[statuses.index("expired")]
    new = ids[statuses.index("pending")]
    seen: dict[str, Any] = {}
    while "resolved" not in seen or "request" not in seen:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame["type"] == "approval_resolved":
            seen["resolved"] = frame
        elif frame["type"] == "approval_request" and frame["approval"]["id"] == new:
            seen["request"] = frame
    assert seen["resolved"] == {
        "type": "approval_resolved",
        "id": old,
        "status": "expired",
        "reason": "superseded",
    }
    old_approval = await device_view(first, who.phone, old)
    late = await decide(
        second, who.phone, old, who.phone.sign(old_approval, "approve", number="00")
    )
    assert late.status_code == 410 and late.json()["error"] == "expired"
    old_browser = browsers[ids.index(old)]
    async with login_stream(
        first, old, cookie=old_browser.cookies["tapprove_login"], origin=first.origin
    ) as stream:
        assert json.loads(await stream.recv()) == {
            "type": "result",
            "status": "expired",
            "reason": "superseded",
        }
    number = started[ids.index(new)].json()["number"]
    right = await decide(
        first, who.phone, new, who.phone.sign(seen["request"]["approval"], number=number)
    )
    assert right.status_code == 200, right.text
    await ws.close()


@pytest.mark.parametrize("code_from", ["database", "routes"])
async def test_one_enrollment_code_enrolls_one_device(
    server_factory: ServerFactory, code_from: str
) -> None:
    first, second = await two(server_factory)
    if code_from == "routes":
        # As a person gets one: the password alone, a restricted session, then the code.
        email = unique_email("enroll")
        user_id = await add_user(first, email)
        restricted = first.browser()
        assert (await first.login(restricted, email)).json() == {"status": "enrollment_required"}
        code = await first.enrollment_code_over_http(restricted)
    else:
        user_id = await add_user(first, unique_email("enroll"))
        async with first.services.db() as db:
            code, _ = await create_enrollment_code(db, user_id, now=time.time())
            await db.commit()
    bodies = [
        {
            "code": code,
            "name": f"phone {i}",
            "platform": "android",
            # A new key each time, the same code.
            "public_key": device_public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()),
        }
        for i in range(12)
    ]
    clients = [httpx.AsyncClient(base_url=s.url, timeout=30) for s in (first, second)]
    try:
        results = await asyncio.gather(
            *(clients[i % 2].post("/api/devices", json=b) for i, b in enumerate(bodies))
        )
    finally:
        for client in clients:
            await client.aclose()
    codes = sorted(r.status_code for r in results)
    assert codes == [201] + [400] * 11, codes
    assert all(
        r.json()["error"] == "invalid_or_expired_code" for r in results if r.status_code == 400
    )
    winner = next(r for r in results if r.status_code == 201)
    async with first.services.db() as db:
        devices = (await db.exec(select(Device).where(Device.user_id == user_id))).all()
    assert [d.id for d in devices] == [winner.json()["device_id"]]


async def test_a_sign_in_completes_once(server_factory: ServerFactory) -> None:
    first, second = await two(server_factory)
    who = await person(first, "complete")
    login = await pending_login(first, who, remember_browser=True)
    await approve(first, who, login)
    cookie = login.browser.cookies["tapprove_login"]
    browsers = [first.browser(), second.browser()]
    for browser in browsers:
        browser.cookies.set("tapprove_login", cookie)
    results = await asyncio.gather(
        *(browsers[i % 2].post(f"/api/login/{login.approval_id}/complete") for i in range(12))
    )
    codes = sorted(r.status_code for r in results)
    assert codes == [200] + [409] * 11, codes
    assert all(r.json()["error"] == "already_completed" for r in results if r.status_code == 409)
    assert sum("tapprove_session" in r.headers.get("set-cookie", "") for r in results) == 1
    async with first.services.db() as db:
        trusted = (
            await db.exec(select(TrustedBrowser).where(TrustedBrowser.user_id == who.user_id))
        ).all()
    assert len(trusted) == 1


async def test_a_decision_racing_the_approvals_disappearance(
    server_factory: ServerFactory,
) -> None:
    """The phone read the approval, then its key expired before the decision's atomic step:
    the store says `not_found` (the route answers 404), it does not crash."""
    server = await server_factory()
    never_stored = new_approval(
        user_id="u" * 32,
        kind="login",
        ttl=60,
        policy=MatchPolicy.for_mode("typed"),
        context=ApprovalContext(ip="10.0.0.1", user_agent="ua", browser="b", os="o"),
        now=server.services.clock.now(),
    )
    result = await server.services.approvals.decide(
        never_stored, Outcome(Status.APPROVED), audit_line=b"{}"
    )
    assert result.kind == "not_found" and result.status is None
