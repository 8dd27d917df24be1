"""Email verification: single-use tokens, their mails, and the account events on the broker.

The database transaction that creates a user also creates the token and queues the mail
(outbox), so nothing is lost between them. Events on the broker stream (`P events`) tell the
rest of the system what happened, and their consumer applies each one idempotently:

- `user.registered` {user_id, email}: make sure an unverified user has a live token and mail;
- `user.verified` {user_id}: make sure the user is marked verified;
- `verification.requested` {email, at}: a resend; issue a fresh token and mail.

See docs/email.md for why the request already does what the first two consumers check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.core.clock import rfc3339, to_datetime
from app.core.tokens import hash_token, new_token
from app.db import accounts
from app.db.models import EmailToken, OutboxMessage, User
from app.delivery import outbox
from app.services import Services
from app.settings import Settings
from app.store.streams import Entry, StreamGroup, route, spread

log = logging.getLogger(__name__)

EVENTS_GROUP = "accounts"
TOKEN_BYTES = 32
# How long the "you already have an account" notice may wait for a working mail server.
NOTICE_TTL = 86_400.0


def events_streams(svc: Services) -> list[StreamGroup]:
    """The broker streams of account events (one per shard), read by the `accounts`
    consumer group."""
    return spread(svc.redis, svc.keys, "events", EVENTS_GROUP, svc.process_id)


def events_stream(svc: Services, about: str) -> StreamGroup:
    """The stream an event about `about` (a user id, else an address) goes to: one
    person's events stay in order on one stream."""
    return route(events_streams(svc), about)


async def publish(svc: Services, kind: str, **fields: str) -> None:
    """Put an event on the broker stream, after the change it reports was committed.

    Best effort: the committed rows are the truth, so a lost event costs no mail and no state.
    """
    try:
        about = fields.get("user_id") or fields.get("email") or kind
        await events_stream(svc, about).add({"type": kind, "at": repr(svc.clock.now()), **fields})
    except (RedisConnectionError, RedisTimeoutError, OSError):
        log.warning("could not publish %s; the database already holds its effect", kind)


async def issue_verification(
    session: AsyncSession, user: User, *, settings: Settings, now: float
) -> OutboxMessage:
    """Cancel the user's live tokens and queued links, create a new token, queue its mail."""
    at = to_datetime(now)
    await session.exec(
        update(EmailToken)
        .where(
            col(EmailToken.user_id) == user.id,
            col(EmailToken.used_at).is_(None),
            col(EmailToken.cancelled_at).is_(None),
        )
        .values(cancelled_at=at)
    )
    # A queued mail would now carry a dead link; only the newest is worth sending.
    await session.exec(
        update(OutboxMessage)
        .where(
            col(OutboxMessage.user_id) == user.id,
            col(OutboxMessage.template) == "verify_email",
            col(OutboxMessage.status) == "queued",
        )
        .values(status="dead", last_error="superseded by a newer token", payload="{}")
    )
    token = new_token(TOKEN_BYTES)
    ttl = settings.email_token_ttl
    session.add(
        EmailToken(
            token_hash=hash_token(token),
            user_id=user.id,
            email=user.email,
            created_at=at,
            expires_at=to_datetime(now + ttl),
        )
    )
    # The link is useless once the token expires, so the mail expires with it.
    return outbox.enqueue(
        session,
        channel="email",
        recipient=user.email,
        template="verify_email",
        payload={"token": token, "expires_at": rfc3339(now + ttl)},
        user_id=user.id,
        now=now,
        ttl=ttl,
    )


def notify_existing_account(session: AsyncSession, user: User, *, now: float) -> OutboxMessage:
    """Queue the "you already have an account" notice for a registration of a taken address."""
    return outbox.enqueue(
        session,
        channel="email",
        recipient=user.email,
        template="account_exists",
        payload={},
        user_id=user.id,
        now=now,
        ttl=NOTICE_TTL,
    )


