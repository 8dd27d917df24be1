"""The SMS fallback through the real server and a fake Twilio: phone verification, codes sent
when no device can be reached (or when the browser asks), code entry, wrong codes, and the
log sender of the embedded default.
"""

from __future__ import annotations

import json
import logging
import re
import time

import httpx
import pytest

from app.db.accounts import create_api_key
from app.db.models import User
from app.delivery.sms import LogSms
from app.settings import Settings
from tests.fakes import fcm as fcm_replies
from tests.fakes import twilio as twilio_replies
from tests.fakes import wait_until
from tests.fakes.fcm import FakeFcm
from tests.fakes.twilio import FakeTwilio
from tests.fixtures.app import LiveServer, ServerFactory, approval_for
from tests.integration.test_login_loop import device_socket, next_frame
from tests.integration.test_push_delivery import (
    WAIT,
    add_user_with_phone,
    audit_events,
    decide_over_http,
    deliveries_settled,
    eventually,
    providers_for,
    push_token,
    start_login,
    watch,
)

pytestmark = pytest.mark.timeout(90)

PHONE = "+14155552671"


def code_in(body: str) -> str:
    found = re.search(r"\b(\d{6})\b", body)
    assert found, body
    return found.group(1)


def not_the(code: str, *others: str) -> str:
    """A well-formed code that is none of the given ones."""
    return next(c for c in ("000000", "111111", "222222") if c != code and c not in others)


async def texts(fake: FakeTwilio, count: int) -> list[dict[str, str]]:
    await wait_until(lambda: len(fake.requests) >= count, timeout=WAIT)
    return [r.form for r in fake.requests]


async def signed_in(server: LiveServer, email: str) -> httpx.AsyncClient:
    """A browser with a full session: the sign-in approved on the user's phone."""
    user_id = await server.add_user(email)
    phone = await server.enroll_phone(user_id)
    browser = server.browser()
    started = await start_login(server, browser, email)
    approval = await approval_for(phone, server)
    async with httpx.AsyncClient(base_url=server.url) as app:
        answer = await app.post(
            f"/api/approvals/{approval['id']}/decision",
            json={"jws": phone.sign(approval, number=started["number"])},
            headers=phone.auth,
        )
    assert answer.json() == {"status": "approved"}
    done = await browser.post(f"/api/login/{started['approval_id']}/complete")
    assert done.status_code == 200 and done.json() == {"status": "authenticated"}, done.text
    return browser


async def test_a_phone_number_is_verified_by_an_sms_code(
    server_factory: ServerFactory, twilio_env: dict[str, str], fake_twilio: FakeTwilio
) -> None:
    server = await server_factory(providers=await providers_for(twilio_env))
    browser = await signed_in(server, "verify@example.com")
    account = (await browser.get("/api/account")).json()
    assert (account["phone"], account["phone_verified"], account["sms_fallback"]) == (
        None,
        False,
        True,
    )

    bad = await browser.post("/api/account/phone", json={"phone": "12"})
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_request"
    sent = await browser.post("/api/account/phone", json={"phone": "+1 415-555-2671"})
    assert sent.status_code == 202, sent.text
    [text] = await texts(fake_twilio, 1)
    assert text["To"] == PHONE and text["From"] == twilio_env["TAPPROVE_TWILIO_FROM"]
    code = code_in(text["Body"])
    assert fake_twilio.requests[0].basic_auth == (fake_twilio.account_sid, fake_twilio.auth_token)

    wrong = await browser.post("/api/account/phone/verify", json={"code": not_the(code)})
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_code"
    assert (await browser.get("/api/account")).json()["phone_verified"] is False
    right = await browser.post("/api/account/phone/verify", json={"code": code})
    assert right.status_code == 200, right.text
    account = (await browser.get("/api/account")).json()
    assert (account["phone"], account["phone_verified"]) == (PHONE, True)
    again = await browser.post("/api/account/phone/verify", json={"code": code})
    assert again.status_code == 400, "a code works once"

    off = await browser.patch("/api/account", json={"sms_fallback": False})
    assert off.status_code == 200 and off.json()["sms_fallback"] is False
    assert (await browser.get("/api/account")).json()["sms_fallback"] is False
    on = await browser.patch("/api/account", json={"sms_fallback": True})
    assert on.json()["sms_fallback"] is True


