"""Duo `factor=passcode` and `factor=sms` against a real server (and a fake Twilio): a
device's offline passcode or a texted one allows once; wrong ones deny and spend the same
per-user budget as the browser's and the relying parties' passcode paths; SMS passcodes go
to the verified number only; preauth lists `sms` / `mobile_otp` only for users who have
them; asynchronous callers (login_duo on a terminal) read the answer under a txid."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from app.passcodes import MAX_PER_USER
from tests.fakes import wait_until
from tests.fakes.twilio import FakeTwilio
from tests.fixtures.app import LiveServer, Phone, ServerFactory
from tests.integration.test_push_delivery import add_user_with_phone, providers_for
from tests.security.harness import api_key
from tests.security.test_duo_hostile import Integration, duo_bson, duo_json, integration

pytestmark = pytest.mark.timeout(90)

NUMBER = "+14155552671"


async def texted_server(server_factory: ServerFactory, twilio_env: dict[str, str]) -> LiveServer:
    return await server_factory(providers=await providers_for(twilio_env))


async def user_with_phone(server: LiveServer, email: str, *, sms: bool = True) -> Phone:
    """A user with an enrolled device (holding a passcode seed), and with `sms` a verified
    number that takes SMS."""
    if sms:
        user_id = await add_user_with_phone(server, email, NUMBER)
    else:
        user_id = await server.add_user(email)
    return await server.enroll_phone(user_id)


async def auth(duo: Integration, **params: str) -> dict[str, Any]:
    response = await duo.send(duo.v5("POST", "/auth/v2/auth", params))
    reply: dict[str, Any] = duo_json(response, 200)["response"]
    return reply


def a_wrong_code(*right: str) -> str:
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in right)


async def last_text(fake: FakeTwilio, count: int) -> str:
    await wait_until(lambda: len(fake.requests) >= count, timeout=10)
    found = re.search(r"\b(\d{6})\b", fake.requests[count - 1].form["Body"])
    assert found, fake.requests[count - 1].form
    assert fake.requests[count - 1].form["To"] == NUMBER
    return found.group(1)


async def test_a_devices_passcode_allows_once_and_a_wrong_one_denies(server: LiveServer) -> None:
    phone = await user_with_phone(server, "otp@example.com", sms=False)
    duo = await integration(server, "otp")
    code = phone.passcode(time.time())

    allowed = await auth(duo, username="otp@example.com", factor="passcode", passcode=code)
    assert allowed == {
        "result": "allow", "status": "allow", "status_msg": "Success. Logging you in...",
    }  # fmt: skip
    again = await auth(duo, username="otp@example.com", factor="passcode", passcode=code)
    assert again["result"] == "deny", "a passcode works once"
    wrong = await auth(
        duo, username="otp@example.com", factor="passcode", passcode=a_wrong_code(code)
    )
    assert wrong == {
        "result": "deny", "status": "deny", "status_msg": "Incorrect passcode. Please try again.",
    }  # fmt: skip
    for junk in ("12", "abcdef", "1" * 40, "١٢٣٤٥٦"):
        odd = await auth(duo, username="otp@example.com", factor="passcode", passcode=junk)
        assert odd["result"] == "deny", junk


async def test_wrong_passcodes_spend_the_budget_the_relying_party_path_shares(
    server: LiveServer,
) -> None:
    phone = await user_with_phone(server, "budget@example.com", sms=False)
    duo = await integration(server, "budget")
    wrong = a_wrong_code(phone.passcode(time.time()))
    for _ in range(MAX_PER_USER):
        denied = await auth(duo, username="budget@example.com", factor="passcode", passcode=wrong)
        assert denied["status_msg"] == "Incorrect passcode. Please try again."
    # The budget is spent: even the right passcode is refused now, through Duo...
    right = phone.passcode(time.time())
    spent = await auth(duo, username="budget@example.com", factor="passcode", passcode=right)
    assert spent["result"] == "deny" and "Too many incorrect passcodes" in spent["status_msg"]
    # ...and through the relying-party API's passcode route, which shares the budget.
    key = await api_key(server, "budget-rp")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        headers = {"Authorization": f"Bearer {key}"}
        created = await client.post(
            "/api/v1/approvals", json={"user": "budget@example.com"}, headers=headers
        )
        assert created.status_code == 201, created.text
        typed = await client.post(
            f"/api/v1/approvals/{created.json()['approval_id']}/passcode",
            json={"passcode": right},
            headers=headers,
        )
    assert typed.status_code == 429, typed.text


async def test_sms_sends_a_passcode_to_the_verified_number_and_it_allows_once(
    server_factory: ServerFactory, twilio_env: dict[str, str], fake_twilio: FakeTwilio
) -> None:
    server = await texted_server(server_factory, twilio_env)
    phone = await user_with_phone(server, "texted@example.com")
    await user_with_phone(server, "untexted@example.com", sms=False)
    duo = await integration(server, "sms")

    preauth = await duo.send(duo.v5("POST", "/auth/v2/preauth", {"username": "texted@example.com"}))
    [device] = duo_json(preauth, 200)["response"]["devices"]
    assert device["device"] == phone.device_id
    assert device["capabilities"] == ["auto", "push", "sms", "mobile_otp"]
    assert device["number"] == "XXX-XXX-2671"
    other = await duo.send(duo.v5("POST", "/auth/v2/preauth", {"username": "untexted@example.com"}))
    [no_sms] = duo_json(other, 200)["response"]["devices"]
    assert no_sms["capabilities"] == ["auto", "push", "mobile_otp"] and no_sms["number"] == ""

    sent = await auth(duo, username="texted@example.com", factor="sms", device=phone.device_id)
    assert sent == {"result": "deny", "status": "sent", "status_msg": "New SMS passcodes sent."}
    code = await last_text(fake_twilio, 1)
    wrong = await auth(
        duo, username="texted@example.com", factor="passcode", passcode=a_wrong_code(code)
    )
    assert wrong["result"] == "deny"
    allowed = await auth(duo, username="texted@example.com", factor="passcode", passcode=code)
    assert allowed["result"] == "allow"
    again = await auth(duo, username="texted@example.com", factor="passcode", passcode=code)
    assert again["result"] == "deny", "a texted passcode works once"

    refused = await auth(duo, username="untexted@example.com", factor="sms")
    assert refused["result"] == "deny" and refused["status"] == "deny"
    assert len(fake_twilio.requests) == 1, "nothing goes to a user without a verified number"


async def test_sms_is_limited_per_user(
    server_factory: ServerFactory, twilio_env: dict[str, str], fake_twilio: FakeTwilio
) -> None:
    server = await texted_server(server_factory, twilio_env)
    await user_with_phone(server, "chatty@example.com")
    duo = await integration(server, "chatty")
    for _ in range(3):
        assert (await auth(duo, username="chatty@example.com", factor="sms"))["status"] == "sent"
    limited = await auth(duo, username="chatty@example.com", factor="sms")
    assert limited["result"] == "deny" and "Too many SMS passcodes" in limited["status_msg"]
    assert len(fake_twilio.requests) == 3
    # Only the newest code is live.
    newest = await last_text(fake_twilio, 3)
    older = await last_text(fake_twilio, 1)
    if older != newest:
        stale = await auth(duo, username="chatty@example.com", factor="passcode", passcode=older)
        assert stale["result"] == "deny"
    fresh = await auth(duo, username="chatty@example.com", factor="passcode", passcode=newest)
    assert fresh["result"] == "allow"


async def test_an_asynchronous_passcode_is_read_back_by_its_integration_only(
    server: LiveServer,
) -> None:
    phone = await user_with_phone(server, "async-otp@example.com", sms=False)
    duo, other = await integration(server, "async-otp"), await integration(server, "nosy")
    code = phone.passcode(time.time())
    started = await auth(
        duo, username="async-otp@example.com", factor="passcode", passcode=code, **{"async": "1"}
    )
    txid = started["txid"]
    status = await duo.send(duo.v5("GET", "/auth/v2/auth_status", {"txid": txid}))
    assert duo_json(status, 200)["response"]["result"] == "allow"
    stolen = await other.send(other.v5("GET", "/auth/v2/auth_status", {"txid": txid}))
    duo_json(stolen, 400, 40002)
    legacy = await other.send(other.v1("GET", "/rest/v1/status.bson", {"txid": txid}))
    duo_bson(legacy, 400, 40002)


async def test_login_duos_typed_passcode_and_sms_option_on_the_v1_face(
    server_factory: ServerFactory, twilio_env: dict[str, str], fake_twilio: FakeTwilio
) -> None:
    server = await texted_server(server_factory, twilio_env)
    phone = await user_with_phone(server, "v1@example.com")
    duo = await integration(server, "v1")
    preauth = duo_bson(
        await duo.send(duo.v1("POST", "/rest/v1/preauth.bson", {"user": "v1@example.com"})), 200
    )["response"]
    assert preauth["factors"] == {"default": "push1", "1": "push1", "2": "smsrefresh1"}

    async def typed(answer: str) -> dict[str, Any]:
        """What login_duo on a terminal sends for an answer at the prompt (an option's number
        becomes its factor name), then one poll."""
        params = {"user": "v1@example.com", "factor": "auto", "auto": answer, "async": "1",
                  "ipaddr": "192.0.2.9"}  # fmt: skip
        started = duo_bson(await duo.send(duo.v1("POST", "/rest/v1/auth.bson", params)), 200)
        txid = started["response"]["txid"]
        polled = await duo.send(duo.v1("GET", "/rest/v1/status.bson", {"txid": txid}))
        reply: dict[str, Any] = duo_bson(polled, 200)["response"]
        return reply

    assert await typed("smsrefresh1") == {"result": "deny", "status": "New SMS passcodes sent."}
    code = await last_text(fake_twilio, 1)
    assert await typed(code) == {"result": "allow", "status": "Success. Logging you in..."}
    assert (await typed(phone.passcode(time.time())))["result"] == "allow"
    assert (await typed("not a passcode"))["result"] == "deny"
    # The synchronous form (login_duo without a terminal, DUO_PASSCODE in its environment).
    params = {"user": "v1@example.com", "factor": "auto", "auto": a_wrong_code(), "async": "0"}
    sync = duo_bson(await duo.send(duo.v1("POST", "/rest/v1/auth.bson", params)), 200)
    assert sync["response"] == {"result": "deny", "status": "Incorrect passcode. Please try again."}
