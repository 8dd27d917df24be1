"""Registration and email verification (PROTOCOL §1) through the real app, worker, Redis
Streams, PostgreSQL and SMTP server: the link, the page, single use, expiry, enumeration.
"""

from __future__ import annotations

import asyncio
import re
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlmodel import col, select

from app.core.clock import ManualClock
from app.core.tokens import hash_token
from app.db.accounts import create_user
from app.db.models import EmailToken, OutboxMessage, User
from app.verification import events_streams, publish
from tests.fixtures.hashing import Argon2Work, todays_parameters
from tests.fixtures.mail import MailApp, MailAppFactory, Received, SmtpServer

pytestmark = pytest.mark.timeout(90)

PASSWORD = "correct horse battery"
INVALID_TOKEN = {
    "error": "invalid_or_expired_token",
    "message": "this link is invalid, expired or used",
}


async def register(app: MailApp, email: str, password: str = PASSWORD, **kwargs: object) -> None:
    response = await app.client.post(
        "/api/register",
        json={"email": email, "password": password},
        **kwargs,  # type: ignore[arg-type]
    )
    assert response.status_code == 202, response.text
    assert response.json() == {"status": "verification_sent"}


async def forget_registration_limits(app: MailApp) -> None:
    """What an hour's wait does to the registration limits (per address and per IP)."""
    redis = app.services.redis
    async for key in redis.scan_iter(match=app.services.limits.key("register", "*")):
        await redis.delete(key)


def token_of(mail: Received) -> str:
    return parse_qs(urlsplit(mail.link()).query)["token"][0]


async def user(app: MailApp, email: str) -> User:
    async with app.services.db() as db:
        found = (await db.exec(select(User).where(User.email == email))).one()
        return found


async def tokens(app: MailApp) -> list[EmailToken]:
    async with app.services.db() as db:
        return list((await db.exec(select(EmailToken).order_by(col(EmailToken.created_at)))).all())


async def event_types(app: MailApp) -> list[str]:
    found = []
    for stream in events_streams(app.services):
        entries = await app.services.redis.xrange(stream.stream)
        found += [(entry_id, str(fields["type"])) for entry_id, fields in entries or []]  # type: ignore[index]
    return [kind for _id, kind in sorted(found)]


async def sent_row(app: MailApp) -> OutboxMessage:
    deadline = time.monotonic() + 10
    while True:
        async with app.services.db() as db:
            [row] = (await db.exec(select(OutboxMessage))).all()
        if row.status == "sent" or time.monotonic() > deadline:
            assert row.status == "sent", row
            return row
        await asyncio.sleep(0.05)


async def allow_next_mail_now(app: MailApp, email: str) -> None:
    """What a minute's wait does to the per-address cooldown (the day budget is left alone)."""
    await app.services.redis.delete(app.services.limits.key("mail", "60", hash_token(email)))


async def test_a_new_user_confirms_through_the_link_exactly_once(mail_app: MailApp) -> None:
    # The Host header is the attacker's choice; the link must ignore it.
    await register(mail_app, "Ada@Example.com", headers={"Host": "evil.example"})
    [mail] = await mail_app.smtp.wait_for(1)
    assert mail.recipients == ["ada@example.com"]
    assert mail.sender == "tapprove@example.test"
    assert mail.subject == "Confirm your email address"
    assert re.fullmatch(r"<[0-9a-f]{32}@tapprove>", mail.message_id)
    link = mail.link()
    assert link.startswith("https://mfa.example.test/verify-email?token=")
    assert "evil.example" not in mail.text and "evil.example" not in mail.part("html")
    token = token_of(mail)
    assert len(token) >= 43  # 256 bits, base64url
    assert f'href="{link}"' in mail.part("html")
    [stored] = await tokens(mail_app)
    assert stored.token_hash == hash_token(token)  # only the hash is kept
    row = await sent_row(mail_app)
    assert token not in row.payload  # scrubbed once sent

    # Opening the page (a mail scanner does this too) changes nothing.
    page = await mail_app.client.get(link.removeprefix("https://mfa.example.test"))
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "Confirm my email" in page.text
    assert f'value="{token}"' in page.text
    # No inline script (CSP is script-src 'self'): one module from /static, nothing else.
    assert re.findall(r"<script([^>]*)>(.*?)</script>", page.text, re.S) == [
        (' type="module" src="/static/verify-email.js"', "")
    ]
    assert not (await user(mail_app, "ada@example.com")).email_verified
    [still] = await tokens(mail_app)
    assert still.used_at is None

    confirmed = await mail_app.client.post("/api/verify-email", json={"token": token})
    assert confirmed.status_code == 200
    assert confirmed.json() == {"status": "verified"}
    assert "set-cookie" not in confirmed.headers  # verifying does not sign in
    verified = await user(mail_app, "ada@example.com")
    assert verified.email_verified and verified.verified_at is not None

    again = await mail_app.client.post("/api/verify-email", json={"token": token})
    assert again.status_code == 400
    assert again.json() == INVALID_TOKEN
    unknown = await mail_app.client.post("/api/verify-email", json={"token": "x" * 43})
    assert (unknown.status_code, unknown.json()) == (400, INVALID_TOKEN)
    assert await event_types(mail_app) == ["user.registered", "user.verified"]


