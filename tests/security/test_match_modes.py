"""The other two number-matching modes end to end on a real server (PROTOCOL §2, §3;
SECURITY.md, push bombing): `nist` shows 6 digits that must be typed in full, `choices`
sends the phone three numbers to pick from. In both a wrong answer denies the sign-in and
the right one approves it, and the browser completes to a session.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from app.core.clock import ManualClock
from tests.fixtures.app import ServerFactory
from tests.security.harness import device_socket, next_frame, person_via_routes

pytestmark = pytest.mark.timeout(120)


async def _answer(ws: Any, jws: str) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "decision", "jws": jws}))
    while True:
        frame: dict[str, Any] = json.loads(await ws.recv())
        if frame["type"] in ("error", "decision_result"):
            return frame


@pytest.mark.parametrize("mode", ["nist", "choices"])
async def test_a_sign_in_in_each_match_mode(server_factory: ServerFactory, mode: str) -> None:
    clock = ManualClock(time.time())
    server = await server_factory(clock=clock, match_mode=mode)
    digits = 6 if mode == "nist" else 2
    # The person's own setup signs in once in this mode already (approved on the socket).
    who = await person_via_routes(server, mode)
    ws = await device_socket(server, who.phone)

    async def sign_in() -> tuple[Any, dict[str, Any], dict[str, Any]]:
        browser = server.browser()
        started = await server.login(browser, who.email)
        assert started.status_code == 202, started.text
        body = started.json()
        assert body["match"] == {"mode": mode, "digits": digits}
        assert re.fullmatch(rf"\d{{{digits}}}", body["number"]), body
        approval = (await next_frame(ws, "approval_request"))["approval"]
        assert approval["id"] == body["approval_id"]
        assert approval["match"] == {"mode": mode, "digits": digits}
        if mode == "nist":
            # The phone is not told the number: the person types what the browser shows.
            assert "number_choices" not in approval
            assert body["number"] not in json.dumps(approval)
        else:
            choices = approval["number_choices"]
            assert len(set(choices)) == 3 and body["number"] in choices, choices
            assert all(re.fullmatch(r"\d{2}", c) for c in choices), choices
        return browser, body, approval

    # A wrong answer: a decoy, or only the last two of the six digits.
    browser, body, approval = await sign_in()
    if mode == "nist":
        wrong: str = body["number"][-2:]
    else:
        wrong = next(c for c in approval["number_choices"] if c != body["number"])
    frame = await _answer(ws, who.phone.sign(approval, number=wrong, iat=clock.now()))
    assert (frame["type"], frame["id"], frame["error"]) == (
        "error",
        body["approval_id"],
        "wrong_number",
    ), frame
    status = await browser.get(f"/api/login/{body['approval_id']}")
    assert status.json()["status"] == "denied"
    refused = await browser.post(f"/api/login/{body['approval_id']}/complete")
    assert refused.status_code == 409 and refused.json()["error"] == "not_approved"

    clock.advance(10)  # the backoff a wrong number starts
    browser, body, approval = await sign_in()
    frame = await _answer(ws, who.phone.sign(approval, number=body["number"], iat=clock.now()))
    assert frame == {
        "type": "decision_result",
        "id": body["approval_id"],
        "status": "approved",
    }, frame
    done = await browser.post(f"/api/login/{body['approval_id']}/complete")
    assert done.status_code == 200 and done.json() == {"status": "authenticated"}, done.text
    assert (await browser.get("/api/account")).json()["email"] == who.email
    await ws.close()
