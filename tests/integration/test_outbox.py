"""The outbox through real Redis Streams, PostgreSQL and an SMTP server that misbehaves on cue:
retries with backoff, permanent failures, expiry, a lost stream, a worker killed mid-send.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from sqlmodel import col, select

from app.core.clock import ManualClock
from app.db.models import OutboxMessage
from app.delivery.mail import Mail, MailError, build_mailer, message_id_for
from app.delivery.outbox import (
    OutboxPolicy,
    OutboxWorker,
    enqueue,
    kick,
    outbox_stream,
    outbox_streams,
)
from tests.fixtures.mail import MailApp, MailAppFactory, SmtpServer

pytestmark = pytest.mark.timeout(90)

PASSWORD = "correct horse battery"
# Past the retry cap (600 s): whatever the jitter drew, the next attempt is due.
PAST_ANY_BACKOFF = 601


async def rows(app: MailApp) -> list[OutboxMessage]:
    async with app.services.db() as db:
        found = await db.exec(select(OutboxMessage).order_by(col(OutboxMessage.created_at)))
        return list(found.all())


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def row_where(app: MailApp, **expected: object) -> OutboxMessage:
    """Wait until the only outbox row has the expected fields, and return it."""
    found: list[OutboxMessage] = []

    async def check() -> bool:
        nonlocal found
        found = await rows(app)
        return len(found) == 1 and all(getattr(found[0], k) == v for k, v in expected.items())

    try:
        await eventually(check)
    except AssertionError:
        raise AssertionError(f"expected one row with {expected}, got {found}") from None
    return found[0]


async def register(app: MailApp, email: str = "ada@example.com") -> None:
    response = await app.client.post("/api/register", json={"email": email, "password": PASSWORD})
    assert response.status_code == 202, response.text


async def test_mail_is_delivered_after_the_smtp_server_comes_back(
    mail_app_factory: MailAppFactory, smtp_server: SmtpServer
) -> None:
    clock = ManualClock()
    app = await mail_app_factory(clock=clock)
    smtp_server.stop()

    await register(app)
    first = await row_where(app, status="queued", attempts=1)
    assert first.last_error and "ConnectError" in first.last_error
    assert first.next_attempt_at > first.created_at  # backing off, not hammering

    clock.advance(PAST_ANY_BACKOFF)
    await row_where(app, status="queued", attempts=2)

    smtp_server.start()
    clock.advance(PAST_ANY_BACKOFF)
    sent = await row_where(app, status="sent", attempts=3)
    assert sent.payload == "{}"  # the link's token does not outlive the send in SQL
    [mail] = await smtp_server.wait_for(1)
    assert mail.recipients == ["ada@example.com"]
    assert mail.message_id == message_id_for(sent.id)


async def test_a_4xx_answer_is_retried_until_the_server_accepts(
    mail_app_factory: MailAppFactory, smtp_server: SmtpServer
) -> None:
    clock = ManualClock()
    app = await mail_app_factory(clock=clock)
    smtp_server.fail("data", "451 4.3.0 Mailbox busy, try again later", times=2)

    await register(app)
    failed = await row_where(app, status="queued", attempts=1)
    assert failed.last_error is not None and failed.last_error.startswith("451")
    clock.advance(PAST_ANY_BACKOFF)
    await row_where(app, status="queued", attempts=2)
    clock.advance(PAST_ANY_BACKOFF)
    await row_where(app, status="sent", attempts=3)
    assert len(await smtp_server.wait_for(1)) == 1
    assert smtp_server.attempts == 3


async def test_a_5xx_answer_is_permanent_and_never_retried(
    mail_app_factory: MailAppFactory, smtp_server: SmtpServer
) -> None:
    clock = ManualClock()
    app = await mail_app_factory(clock=clock)
    smtp_server.fail("rcpt", "550 5.1.1 No such user here", times=None)

    await register(app)
    dead = await row_where(app, status="dead", attempts=1)
    assert dead.last_error is not None and "550" in dead.last_error
    assert dead.payload == "{}"

    smtp_server.heal()
    for _ in range(3):
        clock.advance(PAST_ANY_BACKOFF)
        await asyncio.sleep(1.2)  # more than one dispatcher tick
    await row_where(app, status="dead", attempts=1)
    assert smtp_server.received == []


async def test_a_5xx_after_data_is_permanent_too(
    mail_app_factory: MailAppFactory, smtp_server: SmtpServer
) -> None:
    app = await mail_app_factory()
    smtp_server.fail("data", "554 5.6.0 Message rejected as spam")
    await register(app)
    dead = await row_where(app, status="dead", attempts=1)
    assert dead.last_error is not None and dead.last_error.startswith("554")


async def test_nothing_is_sent_after_the_message_expires(
    mail_app_factory: MailAppFactory, smtp_server: SmtpServer
) -> None:
    clock = ManualClock()
    # The verification mail lives as long as its token: 60 s here.
    app = await mail_app_factory(clock=clock, email_token_ttl=60)
    smtp_server.stop()

    await register(app)
    await row_where(app, status="queued", attempts=1)
    clock.advance(61)
    dead = await row_where(app, status="dead")
    assert dead.last_error is not None and "expire" in dead.last_error

    smtp_server.start()
    clock.advance(PAST_ANY_BACKOFF)
    await asyncio.sleep(1.5)
    assert smtp_server.received == []
    await row_where(app, status="dead", attempts=1)


class SlowThenBusyServer:
    """A stand-in SMTP server (the Mailer seam) that takes long, then answers 4xx."""

    def __init__(self, clock: ManualClock, takes: float) -> None:
        self.clock = clock
        self.takes = takes
        self.calls = 0

    async def send(self, mail: Mail, *, now: float) -> None:
        self.calls += 1
        self.clock.advance(self.takes)
        raise MailError("421 4.7.0 Try again later", permanent=False)


async def new_message(app: MailApp, ttl: float) -> OutboxMessage:
    async with app.services.db() as db:
        message = enqueue(
            db,
            channel="email",
            recipient="bob@example.com",
            template="account_exists",
            payload={},
            user_id=None,
            now=app.services.clock.now(),
            ttl=ttl,
        )
        await db.commit()
    return message


async def test_a_message_whose_next_retry_would_be_too_late_ends_dead_at_once(
    mail_app_factory: MailAppFactory,
) -> None:
    clock = ManualClock()
    app = await mail_app_factory(clock=clock, run_worker=False)
    message = await new_message(app, ttl=10)
    # The attempt ends 11 s later: past expiry, so no retry can come in time.
    server = SlowThenBusyServer(clock, takes=11)
    worker = OutboxWorker(app.services, server, OutboxPolicy())
    assert await worker.process(message.id, 0) == "dead"
    [row] = await rows(app)
    assert row.status == "dead" and row.attempts == 1
    assert row.last_error == "would expire before a retry: 421 4.7.0 Try again later"
    assert await worker.process(message.id, 0) is None
    assert await worker.tick() == 0
    assert server.calls == 1


async def test_after_the_last_attempt_a_message_is_dead(
    mail_app_factory: MailAppFactory,
) -> None:
    clock = ManualClock()
    app = await mail_app_factory(clock=clock, run_worker=False)
    message = await new_message(app, ttl=86_400)
    server = SlowThenBusyServer(clock, takes=0)
    worker = OutboxWorker(app.services, server, OutboxPolicy(max_attempts=3))
    for attempt in range(3):
        clock.advance(PAST_ANY_BACKOFF)
        assert await worker.tick() == 1  # due: published
        outcome = await worker.process(message.id, attempt)
        assert outcome == ("retry" if attempt < 2 else "dead")
    [row] = await rows(app)
    assert (row.status, row.attempts) == ("dead", 3)
    assert row.last_error == "no attempts left: 421 4.7.0 Try again later"
    clock.advance(PAST_ANY_BACKOFF)
    assert await worker.tick() == 0


async def test_a_lost_stream_entry_is_published_again_from_sql(
    mail_app_factory: MailAppFactory, smtp_server: SmtpServer
) -> None:
    """Redis restarted between queueing and sending: the stream is gone, SQL still knows."""
    clock = ManualClock()
    web = await mail_app_factory(clock=clock, run_worker=False)
    await register(web)
    # A dispatcher pass publishes the row (and trusts that entry for one lease)...
    dispatcher = OutboxWorker(web.services, build_mailer(web.settings), OutboxPolicy())
    assert await dispatcher.tick() == 1
    # ...then Redis loses the stream, entries, group and all.
    for stream in outbox_streams(web.services):
        await web.services.redis.delete(stream.stream)

    worker = await mail_app_factory(clock=clock, run_worker=True)
    await asyncio.sleep(1.5)
    assert smtp_server.received == []  # nothing to read: the entry is gone
    await row_where(worker, status="queued", attempts=0)

    clock.advance(OutboxPolicy().lease)  # the publication lease ends: presumed lost
    sent = await row_where(worker, status="sent", attempts=1)
    [mail] = await smtp_server.wait_for(1)
    assert mail.message_id == message_id_for(sent.id)


async def test_duplicate_and_racing_entries_send_one_mail(
    mail_app_factory: MailAppFactory, smtp_server: SmtpServer
) -> None:
    app = await mail_app_factory(run_worker=False)
    svc = app.services
    message = await new_message(app, ttl=3600)
    mailer = build_mailer(app.settings)
    workers = [OutboxWorker(svc, mailer, OutboxPolicy()) for _ in range(4)]
    outcomes = await asyncio.gather(*(w.process(message.id, 0) for w in workers))
    assert outcomes.count("sent") == 1 and outcomes.count(None) == 3
    # A stale entry for an attempt already made is ignored.
    assert await workers[0].process(message.id, 0) is None
    assert len(await smtp_server.wait_for(1)) == 1
    await asyncio.sleep(0.3)
    assert len(smtp_server.received) == 1


async def test_without_smtp_the_mail_goes_to_the_log(
    mail_app_factory: MailAppFactory, smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.delivery.mail")
    app = await mail_app_factory(smtp_url=None)
    await register(app)
    await row_where(app, status="sent", attempts=1)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "app.delivery.mail")
    assert "ada@example.com" in logged
    assert "https://mfa.example.test/verify-email?token=" in logged
    assert smtp_server.received == []


# -- a real `tapprove worker` process, killed mid-send --------------------------------------


def start_worker(app: MailApp, log_file: Path) -> subprocess.Popen[bytes]:
    settings = app.settings
    env = {
        **os.environ,
        "TAPPROVE_REDIS_URL": str(settings.redis_url),
        "TAPPROVE_REDIS_PREFIX": settings.redis_prefix,
        "TAPPROVE_DATABASE_URL": str(settings.database_url),
        "TAPPROVE_SMTP_URL": str(settings.smtp_url),
        "TAPPROVE_PUBLIC_URL": settings.public_url,
        "TAPPROVE_DATA_DIR": str(settings.data_dir),
        "TAPPROVE_OUTBOX_LEASE": "6",
        "TAPPROVE_LOG_FORMAT": "console",
    }
    tapprove = Path(sys.executable).with_name("tapprove")
    with log_file.open("ab") as log:
        return subprocess.Popen([str(tapprove), "worker"], env=env, stdout=log, stderr=log)


@pytest.mark.slow
async def test_a_worker_killed_mid_send_loses_nothing(
    mail_app_factory: MailAppFactory, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    web = await mail_app_factory(run_worker=False)
    log_file = tmp_path / "worker.log"
    smtp_server.stall()
    await register(web)

    first = start_worker(web, log_file)
    try:
        # The worker has sent the whole message and waits for the server's "250".
        await eventually(lambda: _true(smtp_server.stalled.is_set()), timeout=20)
        await row_where(web, status="processing", attempts=1)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    await eventually(lambda: _true(len(smtp_server.abandoned) == 1))
    smtp_server.release()

    second = start_worker(web, log_file)
    try:
        # After the dead worker's lease (6 s) the row is re-queued and sent by the new worker.
        sent = await row_where(web, status="sent", attempts=2)
        [mail] = await smtp_server.wait_for(1, timeout=20)
        # Same Message-ID as the attempt that died: a receiver can recognise the resend.
        assert mail.message_id == smtp_server.abandoned[0].message_id == message_id_for(sent.id)
        assert len(await rows(web)) == 1

        # The dead consumer's pending entry is reclaimed (XAUTOCLAIM) and acknowledged.
        group = outbox_stream(web.services, sent.id)

        async def nothing_pending() -> bool:
            summary = await web.services.redis.xpending(group.stream, "senders")
            return int(summary["pending"]) == 0

        await eventually(nothing_pending, timeout=15)
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=15)
        except subprocess.TimeoutExpired:
            second.kill()
    assert second.returncode == 0, log_file.read_text()[-3000:]
    await asyncio.sleep(0.5)
    assert len(smtp_server.received) == 1


async def _true(value: bool) -> bool:
    return value


# -- the security notices other parts of the service send -------------------------------------


async def test_device_added_and_fraud_notices_render_safely(
    mail_app_factory: MailAppFactory, smtp_server: SmtpServer
) -> None:
    app = await mail_app_factory()
    svc = app.services
    notices = [
        (
            "device_added",
            {
                "device_name": "<b>Pixel</b>\nFrom: admin",
                "platform": "android",
                "at": "2026-11-22T10:00:00Z",
                "ip": "203.0.113.5",
                "browser": "okhttp 4",
                "os": "Android",
            },
        ),
        (
            "fraud_reported",
            {
                "at": "2026-11-22T10:00:00Z",
                "ip": "198.51.100.1",
                "browser": "Firefox 133",
                "os": "Linux",
            },
        ),
        ("device_added", {"platform": "ios"}),  # a caller's bug: a field is missing
    ]
    async with svc.db() as db:
        messages = [
            enqueue(
                db,
                channel="email",
                recipient="ada@example.com",
                template=template,
                payload=payload,
                user_id=None,
                now=svc.clock.now(),
                ttl=86_400,
            )
            for template, payload in notices
        ]
        await db.commit()
    for message in messages:
        await kick(svc, message.id)

    mails = {m.subject: m for m in await smtp_server.wait_for(2)}
    added = mails["A new device was added to your account"]
    assert "Not you? Revoke it" in added.text
    assert "https://mfa.example.test/account" in added.text
    assert "Name:      <b>Pixel</b> From: admin\r\n" in added.text  # one line, as given
    assert "&lt;b&gt;Pixel&lt;/b&gt;" in added.part("html") and "<b>Pixel" not in added.part("html")
    fraud = mails["Suspicious sign-in reported on your account"]
    assert "198.51.100.1" in fraud.text and "Firefox 133 on Linux" in fraud.text

    async def settled() -> bool:
        return {r.status for r in await rows(app)} == {"sent", "dead"}

    await eventually(settled)
    broken = next(r for r in await rows(app) if r.id == messages[2].id)
    assert broken.status == "dead" and broken.attempts == 1
    assert broken.last_error is not None and "device_name" in broken.last_error