async def test_the_embedded_default_database_runs_the_same_flow(
    mail_app_factory: MailAppFactory, fresh_sqlite_url: str
) -> None:
    app = await mail_app_factory(database_url=fresh_sqlite_url)
    await register(app, "ada@example.com")
    [mail] = await app.smtp.wait_for(1)
    token = token_of(mail)
    answers = await asyncio.gather(
        *(app.client.post("/api/verify-email", json={"token": token}) for _ in range(4))
    )
    assert sorted(a.status_code for a in answers) == [200, 400, 400, 400]
    assert (await user(app, "ada@example.com")).email_verified
    assert (await sent_row(app)).attempts == 1


async def test_the_page_without_a_token_says_the_link_is_incomplete(mail_app: MailApp) -> None:
    page = await mail_app.client.get("/verify-email")
    assert page.status_code == 200
    assert "incomplete" in page.text and "Confirm my email</button>" not in page.text
    hostile = await mail_app.client.get('/verify-email?token="><img src=x onerror=alert(1)>')
    assert "<img src=x" not in hostile.text and "&#34;&gt;&lt;img" in hostile.text


async def test_an_unverified_user_cannot_sign_in_until_confirmed(mail_app: MailApp) -> None:
    await register(mail_app, "ada@example.com")
    login = {"email": "ada@example.com", "password": PASSWORD}
    refused = await mail_app.client.post("/api/login", json=login)
    assert refused.status_code == 403 and refused.json()["error"] == "email_not_verified"
    wrong = await mail_app.client.post("/api/login", json={**login, "password": "wrong password"})
    assert wrong.status_code == 401  # the verification state shows only after a correct password

    [mail] = await mail_app.smtp.wait_for(1)
    await mail_app.client.post("/api/verify-email", json={"token": token_of(mail)})
    allowed = await mail_app.client.post("/api/login", json=login)
    assert allowed.status_code == 200, allowed.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-address", "password": PASSWORD}, "email"),
        ({"email": "ada@", "password": PASSWORD}, "email"),
        ({"email": "ada@example.com", "password": "short"}, "password"),
        ({"email": "ada@example.com", "password": "x" * 1025}, "password"),
        ({"email": "ada@example.com"}, "password"),
        ({"email": 42, "password": PASSWORD}, "email"),
    ],
)
async def test_registration_refuses_bad_input_with_422(
    mail_app: MailApp, body: dict[str, object], field: str
) -> None:
    response = await mail_app.client.post("/api/register", json=body)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"
    assert response.json()["message"].startswith(field)


async def test_passwords_of_8_to_1024_characters_of_any_kind_count_exactly_as_typed(
    mail_app: MailApp,
) -> None:
    """SECURITY.md: 8 to 1024 characters, no composition rules, verified exactly as received
    (no truncation, no case change, no trimming)."""
    longest = "ω 💩 " * 256  # 1024 characters, no ASCII letter or digit among them
    assert len(longest) == 1024
    for name, password, status in (
        ("seven", "x" * 7, 422),
        ("eight", "x" * 8, 202),
        ("longest", longest, 202),
        ("toolong", longest + "x", 422),
    ):
        response = await mail_app.client.post(
            "/api/register", json={"email": f"{name}@example.com", "password": password}
        )
        assert response.status_code == status, (name, response.text)
    mails = await mail_app.smtp.wait_for(2)
    [mail] = [m for m in mails if m.recipients == ["longest@example.com"]]
    confirmed = await mail_app.client.post("/api/verify-email", json={"token": token_of(mail)})
    assert confirmed.status_code == 200, confirmed.text
    for altered in (longest[:-1], longest.upper(), longest.strip(), longest[:72]):
        login = {"email": "longest@example.com", "password": altered}
        refused = await mail_app.client.post("/api/login", json=login)
        assert refused.status_code == 401, refused.text
    login = {"email": "longest@example.com", "password": longest}
    allowed = await mail_app.client.post("/api/login", json=login)
    assert allowed.json() == {"status": "enrollment_required"}, allowed.text


