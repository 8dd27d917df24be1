"""SECURITY.md, "Redis compromise": a copy of Redis gives no one a usable secret. Every secret
the service hands out is kept only as its SHA-256 hash: sessions, login bindings, trust
cookies, device tokens, enrollment codes, API keys, SMS codes, verification tokens. The
database is read too, once the mail has gone: the same holds there.

A whole account's life goes through the public routes of a real server (register and
verify, sign in with the password, enroll, sign in on the phone and remember the browser,
verify a phone number, sign in with an SMS code, a relying party's request, a remembered
sign-in), and every key and value under the server's Redis prefix is read at each step
(some secrets, like a pending SMS code, live only for a while). No plaintext secret may
appear in any of them.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import select as select_all
from sqlmodel import SQLModel, select

from app.core.tokens import hash_token
from app.db.accounts import create_api_key
from app.db.models import OutboxMessage
from tests.fakes import wait_until
from tests.fakes.twilio import FakeTwilio
from tests.fixtures.app import PASSWORD, LiveServer, ServerFactory
from tests.fixtures.mail import SmtpServer
from tests.integration.test_push_delivery import providers_for
from tests.security.harness import device_socket, next_frame, unique_email

pytestmark = pytest.mark.timeout(180)


async def redis_dump(server: LiveServer) -> bytes:
    """Every key under the server's prefix and everything in it, as one blob."""
    client = aioredis.Redis.from_url(server.settings.redis_url or "")
    parts: list[bytes] = []
    try:
        async for key in client.scan_iter(match=f"{server.settings.redis_prefix}*", count=1000):
            parts.append(key)
            kind = (await client.type(key)).decode()
            if kind == "string":
                parts.append(await client.get(key) or b"")
            elif kind == "hash":
                for field, value in (await client.hgetall(key)).items():
                    parts += [field, value]
            elif kind == "list":
                parts += await client.lrange(key, 0, -1)
            elif kind == "set":
                parts += list(await client.smembers(key))
            elif kind == "zset":
                parts += [m for m, _ in await client.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                for entry_id, fields in await client.xrange(key):
                    parts.append(entry_id)
                    for field, value in fields.items():
                        parts += [field, value]
            elif kind != "none":  # "none": it expired while we read
                raise AssertionError(f"a key of a type this test does not read: {kind} {key!r}")
    finally:
        await client.aclose()
    return b"\n".join(parts)


async def database_dump(server: LiveServer) -> bytes:
    """Every row of every table, as one blob."""
    parts: list[str] = []
    async with server.services.db() as db:
        connection = await db.connection()
        for table in SQLModel.metadata.sorted_tables:
            for row in (await connection.execute(select_all(table))).all():
                parts += [f"{table.name}: {value}" for value in row]
    return "\n".join(parts).encode()


def found_in(secret: str, dump: bytes) -> bool:
    """Whether `secret` appears in the dump as a token of its own (a six-digit code is
    expected to turn up inside longer numbers such as timestamps)."""
    pattern = rb"(?<![0-9A-Za-z_.-])" + re.escape(secret.encode()) + rb"(?![0-9A-Za-z_.-])"
    return re.search(pattern, dump) is not None


async def test_no_secret_is_kept_in_plaintext_in_redis_or_the_database(
    server_factory: ServerFactory,
    smtp_server: SmtpServer,
    twilio_env: dict[str, str],
    fake_twilio: FakeTwilio,
) -> None:
    server = await server_factory(
        providers=await providers_for(twilio_env), smtp_url=smtp_server.url
    )
    secrets: dict[str, str] = {}
    dumps: list[bytes] = []

    async def checkpoint() -> None:
        dumps.append(await redis_dump(server))

    def text(count: int) -> str:
        return fake_twilio.requests[count - 1].form["Body"]

    def code_in(body: str) -> str:
        found = re.search(r"\b(\d{6})\b", body)
        assert found, body
        return found.group(1)

    email = unique_email("atrest")
    browser = server.browser()
    # Register, and confirm with the mailed token.
    registered = await browser.post("/api/register", json={"email": email, "password": PASSWORD})
    assert registered.status_code == 202, registered.text
    [mail] = await smtp_server.wait_for(1)
    secrets["verification token"] = parse_qs(urlsplit(mail.link()).query)["token"][0]
    await checkpoint()
    confirmed = await browser.post(
        "/api/verify-email", json={"token": secrets["verification token"]}
    )
    assert confirmed.json() == {"status": "verified"}, confirmed.text

    # The password alone: a restricted session, which enrolls the first phone.
    first = await server.login(browser, email)
    assert first.json() == {"status": "enrollment_required"}, first.text
    secrets["restricted session cookie"] = browser.cookies["tapprove_session"]
    created = await browser.post("/api/devices/enrollments")
    assert created.status_code == 201, created.text
    secrets["enrollment code"] = created.json()["code"]
    await checkpoint()
    phone = await server.enroll_with_code(secrets["enrollment code"])
    secrets["device token"] = phone.token

    # A sign-in approved on the phone's socket, in a browser that asks to be remembered.
    ws = await device_socket(server, phone)
    remembered = server.browser()
    started = await server.login(remembered, email, remember_browser=True)
    assert started.status_code == 202, started.text
    secrets["login cookie"] = remembered.cookies["tapprove_login"]
    request = await next_frame(ws, "approval_request")
    await checkpoint()
    jws = phone.sign(request["approval"], number=started.json()["number"])
    await ws.send(json.dumps({"type": "decision", "jws": jws}))
    assert (await next_frame(ws, "decision_result"))["status"] == "approved"
    await ws.close()
    done = await remembered.post(f"/api/login/{started.json()['approval_id']}/complete")
    assert done.status_code == 200, done.text
    secrets["session cookie"] = remembered.cookies["tapprove_session"]
    secrets["trust cookie"] = remembered.cookies["tapprove_trust"]
    await checkpoint()

    # A phone number, verified with a texted code.
    sent = await remembered.post("/api/account/phone", json={"phone": "+14155552671"})
    assert sent.status_code == 202, sent.text
    await wait_until(lambda: len(fake_twilio.requests) >= 1, timeout=30)
    secrets["phone verification code"] = code_in(text(1))
    await checkpoint()
    verified = await remembered.post(
        "/api/account/phone/verify", json={"code": secrets["phone verification code"]}
    )
    assert verified.status_code == 200, verified.text

    # The phone is away and has no push: the sign-in code goes by SMS at once.
    elsewhere = server.browser()
    started = await server.login(elsewhere, email)
    assert started.status_code == 202 and started.json()["channels"] == ["sms"], started.text
    secrets["second login cookie"] = elsewhere.cookies["tapprove_login"]
    await wait_until(lambda: len(fake_twilio.requests) >= 2, timeout=30)
    secrets["sign-in SMS code"] = code_in(text(2))
    await checkpoint()
    by_code = await elsewhere.post(
        f"/api/login/{started.json()['approval_id']}/code",
        json={"code": secrets["sign-in SMS code"]},
    )
    assert by_code.json() == {"status": "approved"}, by_code.text
    done = await elsewhere.post(f"/api/login/{started.json()['approval_id']}/complete")
    assert done.status_code == 200, done.text
    secrets["SMS-approved session cookie"] = elsewhere.cookies["tapprove_session"]

    # A relying party's request, approved over HTTP.
    async with server.services.db() as db:
        _, secrets["API key"] = await create_api_key(db, "vpn", now=time.time())
        await db.commit()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as rp:
        rp_auth = {"Authorization": f"Bearer {secrets['API key']}"}
        asked = await rp.post("/api/v1/approvals", json={"user": email}, headers=rp_auth)
        assert asked.status_code == 201, asked.text
        approval_id = asked.json()["approval_id"]
        await checkpoint()
        viewed = await rp.get(f"/api/approvals/{approval_id}", headers=phone.auth)
        answer = await rp.post(
            f"/api/approvals/{approval_id}/decision",
            json={"jws": phone.sign(viewed.json(), number=asked.json()["number"])},
            headers=phone.auth,
        )
        assert answer.json() == {"status": "approved"}, answer.text
        final = await rp.get(f"/api/v1/approvals/{approval_id}", headers=rp_auth)
        assert final.json()["status"] == "approved"

    # The remembered browser signs in without the phone.
    again = await server.login(remembered, email)
    assert again.json() == {"status": "authenticated"}, again.text
    secrets["remembered session cookie"] = remembered.cookies["tapprove_session"]
    await server.audit_filed()
    await checkpoint()

    everything = b"\n".join(dumps)
    assert len(secrets) == 13
    leaked = [name for name, secret in secrets.items() if found_in(secret, everything)]
    assert not leaked, f"in Redis in plaintext: {leaked}"
    # The dumps are real: what the service keeps instead of the secrets is in them.
    assert hash_token(secrets["session cookie"]).encode() in everything
    assert hash_token(secrets["login cookie"]).encode() in everything

    # The database, once every mail is out (a queued mail holds its link until it is sent).
    async def outbox_settled() -> bool:
        async with server.services.db() as db:
            rows = (await db.exec(select(OutboxMessage))).all()
        return bool(rows) and all(row.status in ("sent", "dead") for row in rows)

    deadline = time.monotonic() + 30
    while not await outbox_settled():
        assert time.monotonic() < deadline, "the outbox did not settle"
        await asyncio.sleep(0.05)
    tables = await database_dump(server)
    leaked = [name for name, secret in secrets.items() if found_in(secret, tables)]
    assert not leaked, f"in the database in plaintext: {leaked}"
    assert hash_token(secrets["device token"]).encode() in tables
    assert hash_token(secrets["API key"]).encode() in tables