async def confirm(session: AsyncSession, token: str, *, now: float) -> EmailToken | None:
    """Use a token once: the live token it names, now spent, or None (unknown/used/expired).

    One conditional UPDATE decides, so of two racing confirmations exactly one wins. The
    user is marked verified in the same transaction, so the 200 answer already holds.
    """
    at = to_datetime(now)
    token_hash = hash_token(token)
    spent = await session.exec(
        update(EmailToken)
        .where(
            col(EmailToken.token_hash) == token_hash,
            col(EmailToken.used_at).is_(None),
            col(EmailToken.cancelled_at).is_(None),
            col(EmailToken.expires_at) > at,
        )
        .values(used_at=at)
    )
    if spent.rowcount != 1:
        return None
    row = await session.get(EmailToken, token_hash)
    assert row is not None
    await mark_verified(session, row.user_id, email=row.email, now=now)
    return row


async def mark_verified(
    session: AsyncSession, user_id: str, *, email: str | None = None, now: float
) -> bool:
    """Mark the user verified unless already; False when nothing changed (idempotent)."""
    conditions = [col(User.id) == user_id, col(User.email_verified).is_(False)]
    if email is not None:
        # The token proves this address, not whatever the account holds now.
        conditions.append(col(User.email) == email)
    changed = await session.exec(
        update(User).where(*conditions).values(email_verified=True, verified_at=to_datetime(now))
    )
    return changed.rowcount == 1


async def _has_token_since(session: AsyncSession, user_id: str, since: datetime) -> bool:
    found = await session.exec(
        select(EmailToken.token_hash)
        .where(col(EmailToken.user_id) == user_id, col(EmailToken.created_at) >= since)
        .limit(1)
    )
    return found.first() is not None


async def _has_live_token(session: AsyncSession, user_id: str, at: datetime) -> bool:
    found = await session.exec(
        select(EmailToken.token_hash)
        .where(
            col(EmailToken.user_id) == user_id,
            col(EmailToken.used_at).is_(None),
            col(EmailToken.cancelled_at).is_(None),
            col(EmailToken.expires_at) > at,
        )
        .limit(1)
    )
    return found.first() is not None


async def handle_event(svc: Services, fields: dict[str, str]) -> None:
    """Apply one account event; applying it twice changes nothing more."""
    kind = fields.get("type")
    now = svc.clock.now()
    message: OutboxMessage | None = None
    async with svc.db.begin() as session:
        if kind == "user.verified":
            if await mark_verified(session, fields["user_id"], now=now):
                log.info("user %s marked verified by event", fields["user_id"])
            return
        if kind == "user.registered":
            user = await accounts.get_user(session, fields["user_id"])
            if user is None or user.email_verified:
                return
            if await _has_live_token(session, user.id, to_datetime(now)):
                return
        elif kind == "verification.requested":
            user = await accounts.get_user_by_email(session, fields["email"])
            if user is None or user.email_verified:
                return
            # A replayed request finds the token it already produced.
            if await _has_token_since(session, user.id, to_datetime(float(fields["at"]))):
                return
        else:
            return  # an event for other consumers
        message = await issue_verification(session, user, settings=svc.settings, now=now)
    await outbox.kick(svc, message.id)


async def run_user_events(svc: Services, stop: asyncio.Event) -> None:
    """Consume account events from every shard's stream with the `accounts` group until
    `stop` is set."""
    await asyncio.gather(*(_consume_events(svc, group, stop) for group in events_streams(svc)))


async def _consume_events(svc: Services, group: StreamGroup, stop: asyncio.Event) -> None:
    last_reclaim = 0.0
    ready = False
    while not stop.is_set():
        try:
            if not ready:
                await group.ensure()
                ready = True
            entries: list[Entry] = []
            if time.monotonic() - last_reclaim > 30:
                last_reclaim = time.monotonic()
                entries = await group.reclaim(min_idle_ms=60_000, count=100)
                await group.forget_idle_consumers()
            entries += await group.read(count=100, block_ms=1000)
            for _entry_id, fields in entries:
                try:
                    await handle_event(svc, fields)
                except (KeyError, ValueError):
                    log.warning("dropping a malformed account event %r", fields)
            await group.ack(entries)
        except outbox.TRANSIENT as exc:
            # Unacknowledged entries stay pending and are reclaimed once the trouble passes.
            ready = False
            log.warning("account events: %s; retrying", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