async def test_a_dead_push_token_falls_back_to_sms_and_the_code_approves(
    server_factory: ServerFactory,
    provider_env: dict[str, str],
    fake_fcm: FakeFcm,
    fake_twilio: FakeTwilio,
) -> None:
    server = await server_factory(providers=await providers_for(provider_env))
    user_id = await add_user_with_phone(server, "dead@example.com")
    phone = await server.enroll_phone(user_id, push={"provider": "fcm", "token": "fcm-dead"})
    fake_fcm.reply(fcm_replies.unregistered())
    browser = server.browser()

    started = await start_login(server, browser, "dead@example.com")
    assert started["channels"] == ["fcm"]
    approval_id = started["approval_id"]
    async with watch(server, browser, approval_id) as stream:
        assert (await stream.wait_for(type="delivered"))["channel"] == "sms"
        [text] = await texts(fake_twilio, 1)
        assert text["To"] == PHONE
        code = code_in(text["Body"])
        assert await push_token(server, phone.device_id) is None
        status = (await browser.get(f"/api/login/{approval_id}")).json()
        assert status["channels"] == ["fcm", "sms"] and status["delivered"] == ["sms"]

        wrong = await browser.post(f"/api/login/{approval_id}/code", json={"code": not_the(code)})
        assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_code"
        right = await browser.post(f"/api/login/{approval_id}/code", json={"code": code})
        assert right.status_code == 200 and right.json() == {"status": "approved"}
        assert (await stream.wait_for(type="result"))["status"] == "approved"

    done = await browser.post(f"/api/login/{approval_id}/complete")
    assert done.status_code == 200 and done.json() == {"status": "authenticated"}
    attempts = await audit_events(server, approval_id, "delivery.attempt")
    assert [(a["channel"], a["outcome"]) for a in attempts] == [
        ("fcm", "invalid_token"),
        ("sms", "accepted"),
    ]
    assert code not in json.dumps(attempts, default=str)
    # Only one automatic code per sign-in, however the deliveries ended.
    assert len(fake_twilio.requests) == 1


async def test_a_phone_without_push_that_is_away_gets_the_code_at_once(
    server_factory: ServerFactory, twilio_env: dict[str, str], fake_twilio: FakeTwilio
) -> None:
    server = await server_factory(providers=await providers_for(twilio_env))
    user_id = await add_user_with_phone(server, "nopush@example.com")
    await server.enroll_phone(user_id)
    browser = server.browser()

    started = await start_login(server, browser, "nopush@example.com")
    assert started["channels"] == ["sms"]
    [text] = await texts(fake_twilio, 1)
    answer = await browser.post(
        f"/api/login/{started['approval_id']}/code", json={"code": code_in(text["Body"])}
    )
    assert answer.json() == {"status": "approved"}


async def test_a_connected_phone_that_never_acks_and_has_no_push_falls_back_to_sms(
    server_factory: ServerFactory, twilio_env: dict[str, str], fake_twilio: FakeTwilio
) -> None:
    server = await server_factory(providers=await providers_for(twilio_env))
    user_id = await add_user_with_phone(server, "mute@example.com")
    phone = await server.enroll_phone(user_id)
    ws = await device_socket(server, phone)
    browser = server.browser()

    started = await start_login(server, browser, "mute@example.com")
    assert started["channels"] == ["websocket"]
    await next_frame(ws, "approval_request")  # never acknowledged
    async with watch(server, browser, started["approval_id"]) as stream:
        assert (await stream.wait_for(type="delivered"))["channel"] == "sms"
    assert len(await texts(fake_twilio, 1)) == 1
    await ws.close()


async def test_five_wrong_codes_deny_the_sign_in_even_across_new_codes(
    server_factory: ServerFactory, twilio_env: dict[str, str], fake_twilio: FakeTwilio
) -> None:
    server = await server_factory(providers=await providers_for(twilio_env))
    user_id = await add_user_with_phone(server, "guess@example.com")
    await server.enroll_phone(user_id)
    browser = server.browser()
    started = await start_login(server, browser, "guess@example.com")
    approval_id = started["approval_id"]
    first = code_in((await texts(fake_twilio, 1))[0]["Body"])

    async with watch(server, browser, approval_id) as stream:
        for _ in range(2):
            wrong = await browser.post(
                f"/api/login/{approval_id}/code", json={"code": not_the(first)}
            )
            assert wrong.status_code == 400 and "status" not in wrong.json()
        # A new code does not buy new guesses.
        asked = await browser.post(f"/api/login/{approval_id}/sms")
        assert asked.status_code == 202, asked.text
        second = code_in((await texts(fake_twilio, 2))[1]["Body"])
        await stream.wait_for(type="delivered", channel="sms")
        for _ in range(2):
            wrong = await browser.post(
                f"/api/login/{approval_id}/code", json={"code": not_the(first, second)}
            )
            assert wrong.status_code == 400 and "status" not in wrong.json()
        fifth = await browser.post(
            f"/api/login/{approval_id}/code", json={"code": not_the(first, second)}
        )
        assert fifth.status_code == 400
        assert fifth.json()["error"] == "invalid_code" and fifth.json()["status"] == "denied"
        assert (await stream.wait_for(type="result"))["status"] == "denied"

    late = await browser.post(f"/api/login/{approval_id}/code", json={"code": second})
    assert late.status_code == 409 and late.json()["error"] == "already_decided"
    done = await browser.post(f"/api/login/{approval_id}/complete")
    assert done.status_code == 409 and done.json()["error"] == "not_approved"
    [decided] = await audit_events(server, approval_id, "approval.decided")
    assert decided["reason"] == "too_many_codes"


