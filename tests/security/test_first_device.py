"""The first-device rule, through the routes a person or an attacker uses, rate limits live.

The password alone enrolls only an account's very first device. Once an account has had one,
losing (or revoking) every device does not hand it back to the password: the ways back are
an SMS code to the verified number, or an operator's reset link, and the owner is mailed
about each. A password-only session enrolls one device however many codes it made, and two
codes used at once still give one device.

Every step goes over HTTP to a real server (PostgreSQL, Redis, a fake Twilio, a real SMTP
server): sign in with the password, create the code, enroll with a fresh key, answer on the
phone. Users are created in the database (with a cheap hash of the same password); nothing
else is: no `enroll_phone` (it writes codes into the database), no `person()` (it mints a
session in Redis), and rate limits are not wiped.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import col, select

from app.core.signatures import device_public_jwk
from app.db.models import AuditEvent, Device, User
from tests.fakes import wait_until
from tests.fakes.twilio import FakeTwilio
from tests.fixtures.app import PASSWORD, LiveServer, Phone, ServerFactory
from tests.fixtures.mail import Received, SmtpServer
from tests.integration.test_push_delivery import providers_for
from tests.security.harness import add_user, decide, device_view, unique_email

pytestmark = pytest.mark.timeout(180)

NUMBER = "+14155552671"
# What an Android app's HTTP stack sends; the notice names it ("Android 14 on Android").
PHONE_APP = "Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8 Build/AP1A.240305.019)"
WAIT = 30.0


DEVICE_ADDED = "A new device was added to your account"
SMS_RECOVERY = "A phone is being added after a sign-in with an SMS code"
CODE_RECOVERY = "A recovery code was used to sign in to your account"
RESET = "The phones on your account were reset"


@dataclass
class World:
    """A running server that texts through a fake Twilio and mails through a real SMTP server."""

    server: LiveServer
    twilio: FakeTwilio
    smtp: SmtpServer


@pytest.fixture
async def world(
    server_factory: ServerFactory,
    twilio_env: dict[str, str],
    fake_twilio: FakeTwilio,
    smtp_server: SmtpServer,
) -> World:
    server = await server_factory(
        providers=await providers_for(twilio_env),
        smtp_url=smtp_server.url,
        mail_from="tapprove@example.test",
    )
    return World(server, fake_twilio, smtp_server)


# --- what a person does -----------------------------------------------------------------------


async def enroll_request(
    server: LiveServer, code: str, key: ec.EllipticCurvePrivateKey
) -> httpx.Response:
    """`POST /api/devices` from a phone app, with a key of its own."""
    async with httpx.AsyncClient(
        base_url=server.url, headers={"User-Agent": PHONE_APP}, timeout=30
    ) as app:
        return await app.post(
            "/api/devices",
            json={
                "code": code,
                "name": "Pixel",
                "platform": "android",
                "public_key": device_public_jwk(key.public_key()),
            },
        )


async def enroll(server: LiveServer, code: str) -> Phone:
    key = ec.generate_private_key(ec.SECP256R1())
    response = await enroll_request(server, code, key)
    assert response.status_code == 201, response.text
    body = response.json()
    return Phone(body["device_id"], body["device_token"], key)


async def new_code(browser: httpx.AsyncClient) -> str:
    response = await browser.post("/api/devices/enrollments")
    assert response.status_code == 201, response.text
    code: str = response.json()["code"]
    return code


async def first_sign_in(server: LiveServer, email: str) -> httpx.AsyncClient:
    """The password on an account that never had a device: a restricted session."""
    browser = server.browser()
    response = await server.login(browser, email)
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "enrollment_required"}
    return browser


async def sign_in_on(
    server: LiveServer, email: str, phone: Phone, **extra: Any
) -> httpx.AsyncClient:
    """Password, then the approval answered on `phone` with the number the browser shows."""
    browser = server.browser()
    started = await server.login(browser, email, **extra)
    assert started.status_code == 202, started.text
    approval_id, number = started.json()["approval_id"], started.json()["number"]
    approval = await device_view(server, phone, approval_id)
    answer = await decide(server, phone, approval_id, phone.sign(approval, number=number))
    assert answer.status_code == 200, answer.text
    done = await browser.post(f"/api/login/{approval_id}/complete")
    assert done.status_code == 200, done.text
    return browser


def code_in(body: str) -> str:
    found = re.search(r"\b(\d{6})\b", body)
    assert found, body
    return found.group(1)


async def next_text(twilio: FakeTwilio, seen: int) -> str:
    """The body of the first text after the `seen` ones already sent."""
    await wait_until(lambda: len(twilio.requests) > seen, timeout=WAIT)
    text = twilio.requests[seen].form
    assert text["To"] == NUMBER
    return text["Body"]


async def verify_number(world: World, browser: httpx.AsyncClient) -> None:
    """Add and verify a phone number from a full session, as the account page does."""
    seen = len(world.twilio.requests)
    added = await browser.post("/api/account/phone", json={"phone": NUMBER})
    assert added.status_code == 202, added.text
    code = code_in(await next_text(world.twilio, seen))
    verified = await browser.post("/api/account/phone/verify", json={"code": code})
    assert verified.status_code == 200, verified.text


async def sign_in_by_sms(world: World, email: str) -> httpx.AsyncClient:
    """Password, then the code texted to the verified number (no device can answer)."""
    seen = len(world.twilio.requests)
    browser = world.server.browser()
    started = await world.server.login(browser, email)
    assert started.status_code == 202, started.text
    body = started.json()
    assert body["status"] == "approval_required" and body["channels"] == ["sms"], body
    code = code_in(await next_text(world.twilio, seen))
    approved = await browser.post(f"/api/login/{body['approval_id']}/code", json={"code": code})
    assert approved.status_code == 200 and approved.json() == {"status": "approved"}
    done = await browser.post(f"/api/login/{body['approval_id']}/complete")
    assert done.status_code == 200, done.text
    return browser


@dataclass
class Owner:
    """Someone who signed up, enrolled a first phone over HTTP, and kept that first browser."""

    email: str
    phone: Phone
    first_browser: httpx.AsyncClient  # the restricted session of the very first sign-in


async def owner(world: World, *, number: bool = False, sms_fallback: bool = True) -> Owner:
    email = unique_email("owner")
    await add_user(world.server, email)
    first = await first_sign_in(world.server, email)
    phone = await enroll(world.server, await new_code(first))
    if number:
        browser = await sign_in_on(world.server, email, phone)
        await verify_number(world, browser)
        if not sms_fallback:
            off = await browser.patch("/api/account", json={"sms_fallback": False})
            assert off.status_code == 200 and off.json()["sms_fallback"] is False
    return Owner(email, phone, first)


async def revoke(server: LiveServer, who: Owner, how: str) -> None:
    """The phone unenrolls itself, or its owner revokes it from a session it approved."""
    if how == "device":
        async with httpx.AsyncClient(base_url=server.url, headers=who.phone.auth) as app:
            gone = await app.delete("/api/devices/me")
    else:
        session = await sign_in_on(server, who.email, who.phone)
        gone = await session.delete(f"/api/devices/{who.phone.device_id}")
    assert gone.status_code == 200 and gone.json() == {"status": "revoked"}, gone.text


# --- what the server holds and sends ------------------------------------------------------------


async def active_devices(server: LiveServer, email: str) -> list[Device]:
    async with server.services.db() as db:
        user = (await db.exec(select(User).where(User.email == email))).one()
        rows = await db.exec(
            select(Device).where(Device.user_id == user.id, col(Device.revoked_at).is_(None))
        )
        return list(rows.all())


async def audit_kinds(server: LiveServer, email: str) -> list[str]:
    await server.audit_filed()
    async with server.services.db() as db:
        user = (await db.exec(select(User).where(User.email == email))).one()
        rows = await db.exec(
            select(AuditEvent.kind)
            .where(AuditEvent.user_id == user.id)
            .order_by(col(AuditEvent.id))
        )
        return list(rows.all())


async def mail_to(smtp: SmtpServer, address: str, subject: str, *, nth: int = 0) -> Received:
    """The `nth` mail (from 0) to `address` with this subject, waiting for it."""

    def found() -> list[Received]:
        return [m for m in smtp.to(address) if m.subject == subject]

    await wait_until(lambda: len(found()) > nth, timeout=WAIT)
    return found()[nth]


def assert_device_added_mail(mail: Received) -> None:
    """The notice names the device and where the enrolling request came from."""
    text = " ".join(mail.text.split())
    assert "Name: Pixel" in text and "Platform: android" in text, mail.text
    assert "From IP: 127.0.0.1" in text, mail.text
    assert "App: Android 14 on Android" in text, mail.text
    assert "127.0.0.1" in mail.part("html")


# --- a first phone with the password alone ----------------------------------------------------


async def test_a_new_account_enrolls_its_first_phone_with_the_password_and_is_told(
    world: World,
) -> None:
    server = world.server
    email = unique_email("new")
    await add_user(server, email)
    first = await first_sign_in(server, email)

    phone = await enroll(server, await new_code(first))

    assert [d.id for d in await active_devices(server, email)] == [phone.device_id]
    assert_device_added_mail(await mail_to(world.smtp, email, DEVICE_ADDED))
    # That session got its one device; a second needs a sign-in approved on the first.
    more = await first.post("/api/devices/enrollments")
    assert more.status_code == 403 and more.json()["error"] == "not_allowed"
    approved = await sign_in_on(server, email, phone)
    assert (await approved.post("/api/devices/enrollments")).status_code == 201


# --- the attack: revoke the only phone, then the password ---------------------------------------


@pytest.mark.parametrize("how", ["device", "owner"])
async def test_revoking_the_only_phone_does_not_hand_the_account_to_the_password(
    world: World, how: str
) -> None:
    server = world.server
    who = await owner(world)
    await revoke(server, who, how)
    assert await active_devices(server, who.email) == []

    attacker = server.browser()
    refused = await server.login(attacker, who.email)

    assert refused.status_code == 403, refused.text
    body = refused.json()
    assert body["error"] == "recovery_required" and "administrator" in body["message"]
    assert "tapprove_session" not in attacker.cookies
    assert (await attacker.post("/api/devices/enrollments")).status_code == 401
    # Nor does the restricted session of the owner's very first sign-in (still alive).
    stale = await who.first_browser.post("/api/devices/enrollments")
    assert stale.status_code == 403 and stale.json()["error"] == "not_allowed"
    assert await active_devices(server, who.email) == []
    assert "login.recovery_required" in await audit_kinds(server, who.email)


@pytest.mark.parametrize("why", ["sms_turned_off", "no_sms_provider"])
async def test_a_verified_number_that_cannot_get_a_code_is_no_way_back(
    world: World, server_factory: ServerFactory, why: str
) -> None:
    who = await owner(world, number=True, sms_fallback=why != "sms_turned_off")
    await revoke(world.server, who, "device")
    # Another process of the same deployment, without an SMS provider.
    server = (
        world.server
        if why == "sms_turned_off"
        else await server_factory(smtp_url=world.smtp.url, mail_from="tapprove@example.test")
    )
    texts = len(world.twilio.requests)

    refused = await server.login(server.browser(), who.email)

    assert refused.status_code == 403 and refused.json()["error"] == "recovery_required"
    assert len(world.twilio.requests) == texts
    assert await active_devices(server, who.email) == []


async def test_a_remembered_browser_is_not_a_way_back(world: World) -> None:
    server = world.server
    who = await owner(world)
    browser = await sign_in_on(server, who.email, who.phone, remember_browser=True)
    assert "tapprove_trust" in browser.cookies
    gone = await browser.delete(f"/api/devices/{who.phone.device_id}")
    assert gone.status_code == 200
    assert (await browser.post("/api/logout")).status_code == 200

    again = await server.login(browser, who.email)
    assert again.status_code == 200 and again.json() == {"status": "authenticated"}
    refused = await browser.post("/api/devices/enrollments")

    assert refused.status_code == 403 and refused.json()["error"] == "not_allowed"
    assert await active_devices(server, who.email) == []


# --- the ways back -----------------------------------------------------------------------------


async def test_with_every_phone_gone_an_sms_code_signs_in_and_adds_exactly_one_phone(
    world: World,
) -> None:
    server = world.server
    who = await owner(world, number=True)
    await revoke(server, who, "device")

    browser = await sign_in_by_sms(world, who.email)
    codes = [await new_code(browser), await new_code(browser)]

    told = await mail_to(world.smtp, who.email, SMS_RECOVERY)
    assert "ending in 71" in told.text and "127.0.0.1" in told.text, told.text
    # Both codes at once: the session may add one phone, not two.
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in codes]
    answers = await asyncio.gather(
        *(enroll_request(server, c, k) for c, k in zip(codes, keys, strict=True))
    )
    assert sorted(a.status_code for a in answers) == [201, 400], [a.text for a in answers]
    loser = next(a for a in answers if a.status_code == 400)
    assert loser.json()["error"] == "invalid_or_expired_code"
    [device] = await active_devices(server, who.email)
    winner = next(a for a in answers if a.status_code == 201).json()
    assert device.id == winner["device_id"]
    assert_device_added_mail(await mail_to(world.smtp, who.email, DEVICE_ADDED, nth=1))
    more = await browser.post("/api/devices/enrollments")
    assert more.status_code == 403 and more.json()["error"] == "not_allowed"
    # The new phone is the account's second factor from now on.
    key = keys[answers.index(next(a for a in answers if a.status_code == 201))]
    phone = Phone(winner["device_id"], winner["device_token"], key)
    await sign_in_on(server, who.email, phone)


async def test_an_operator_reset_link_enrolls_a_phone_without_signing_in(
    world: World, tmp_path: Path
) -> None:
    server = world.server
    who = await owner(world)
    session = await sign_in_on(server, who.email, who.phone)
    earlier = await new_code(session)  # made by a session the lost phone approved

    reset = await run_cli(server, tmp_path, "user", "reset-phones", who.email.upper(), "--json")

    assert set(reset) == {"email", "code", "uri", "expires_at"} and reset["email"] == who.email
    assert reset["uri"].startswith("tapprove://enroll?url=") and reset["code"] in reset["uri"]
    # The lost phone and every session are gone.
    async with httpx.AsyncClient(base_url=server.url, headers=who.phone.auth) as app:
        assert (await app.get("/api/devices/me/approvals")).status_code == 401
    assert (await session.get("/api/account")).status_code == 401
    stale = await enroll_request(server, earlier, ec.generate_private_key(ec.SECP256R1()))
    assert stale.status_code == 400 and stale.json()["error"] == "invalid_or_expired_code"
    told = await mail_to(world.smtp, who.email, RESET)
    assert "removed the 1 device(s)" in " ".join(told.text.split()), told.text

    phone = await enroll(server, reset["code"])

    again = await enroll_request(server, reset["code"], ec.generate_private_key(ec.SECP256R1()))
    assert again.status_code == 400 and again.json()["error"] == "invalid_or_expired_code"
    assert [d.id for d in await active_devices(server, who.email)] == [phone.device_id]
    assert_device_added_mail(await mail_to(world.smtp, who.email, DEVICE_ADDED, nth=1))
    await sign_in_on(server, who.email, phone)


async def recovery_codes(browser: httpx.AsyncClient) -> list[str]:
    """A new set from the account page (a session approved on the phone)."""
    made = await browser.post("/api/account/recovery-codes")
    assert made.status_code == 201, made.text
    codes: list[str] = made.json()["codes"]
    return codes


async def sign_in_with_code(server: LiveServer, email: str, code: str) -> httpx.Response:
    browser = server.browser()
    return await browser.post(
        "/api/login/recovery", json={"email": email, "password": PASSWORD, "code": code}
    )


async def test_with_every_phone_gone_a_recovery_code_signs_in_once_and_adds_one_phone(
    world: World,
) -> None:
    server = world.server
    who = await owner(world)
    codes = await recovery_codes(await sign_in_on(server, who.email, who.phone))
    assert len(codes) == 10 and all(re.fullmatch(r"[0-9a-z]{5}-[0-9a-z]{5}", c) for c in codes)
    await revoke(server, who, "device")
    texts = len(world.twilio.requests)
    assert (await server.login(server.browser(), who.email)).status_code == 403

    # Typed as a person might: upper case, a space for the hyphen.
    signed_in = await sign_in_with_code(server, who.email, codes[3].upper().replace("-", " "))

    assert signed_in.status_code == 200, signed_in.text
    assert signed_in.json() == {"status": "authenticated", "recovery_codes_left": 9}
    browser = server.browser(cookies=signed_in.cookies)
    account = (await browser.get("/api/account")).json()
    assert (account["signed_in_with"], account["recovery_codes_left"]) == ("recovery_code", 9)
    told = await mail_to(world.smtp, who.email, CODE_RECOVERY)
    assert "9 of your codes are left" in " ".join(told.text.split()), told.text
    assert "127.0.0.1" in told.text and len(world.twilio.requests) == texts
    # Once: the same code again is refused, however it is typed.
    again = await sign_in_with_code(server, who.email, codes[3])
    assert again.status_code == 400 and again.json()["error"] == "invalid_code"
    # The way back adds one phone (the owner was mailed at the sign-in, not again now).
    made = [await new_code(browser), await new_code(browser)]
    phone = await enroll(server, made[0])
    late = await enroll_request(server, made[1], ec.generate_private_key(ec.SECP256R1()))
    assert late.status_code == 400
    assert [d.id for d in await active_devices(server, who.email)] == [phone.device_id]
    # Nor can it mint itself new codes: that needs the phone.
    refused = await browser.post("/api/account/recovery-codes")
    assert refused.status_code == 403 and refused.json()["error"] == "not_allowed"
    assert "login.recovery_code" in await audit_kinds(server, who.email)
    await sign_in_on(server, who.email, phone)


async def test_a_recovery_code_with_the_lost_phone_still_enrolled_asks_to_revoke_it_first(
    world: World,
) -> None:
    server = world.server
    who = await owner(world)
    codes = await recovery_codes(await sign_in_on(server, who.email, who.phone))

    signed_in = await sign_in_with_code(server, who.email, codes[0])

    assert signed_in.status_code == 200, signed_in.text
    browser = server.browser(cookies=signed_in.cookies)
    refused = await browser.post("/api/devices/enrollments")
    assert refused.status_code == 403 and "revoke the one you lost" in refused.json()["message"]
    gone = await browser.delete(f"/api/devices/{who.phone.device_id}")
    assert gone.status_code == 200, gone.text
    await enroll(server, await new_code(browser))


async def test_a_new_set_of_recovery_codes_ends_the_old_one(world: World) -> None:
    server = world.server
    who = await owner(world)
    browser = await sign_in_on(server, who.email, who.phone)
    old = await recovery_codes(browser)
    new = await recovery_codes(browser)

    assert set(old).isdisjoint(new)
    stale = await sign_in_with_code(server, who.email, old[0])
    assert stale.status_code == 400 and stale.json()["error"] == "invalid_code"
    fresh = await sign_in_with_code(server, who.email, new[0])
    assert fresh.status_code == 200 and fresh.json()["recovery_codes_left"] == 9


async def test_recovery_codes_need_the_password_and_wrong_ones_are_limited(world: World) -> None:
    server = world.server
    who = await owner(world)
    codes = await recovery_codes(await sign_in_on(server, who.email, who.phone))
    browser = server.browser()
    wrong_password = await browser.post(
        "/api/login/recovery", json={"email": who.email, "password": "not it!!", "code": codes[0]}
    )
    assert wrong_password.status_code == 401 and wrong_password.json()["error"] == (
        "invalid_credentials"
    )

    wrong = [await sign_in_with_code(server, who.email, "abcde-fghjk") for _ in range(10)]
    assert {(w.status_code, w.json()["error"]) for w in wrong} == {(400, "invalid_code")}
    limited = await sign_in_with_code(server, who.email, codes[0])

    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    async with server.services.db() as db:
        user = (await db.exec(select(User).where(User.email == who.email))).one()
    left = await recovery_left(server, user.id)
    assert left == 10  # the right code was not spent while refused


async def recovery_left(server: LiveServer, user_id: str) -> int:
    from app.db.recovery_codes import codes_left

    async with server.services.db() as db:
        return await codes_left(db, user_id)


async def test_an_operator_issues_recovery_codes_printed_once(world: World, tmp_path: Path) -> None:
    server = world.server
    who = await owner(world)
    await revoke(server, who, "device")

    issued = await run_cli(server, tmp_path, "user", "recovery-codes", who.email.upper(), "--json")

    assert set(issued) == {"email", "codes", "created_at"} and issued["email"] == who.email
    assert len(issued["codes"]) == 10
    signed_in = await sign_in_with_code(server, who.email, issued["codes"][9])
    assert signed_in.status_code == 200, signed_in.text
    browser = server.browser(cookies=signed_in.cookies)
    await enroll(server, await new_code(browser))


async def run_cli(server: LiveServer, tmp_path: Path, *args: str) -> dict[str, Any]:
    """`tapprove ...` as an operator runs it against this deployment; its one JSON object."""
    settings = server.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPPROVE_")}
    env.update(
        TAPPROVE_DATA_DIR=str(tmp_path / "cli"),
        TAPPROVE_DATABASE_URL=str(settings.database_url),
        TAPPROVE_REDIS_URL=str(settings.redis_url),
        TAPPROVE_REDIS_PREFIX=settings.redis_prefix,
        TAPPROVE_PUBLIC_URL=server.url,
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()
    assert out.decode().count("\n") == 1, out
    found: dict[str, Any] = json.loads(out)
    return found


# --- one device per password-only session, checked at use ---------------------------------------


async def test_a_password_only_session_enrolls_one_phone_however_many_codes_it_made(
    world: World,
) -> None:
    server = world.server
    email = unique_email("greedy")
    await add_user(server, email)
    first = await first_sign_in(server, email)
    codes = [await new_code(first) for _ in range(3)]

    phone = await enroll(server, codes[0])
    later = [
        await enroll_request(server, code, ec.generate_private_key(ec.SECP256R1()))
        for code in codes[1:]
    ]

    assert [r.status_code for r in later] == [400, 400]
    assert {r.json()["error"] for r in later} == {"invalid_or_expired_code"}
    assert [d.id for d in await active_devices(server, email)] == [phone.device_id]


async def test_two_first_device_codes_used_at_once_give_one_phone(world: World) -> None:
    server = world.server
    for _ in range(5):
        email = unique_email("race")
        await add_user(server, email)
        first = await first_sign_in(server, email)
        codes = [await new_code(first), await new_code(first)]

        answers = await asyncio.gather(
            *(enroll_request(server, c, ec.generate_private_key(ec.SECP256R1())) for c in codes)
        )

        assert sorted(a.status_code for a in answers) == [201, 400], [a.text for a in answers]
        assert len(await active_devices(server, email)) == 1
