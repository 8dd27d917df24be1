"""The audit log as readers see it, and the worker that files approval lines into SQL.

Approval lines arrive through the audit stream (app.store.audit_stream); everything else is
written straight to SQL with the change it reports (app.db.audit.record). Readers that must
see the latest events (the account's activity list) merge the lines still on their way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from app.core.tokens import new_id
from app.db import audit
from app.db.models import AuditEvent
from app.services import Services
from app.store.audit_stream import AuditStream, StreamedEvent
from app.store.redis import KeySpace

log = logging.getLogger(__name__)

BATCH = 500
BLOCK_MS = 1000
# After filing a batch that did not fill up, wait this long so the next one is bigger: an
# insert per line would cost the database (and this process) far more than 50 ms of delay.
LINGER = 0.05
# A writer that took lines and has not filed them this long has died; another takes them.
RECLAIM_IDLE_MS = 30_000
RECLAIM_EVERY = 15.0
# How far back the activity list looks for lines not yet filed.
MERGE_WINDOW = 2000


async def file_lines(
    db: async_sessionmaker[AsyncSession], stream: AuditStream, events: list[StreamedEvent]
) -> None:
    """Insert the lines as rows, commit, then delete them from the stream."""
    async with db() as session:
        await audit.insert_streamed(session, events)
        await session.commit()
    await stream.retire(events)


async def drain(
    redis: aioredis.Redis, keys: KeySpace, db: async_sessionmaker[AsyncSession]
) -> int:
    """File every line nobody has taken yet (for one-shot readers such as `tapprove audit`)."""
    filed = 0
    for shard in keys.shards:
        stream = AuditStream(redis, keys, f"drain-{new_id()}", shard)
        await stream.ensure_group()
        while events := await stream.read_new(count=BATCH, block_ms=None):
            await file_lines(db, stream, events)
            filed += len(events)
        await stream.leave()  # reached only with every line it took filed
    return filed


async def run_audit_writer(svc: Services, stop: asyncio.Event) -> None:
    """Consumer: file audit lines into SQL in batches until `stop`, from every shard."""
    await asyncio.gather(*(_write_shard(svc, stop, shard) for shard in svc.keys.shards))


async def _write_shard(svc: Services, stop: asyncio.Event, shard: int) -> None:
    stream = AuditStream(svc.redis, svc.keys, svc.process_id, shard)
    loop = asyncio.get_running_loop()
    next_reclaim = 0.0
    ready = False
    while not stop.is_set():
        try:
            if not ready:
                await stream.ensure_group()
                ready = True
            if loop.time() >= next_reclaim:
                next_reclaim = loop.time() + RECLAIM_EVERY
                orphans = await stream.reclaim(min_idle_ms=RECLAIM_IDLE_MS, count=BATCH)
                if orphans:
                    await file_lines(svc.db, stream, orphans)
                await stream.forget_idle_writers()
            events = await stream.read_new(count=BATCH, block_ms=BLOCK_MS)
            if events:
                await file_lines(svc.db, stream, events)
                if len(events) < BATCH:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=LINGER)
        except Exception as exc:  # Redis or the database is away: the lines wait in Redis
            ready = False
            log.warning("audit writer: %s; retrying", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)


async def recent_events(svc: Services, user_id: str, limit: int = 50) -> list[AuditEvent]:
    """The user's latest audit events, newest first, including lines not yet filed."""
    # The stream first: a line filed (and deleted) between the two reads is then in SQL.
    # A user's approval lines are all on the stream of the user's shard.
    stream = AuditStream(svc.redis, svc.keys, svc.process_id, svc.keys.shard_of(user_id))
    waiting = await stream.newest(MERGE_WINDOW)
    async with svc.db() as db:
        stored = await audit.recent(db, user_id, limit=limit)
    filed = {event.stream_id for event in stored if event.stream_id}
    merged = stored + [
        audit.as_event(line)
        for line in waiting
        if line.fields.get("user_id") == user_id and line.stream_id not in filed
    ]
    merged.sort(key=lambda event: event.at, reverse=True)
    return merged[:limit]
