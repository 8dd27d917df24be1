"""Every mail template, rendered with the payload its real caller builds and delivered through
a real SMTP server; a security notice that can never be sent is logged as an error.

The callers are the real ones: registration and enrollment through their routes, a fraud
report from a phone, and the notices module for the ways back after losing every phone. No
payload is written by hand, so a template that uses a field its caller does not pass (under
StrictUndefined) fails here instead of dead-lettering every notice in production.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import col, select

import app as app_package
from app.approval.model import ApprovalContext
from app.core.clock import ManualClock
from app.core.signatures import device_public_jwk
from app.db.accounts import create_enrollment_code, create_user
from app.db.models import OutboxMessage, User
from app.delivery import notices
from app.delivery.mail import TEMPLATES
from app.delivery.outbox import kick
from tests.fixtures.app import Phone
from tests.fixtures.mail import MailApp, MailAppFactory, Received, SmtpServer
from tests.security.harness import quick_hash

pytestmark = pytest.mark.timeout(90)

PASSWORD = "correct horse battery staple"
NUMBER = "+14155552671"
CLIENT_IP = "198.51.100.7"  # where mail_app's requests come from
PHONE_APP = "Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8 Build/AP1A.240305.019)"
CHROME = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
TEMPLATE_DIR = Path(app_package.__file__).parent / "templates" / "mail"


async def add_user(app: MailApp, email: str, *, phone: str | None = None) -> User:
    async with app.services.db() as db:
        user = await create_user(
            db,
            email,
            password_hash=quick_hash(PASSWORD),
            verified=True,
            phone=phone,
            phone_verified=phone is not None,
            now=time.time(),
        )
        await db.commit()
        return user


async def enroll_over_http(app: MailApp, user: User) -> Phone:
    """A phone app enrolls with an operator's code through `POST /api/devices`."""
    async with app.services.db() as db:
        code, _ = await create_enrollment_code(db, user.id, now=app.services.clock.now())
        await db.commit()
    key = ec.generate_private_key(ec.SECP256R1())
    enrolled = await app.client.post(
        "/api/devices",
        json={
            "code": code,
            "name": "Pixel <8>",
            "platform": "android",
            "public_key": device_public_jwk(key.public_key()),
        },
        headers={"User-Agent": PHONE_APP},
    )
    assert enrolled.status_code == 201, enrolled.text
    body = enrolled.json()
    return Phone(body["device_id"], body["device_token"], key)


async def report_fraud(app: MailApp, email: str, phone: Phone) -> None:
    """A sign-in from a browser, denied on the phone as fraud."""
    browser = app.client_from(CLIENT_IP)
    browser.headers.update({"Origin": app.settings.public_url, "User-Agent": CHROME})
    started = await browser.post("/api/login", json={"email": email, "password": PASSWORD})
    assert started.status_code == 202, started.text
    approval_id = started.json()["approval_id"]
    seen = await app.client.get(f"/api/approvals/{approval_id}", headers=phone.auth)
    assert seen.status_code == 200, seen.text
    jws = phone.sign(seen.json(), decision="deny", reason="fraud")
    denied = await app.client.post(
        f"/api/approvals/{approval_id}/decision", json={"jws": jws}, headers=phone.auth
    )
    assert denied.status_code == 200 and denied.json() == {"status": "denied"}, denied.text


async def settled_rows(app: MailApp, count: int) -> list[OutboxMessage]:
    """The outbox rows once `count` of them exist and none is still queued or processing."""
    deadline = time.monotonic() + 30
    while True:
        async with app.services.db() as db:
            found = list(
                (await db.exec(select(OutboxMessage).order_by(col(OutboxMessage.created_at)))).all()
            )
        if len(found) >= count and all(r.status in ("sent", "dead") for r in found):
            return found
        assert time.monotonic() < deadline, [(r.template, r.status) for r in found]
        await asyncio.sleep(0.05)


def one_line(text: str) -> str:
    return " ".join(text.split())


def by_subject(mails: list[Received], subject: str) -> list[Received]:
    return [m for m in mails if m.subject == subject]