async def test_the_browser_can_ask_for_a_code_at_most_three_times(
    server_factory: ServerFactory, twilio_env: dict[str, str], fake_twilio: FakeTwilio
) -> None:
    server = await server_factory(providers=await providers_for(twilio_env))
    user_id = await add_user_with_phone(server, "ask@example.com")
    phone = await server.enroll_phone(user_id)
    ws = await device_socket(server, phone)
    browser = server.browser()
    started = await start_login(server, browser, "ask@example.com")
    approval_id = started["approval_id"]
    request = await next_frame(ws, "approval_request")
    await ws.send(json.dumps({"type": "ack", "id": request["approval"]["id"]}))
    await eventually(lambda: deliveries_settled(server, approval_id))
    assert fake_twilio.requests == [], "a phone that acknowledged was reached: no SMS"

    for count in (1, 2, 3):
        asked = await browser.post(f"/api/login/{approval_id}/sms")
        assert asked.status_code == 202 and asked.json() == {"status": "sms_sent"}
        await texts(fake_twilio, count)
    refused = await browser.post(f"/api/login/{approval_id}/sms")
    assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1, refused.headers
    # Only the newest code counts.
    codes = [code_in(form["Body"]) for form in await texts(fake_twilio, 3)]
    if codes[0] != codes[2]:
        old = await browser.post(f"/api/login/{approval_id}/code", json={"code": codes[0]})
        assert old.status_code == 400
    answer = await browser.post(f"/api/login/{approval_id}/code", json={"code": codes[2]})
    assert answer.json() == {"status": "approved"}
    await ws.close()


async def test_no_sms_when_the_user_turned_it_off(
    server_factory: ServerFactory,
    provider_env: dict[str, str],
    fake_fcm: FakeFcm,
    fake_twilio: FakeTwilio,
) -> None:
    server = await server_factory(providers=await providers_for(provider_env))
    user_id = await add_user_with_phone(server, "nosms@example.com", sms_fallback=False)
    phone = await server.enroll_phone(user_id, push={"provider": "fcm", "token": "fcm-x"})
    fake_fcm.reply(fcm_replies.unregistered())
    browser = server.browser()

    started = await start_login(server, browser, "nosms@example.com")
    await eventually(lambda: _no_token(server, phone.device_id))
    await eventually(lambda: deliveries_settled(server, started["approval_id"]))
    asked = await browser.post(f"/api/login/{started['approval_id']}/sms")
    assert asked.status_code == 409 and asked.json()["error"] == "sms_unavailable"
    assert fake_twilio.requests == []
    status = (await browser.get(f"/api/login/{started['approval_id']}")).json()
    assert status["status"] == "pending" and "sms" not in status["channels"]


async def _no_token(server: LiveServer, device_id: str) -> bool:
    return await push_token(server, device_id) is None


async def test_twilio_busy_is_retried_with_a_fresh_code(
    server_factory: ServerFactory, twilio_env: dict[str, str], fake_twilio: FakeTwilio
) -> None:
    server = await server_factory(providers=await providers_for(twilio_env))
    user_id = await add_user_with_phone(server, "busy@example.com")
    await server.enroll_phone(user_id)
    fake_twilio.reply(twilio_replies.service_unavailable(retry_after=1))
    browser = server.browser()

    started = await start_login(server, browser, "busy@example.com")
    async with watch(server, browser, started["approval_id"]) as stream:
        assert (await stream.wait_for(type="delivered"))["channel"] == "sms"
    first, second = (code_in(form["Body"]) for form in await texts(fake_twilio, 2))
    if first != second:
        stale = await browser.post(
            f"/api/login/{started['approval_id']}/code", json={"code": first}
        )
        assert stale.status_code == 400
    answer = await browser.post(f"/api/login/{started['approval_id']}/code", json={"code": second})
    assert answer.json() == {"status": "approved"}
    attempts = await audit_events(server, started["approval_id"], "delivery.attempt")
    assert [a["outcome"] for a in attempts] == ["retry", "accepted"]