async def test_an_expired_link_is_refused_like_an_unknown_one(
    mail_app_factory: MailAppFactory,
) -> None:
    clock = ManualClock()
    app = await mail_app_factory(clock=clock, email_token_ttl=3600)
    await register(app, "ada@example.com")
    [mail] = await app.smtp.wait_for(1)
    clock.advance(3601)
    expired = await app.client.post("/api/verify-email", json={"token": token_of(mail)})
    assert (expired.status_code, expired.json()) == (400, INVALID_TOKEN)
    assert not (await user(app, "ada@example.com")).email_verified


async def test_a_newer_link_cancels_the_older_one(mail_app: MailApp) -> None:
    await register(mail_app, "ada@example.com")
    [first] = await mail_app.smtp.wait_for(1)
    await allow_next_mail_now(mail_app, "ada@example.com")
    resent = await mail_app.client.post(
        "/api/verify-email/resend", json={"email": "ada@example.com"}
    )
    assert (resent.status_code, resent.json()) == (202, {"status": "verification_sent"})
    second = (await mail_app.smtp.wait_for(2))[1]
    assert token_of(first) != token_of(second)

    old = await mail_app.client.post("/api/verify-email", json={"token": token_of(first)})
    assert (old.status_code, old.json()) == (400, INVALID_TOKEN)
    new = await mail_app.client.post("/api/verify-email", json={"token": token_of(second)})
    assert (new.status_code, new.json()) == (200, {"status": "verified"})
    assert (await user(mail_app, "ada@example.com")).email_verified


async def test_racing_confirmations_have_exactly_one_winner(mail_app: MailApp) -> None:
    await register(mail_app, "ada@example.com")
    [mail] = await mail_app.smtp.wait_for(1)
    token = token_of(mail)
    answers = await asyncio.gather(
        *(mail_app.client.post("/api/verify-email", json={"token": token}) for _ in range(8))
    )
    assert sorted(a.status_code for a in answers) == [200] + [400] * 7


async def test_a_taken_address_gets_the_same_answer_and_the_owner_a_notice(
    mail_app: MailApp,
) -> None:
    await register(mail_app, "ada@example.com")
    await mail_app.smtp.wait_for(1)
    await allow_next_mail_now(mail_app, "ada@example.com")

    taken = await mail_app.client.post(
        "/api/register", json={"email": "ADA@example.com", "password": "another password"}
    )
    fresh = await mail_app.client.post(
        "/api/register", json={"email": "bob@example.com", "password": "another password"}
    )
    assert (taken.status_code, taken.content) == (fresh.status_code, fresh.content)
    assert taken.headers.get("content-type") == fresh.headers.get("content-type")

    mails = await mail_app.smtp.wait_for(3)
    [notice] = [m for m in mails[1:] if m.recipients == ["ada@example.com"]]
    assert notice.subject == "You already have an account"
    assert "https://mfa.example.test/" in notice.text and "token" not in notice.text
    assert len(mail_app.smtp.to("bob@example.com")) == 1
    assert len(await tokens(mail_app)) == 2  # the notice carries no new token for ada
    # The first password still holds: registering again did not change the account.
    login = await mail_app.client.post(
        "/api/login", json={"email": "ada@example.com", "password": "another password"}
    )
    assert login.status_code == 401