async def test_every_template_is_rendered_from_its_callers_payload_and_delivered(
    mail_app: MailApp, smtp_server: SmtpServer
) -> None:
    app = mail_app
    svc = app.services
    # Registration: a new address gets the link, a taken one the "you already have an
    # account" notice (through the route: one argon2 hash each, nothing hand-built).
    fresh = await app.client.post(
        "/api/register", json={"email": "new@example.com", "password": PASSWORD}
    )
    assert fresh.status_code == 202, fresh.text
    ada = await add_user(app, "ada@example.com", phone=NUMBER)
    taken = await app.client.post(
        "/api/register", json={"email": "ada@example.com", "password": "another password"}
    )
    assert taken.status_code == 202, taken.text
    # A phone enrolls, then reports a sign-in as fraud.
    phone = await enroll_over_http(app, ada)
    await report_fraud(app, "ada@example.com", phone)
    # The ways back after losing every phone, queued as their callers queue them.
    now = svc.clock.now()
    async with svc.db() as db:
        user = await db.get(User, ada.id)
        assert user is not None
        browser = ApprovalContext(ip=CLIENT_IP, user_agent=CHROME, browser="Chrome 131", os="Linux")
        queued = [
            notices.account_recovery(
                svc.settings, db, user, method="sms", context=browser, now=now
            ),
            notices.account_recovery(
                svc.settings, db, user, method="operator", revoked_devices=2, now=now
            ),
        ]
        await db.commit()
    for message in queued:
        await kick(svc, message.id)

    rows = await settled_rows(app, 6)

    assert [(r.template, r.status, r.last_error) for r in rows if r.status != "sent"] == []
    # Every template there is was sent at least once; a new one must join this test.
    on_disk = {p.stem for p in TEMPLATE_DIR.glob("*.subject")}
    assert {r.template for r in rows} == on_disk == set(TEMPLATES)
    mails = await smtp_server.wait_for(len(rows))
    assert len(mails) == len(rows)
    for mail in mails:
        assert mail.text.strip() and "https://mfa.example.test/" in mail.text
        assert "https://mfa.example.test/" in mail.part("html")

    [verify] = by_subject(mails, "Confirm your email address")
    assert verify.recipients == ["new@example.com"]
    assert "https://mfa.example.test/verify-email?token=" in verify.text
    [exists] = by_subject(mails, "You already have an account")
    assert exists.recipients == ["ada@example.com"] and "https://mfa.example.test/" in exists.text
    [added] = by_subject(mails, "A new device was added to your account")
    text = one_line(added.text)
    assert f"From IP: {CLIENT_IP}" in text and "App: Android 14 on Android" in text, added.text
    assert "Name: Pixel <8>" in text and "Pixel &lt;8&gt;" in added.part("html")
    assert CLIENT_IP in added.part("html") and "Android 14 on Android" in added.part("html")
    [fraud] = by_subject(mails, "Suspicious sign-in reported on your account")
    assert f"From IP: {CLIENT_IP}" in one_line(fraud.text)
    assert "Chrome 131 on Linux" in fraud.text
    [by_sms] = by_subject(mails, "A phone is being added after a sign-in with an SMS code")
    assert "ending in 71" in one_line(by_sms.text) and "Chrome 131 on Linux" in by_sms.text
    assert f"From IP: {CLIENT_IP}" in one_line(by_sms.text)
    [reset] = by_subject(mails, "The phones on your account were reset")
    assert "removed the 2 device(s)" in one_line(reset.text)
    assert "removed the 2 device(s)" in one_line(reset.part("html"))


async def test_a_security_notice_that_can_never_be_sent_is_logged_as_an_error(
    mail_app: MailApp, smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.delivery.outbox")
    smtp_server.fail("rcpt", "550 5.1.1 No such mailbox", times=None)
    ada = await add_user(mail_app, "ada@example.com")
    await enroll_over_http(mail_app, ada)
    registered = await mail_app.client.post(
        "/api/register", json={"email": "new@example.com", "password": PASSWORD}
    )
    assert registered.status_code == 202

    rows = await settled_rows(mail_app, 2)

    assert {(r.template, r.status) for r in rows} == {
        ("device_added", "dead"),
        ("verify_email", "dead"),
    }
    levels: dict[str, int] = {}
    for row in rows:
        lines = [r for r in caplog.records if row.id in r.getMessage()]
        assert lines, f"nothing logged about {row.template}"
        levels[row.template] = max(r.levelno for r in lines)
    # The owner was not told a device joined their account: an operator must hear of it.
    assert levels == {"device_added": logging.ERROR, "verify_email": logging.WARNING}
    assert smtp_server.received == []


async def test_a_security_notice_that_expires_unsent_is_logged_as_an_error(
    mail_app_factory: MailAppFactory, smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.delivery.outbox")
    clock = ManualClock()
    app = await mail_app_factory(clock=clock)
    smtp_server.stop()
    await enroll_over_http(app, await add_user(app, "ada@example.com"))
    queued = await settled_or_queued(app, attempts=1)

    clock.advance(notices.NOTICE_TTL + 1)  # the sweeper ends it; no retry is due before

    [row] = await settled_rows(app, 1)
    assert (row.id, row.status, row.last_error) == (
        queued.id,
        "dead",
        "expired before it could be sent",
    )
    lines = [r for r in caplog.records if row.id in r.getMessage() and "dead" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.ERROR]


async def settled_or_queued(app: MailApp, *, attempts: int) -> OutboxMessage:
    """The only outbox row, once it has been tried `attempts` times and is queued again."""
    deadline = time.monotonic() + 30
    while True:
        async with app.services.db() as db:
            found = list((await db.exec(select(OutboxMessage))).all())
        if len(found) == 1 and found[0].status == "queued" and found[0].attempts == attempts:
            return found[0]
        assert time.monotonic() < deadline, [(r.template, r.status, r.attempts) for r in found]
        await asyncio.sleep(0.05)


def test_the_template_list_and_the_files_agree() -> None:
    for name in TEMPLATES:
        for part in ("subject", "txt", "html"):
            assert (TEMPLATE_DIR / f"{name}.{part}").is_file(), f"{name}.{part} is missing"