async def test_a_retry_after_beyond_the_expiry_gives_up_on_push_and_texts_at_once(
    server_factory: ServerFactory,
    provider_env: dict[str, str],
    fake_fcm: FakeFcm,
    fake_twilio: FakeTwilio,
) -> None:
    server = await server_factory(providers=await providers_for(provider_env))
    user_id = await add_user_with_phone(server, "later@example.com")
    phone = await server.enroll_phone(user_id, push={"provider": "fcm", "token": "fcm-later"})
    fake_fcm.reply(fcm_replies.quota_exceeded(retry_after=3600))
    browser = server.browser()

    started = await start_login(server, browser, "later@example.com")
    async with watch(server, browser, started["approval_id"]) as stream:
        assert (await stream.wait_for(type="delivered"))["channel"] == "sms"
    assert len(fake_fcm.requests) == 1
    # A busy FCM is not a dead token.
    assert await push_token(server, phone.device_id) == "fcm-later"
    text = (await texts(fake_twilio, 1))[0]
    answer = await browser.post(
        f"/api/login/{started['approval_id']}/code", json={"code": code_in(text["Body"])}
    )
    assert answer.json() == {"status": "approved"}


async def test_an_expired_sign_in_takes_no_code(
    server_factory: ServerFactory, twilio_env: dict[str, str], fake_twilio: FakeTwilio
) -> None:
    server = await server_factory(providers=await providers_for(twilio_env), approval_ttl=5)
    user_id = await add_user_with_phone(server, "slow@example.com")
    await server.enroll_phone(user_id)
    browser = server.browser()
    started = await start_login(server, browser, "slow@example.com")
    code = code_in((await texts(fake_twilio, 1))[0]["Body"])
    async with watch(server, browser, started["approval_id"]) as stream:
        assert (await stream.wait_for(type="result"))["status"] == "expired"
    late = await browser.post(f"/api/login/{started['approval_id']}/code", json={"code": code})
    assert late.status_code == 410 and late.json()["error"] == "expired"
    asked = await browser.post(f"/api/login/{started['approval_id']}/sms")
    assert asked.status_code == 410
    assert len(fake_twilio.requests) == 1


async def test_without_twilio_the_code_is_written_to_the_log(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    providers = await providers_for({})
    assert isinstance(providers.sms, LogSms)
    assert Settings.model_validate({}).twilio_account_sid is None
    server = await server_factory(providers=providers)
    user_id = await add_user_with_phone(server, "embedded@example.com")
    phone = await server.enroll_phone(user_id)
    caplog.set_level(logging.INFO, logger="app.delivery.sms")
    browser = server.browser()

    started = await start_login(server, browser, "embedded@example.com")
    assert started["channels"] == ["sms"]

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "app.delivery.sms"]

    await wait_until(lambda: bool(logged()), timeout=WAIT)
    [line] = logged()
    assert PHONE in line
    answer = await browser.post(
        f"/api/login/{started['approval_id']}/code", json={"code": code_in(line)}
    )
    assert answer.json() == {"status": "approved"}
    # The phone app still works as usual alongside.
    assert (
        await decide_over_http(server, phone, started["approval_id"], started["number"])
    ).status_code == 409


async def test_a_number_twilio_refuses_for_good_is_no_longer_counted_verified(
    server_factory: ServerFactory, twilio_env: dict[str, str], fake_twilio: FakeTwilio
) -> None:
    server = await server_factory(providers=await providers_for(twilio_env))
    user_id = await add_user_with_phone(server, "landline@example.com")
    await server.enroll_phone(user_id)
    fake_twilio.reply(twilio_replies.not_mobile(PHONE))
    browser = server.browser()

    started = await start_login(server, browser, "landline@example.com")
    assert started["channels"] == ["sms"]
    await eventually(lambda: _phone_verified(server, user_id, False))
    assert len(fake_twilio.requests) == 1, "a permanent refusal is not retried"
    status = (await browser.get(f"/api/login/{started['approval_id']}")).json()
    assert status["status"] == "pending" and status["delivered"] == []
    asked = await browser.post(f"/api/login/{started['approval_id']}/sms")
    assert asked.status_code == 409 and asked.json()["error"] == "sms_unavailable"


async def _phone_verified(server: LiveServer, user_id: str, expected: bool) -> bool:
    async with server.services.db() as db:
        user = await db.get(User, user_id)
        assert user is not None
        return user.phone_verified is expected


async def test_a_relying_party_approval_gets_no_sms_code(
    server_factory: ServerFactory, twilio_env: dict[str, str], fake_twilio: FakeTwilio
) -> None:
    server = await server_factory(providers=await providers_for(twilio_env))
    user_id = await add_user_with_phone(server, "vpn@example.com")
    await server.enroll_phone(user_id)
    async with server.services.db() as db:
        _, api_key = await create_api_key(db, "vpn", now=time.time())
        await db.commit()
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {api_key}"}
    ) as rp:
        created = await rp.post("/api/v1/approvals", json={"user": "vpn@example.com"})
    assert created.status_code == 201, created.text
    approval = await server.services.approvals.get(created.json()["approval_id"])
    # No browser could take the code, so none is sent.
    assert approval is not None and approval.channels == []
    assert await deliveries_settled(server, approval.id)
    assert fake_twilio.requests == []
