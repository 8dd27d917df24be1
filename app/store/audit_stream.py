"""Audit events about approvals, on their way to the SQL audit log through a Redis Stream.

An approval lives in Redis, so the line that reports its change is appended by the same Lua
script that makes the change (the `audit` Lua library, app/store/scripts/audit.lua), on the
stream of the approval's shard: an approval is never created or decided without its audit
line, and the request pays no database round trip for it. A worker moves the lines into
the `auditevent` table in batches (app.audit_trail); each line is deleted from the stream
only after its row is committed, and the row carries the entry id, so a line copied twice
(a worker died between commit and delete) is stored once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from app.store.redis import KeySpace
from app.store.streams import Entry, StreamGroup

GROUP = "audit-writer"
FIELD = "e"

@dataclass(frozen=True)
class StreamedEvent:
    """An audit line read back from the stream: its entry id and its fields."""

    stream_id: str
    fields: dict[str, Any]


def _parse(raw: list[Entry]) -> list[StreamedEvent]:
    events = []
    for stream_id, fields in raw:
        try:
            data = orjson.loads(fields.get(FIELD, ""))
        except orjson.JSONDecodeError:
            data = None
        # A line that is not ours keeps its id (and no fields) so the writer can retire it.
        events.append(StreamedEvent(stream_id, data if isinstance(data, dict) else {}))
    return events


class AuditStream:
    """Read and retire the audit lines that the approval scripts append to one shard's
    stream (a writer reads every shard's: KeySpace.shards)."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, consumer: str, shard: int) -> None:
        self.key = keys.audit(shard)
        self._group = StreamGroup(redis, self.key, GROUP, consumer)

    async def ensure_group(self) -> None:
        await self._group.ensure()

    async def read_new(self, *, count: int, block_ms: int | None) -> list[StreamedEvent]:
        """Lines no writer has taken yet, waiting up to `block_ms` for one (None: no wait)."""
        return _parse(await self._group.read(count=count, block_ms=block_ms))

    async def reclaim(self, *, min_idle_ms: int, count: int) -> list[StreamedEvent]:
        """Lines another writer took and left unfinished for `min_idle_ms` (it died)."""
        return _parse(await self._group.reclaim(min_idle_ms=min_idle_ms, count=count))

    async def retire(self, events: list[StreamedEvent]) -> None:
        """Acknowledge and delete lines whose rows are committed."""
        if not events:
            return
        ids = [event.stream_id for event in events]
        async with self._group.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.key, GROUP, *ids)
            pipe.xdel(self.key, *ids)
            await pipe.execute()

    async def newest(self, limit: int) -> list[StreamedEvent]:
        """The newest lines still in the stream (not yet, or only just, in SQL)."""
        raw = await self._group.redis.xrevrange(self.key, count=limit)
        return _parse(cast(list[Entry], raw))

    async def leave(self) -> None:
        """Forget this writer once it holds nothing unfinished."""
        await self._group.leave()

    async def forget_idle_writers(self) -> None:
        await self._group.forget_idle_consumers()