async def test_a_taken_address_costs_the_same_argon2_work_as_a_new_one(
    mail_app: MailApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same time, shown structurally: registering a taken address hashes the password
    at today's full cost exactly as a new one does (a path that skipped the hash would
    answer twenty times faster). Wall times are measured by `python -m bench.enumeration`;
    compared here they flaked on a loaded machine."""
    await register(mail_app, "taken@example.com")
    work = Argon2Work(monkeypatch)
    for email in ("new@example.com", "taken@example.com", "TAKEN@example.com"):
        await register(mail_app, email)
        assert work.take() == [("hash", todays_parameters())], email


async def test_resend_is_limited_per_address_and_silent_about_it(mail_app: MailApp) -> None:
    await register(mail_app, "ada@example.com")  # mail 1 of the day
    await mail_app.smtp.wait_for(1)

    async def resend(email: str = "ada@example.com") -> None:
        response = await mail_app.client.post("/api/verify-email/resend", json={"email": email})
        assert (response.status_code, response.json()) == (202, {"status": "verification_sent"})

    await resend()  # within the minute: nothing
    await asyncio.sleep(1.0)
    assert len(mail_app.smtp.received) == 1

    for count in range(2, 11):  # minutes pass; up to 10 mails a day
        await allow_next_mail_now(mail_app, "ada@example.com")
        await resend()
        await mail_app.smtp.wait_for(count)
    await allow_next_mail_now(mail_app, "ada@example.com")
    await resend()  # the 11th of the day: nothing
    await asyncio.sleep(1.0)
    assert len(mail_app.smtp.received) == 10

    # Only the newest link works.
    newest = token_of(mail_app.smtp.received[-1])
    older = token_of(mail_app.smtp.received[-2])
    for token, status in ((older, 400), (newest, 200)):
        response = await mail_app.client.post("/api/verify-email", json={"token": token})
        assert response.status_code == status


async def test_resend_for_unknown_or_verified_addresses_sends_nothing(mail_app: MailApp) -> None:
    await register(mail_app, "ada@example.com")
    [mail] = await mail_app.smtp.wait_for(1)
    await mail_app.client.post("/api/verify-email", json={"token": token_of(mail)})
    await allow_next_mail_now(mail_app, "ada@example.com")
    for email in ("ada@example.com", "nobody@example.com", "not an address"):
        response = await mail_app.client.post("/api/verify-email/resend", json={"email": email})
        assert (response.status_code, response.json()) == (202, {"status": "verification_sent"})
    await asyncio.sleep(1.5)
    assert len(mail_app.smtp.received) == 1
    missing = await mail_app.client.post("/api/verify-email/resend", json={})
    assert missing.status_code == 422


async def test_resend_is_limited_per_ip(mail_app: MailApp) -> None:
    async with mail_app.services.db() as db:
        await create_user(db, "ada@example.com", password=PASSWORD, now=time.time())
        await db.commit()
    busy = mail_app.client_from("203.0.113.9")
    for i in range(30):  # an hour's budget for one IP, spent on other addresses
        await busy.post("/api/verify-email/resend", json={"email": f"x{i}@example.com"})
    limited = await busy.post("/api/verify-email/resend", json={"email": "ada@example.com"})
    # Silent: the same answer as a resend within the limits.
    assert (limited.status_code, limited.json()) == (202, {"status": "verification_sent"})
    await asyncio.sleep(1.5)
    assert mail_app.smtp.received == []

    other = mail_app.client_from("203.0.113.10")
    await other.post("/api/verify-email/resend", json={"email": "ada@example.com"})
    [mail] = await mail_app.smtp.wait_for(1)
    assert mail.recipients == ["ada@example.com"]


async def test_account_events_are_applied_idempotently(mail_app: MailApp) -> None:
    """A producer that only publishes events (an import, another service) still gets mail."""
    svc = mail_app.services
    async with svc.db() as db:
        imported = await create_user(db, "imp@example.com", password=PASSWORD, now=time.time())
        await db.commit()
    await publish(svc, "user.registered", user_id=imported.id, email=imported.email)
    await publish(svc, "user.registered", user_id=imported.id, email=imported.email)
    [mail] = await mail_app.smtp.wait_for(1)
    assert mail.recipients == ["imp@example.com"]

    await publish(svc, "user.verified", user_id=imported.id)
    await publish(svc, "user.verified", user_id=imported.id)

    async def verified() -> bool:
        return (await user(mail_app, "imp@example.com")).email_verified

    deadline = time.monotonic() + 10
    while not await verified():
        assert time.monotonic() < deadline, "user.verified was not applied"
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    assert len(mail_app.smtp.received) == 1  # the second user.registered changed nothing
    assert len(await tokens(mail_app)) == 1


async def test_a_registration_survives_smtp_being_down(
    mail_app_factory: MailAppFactory, smtp_server: SmtpServer
) -> None:
    app = await mail_app_factory()
    smtp_server.stop()
    await register(app, "ada@example.com")  # still 202: the request only queues
    smtp_server.start()
    async with app.services.db() as db:
        [row] = (await db.exec(select(OutboxMessage))).all()
    assert row.template == "verify_email" and row.status in {"queued", "processing"}
