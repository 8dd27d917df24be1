"""A Redis Stream read through a consumer group: add, read, reclaim, acknowledge.

The broker for the outbox and for domain events. Entries are notifications whose effects are
idempotent, so a group that vanished (Redis restarted or was flushed) is simply recreated.

Each of them is one stream per shard (`spread`): a producer appends to the stream its entry
routes to (`route`), and consumers read every shard's, so on a Redis Cluster no one master
carries them all.
"""

from __future__ import annotations

import zlib
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from app.store.redis import KeySpace

# An entry as redis-py returns it with decode_responses: (entry id, fields).
Entry = tuple[str, dict[str, str]]

# Trimming keeps memory bounded; the producers' durable state lives in SQL.
MAX_LENGTH = 100_000
# A consumer gone this long with nothing pending is forgotten (each process is a new name).
FORGET_AFTER_MS = 86_400_000


class StreamGroup:
    """One consumer's handle on a stream and its consumer group."""

    def __init__(self, redis: aioredis.Redis, stream: str, group: str, consumer: str) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer

    async def ensure(self) -> None:
        """Create the stream and group if missing (idempotent)."""
        try:
            # From "0": entries added before the group existed are read too.
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def add(self, *entries: dict[str, str]) -> None:
        """Append entries (pipelined)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for fields in entries:
                pipe.xadd(self.stream, cast(dict[Any, Any], fields), maxlen=MAX_LENGTH)
            await pipe.execute()

    async def read(self, *, count: int, block_ms: int | None) -> list[Entry]:
        """New entries for this consumer, waiting up to `block_ms` (None: not at all; Redis
        reads 0 as "forever"); none if the group was lost."""
        try:
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure()
            return []
        entries: list[Entry] = []
        for _stream, found in cast(list[tuple[str, list[Entry]]], reply or []):
            entries.extend(found)
        return entries

    async def reclaim(self, *, min_idle_ms: int, count: int) -> list[Entry]:
        """Entries other consumers read but left unacknowledged for `min_idle_ms` (XAUTOCLAIM)."""
        entries: list[Entry] = []
        start = "0-0"
        try:
            while True:
                reply = await self.redis.xautoclaim(
                    self.stream,
                    self.group,
                    self.consumer,
                    min_idle_ms,
                    start_id=start,
                    count=count,
                )
                start = reply[0]
                # Entries trimmed away meanwhile come back without fields: nothing to redo.
                entries.extend((e[0], e[1]) for e in reply[1] if e and e[1])
                if start == "0-0" or len(entries) >= count:
                    return entries
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure()
            return entries

    async def ack(self, entries: list[Entry]) -> None:
        """Acknowledge handled entries."""
        if entries:
            await self.redis.xack(self.stream, self.group, *(entry_id for entry_id, _ in entries))

    async def leave(self) -> None:
        """Remove this consumer; only when it holds nothing unacknowledged, or that is lost."""
        await self.redis.xgroup_delconsumer(self.stream, self.group, self.consumer)

    async def forget_idle_consumers(self) -> None:
        """Drop consumers long gone with nothing pending, so the group does not grow forever."""
        try:
            consumers = await self.redis.xinfo_consumers(self.stream, self.group)
        except ResponseError:
            return
        for info in consumers:
            name = info["name"]
            if info["pending"] == 0 and info["idle"] > FORGET_AFTER_MS and name != self.consumer:
                await self.redis.xgroup_delconsumer(self.stream, self.group, name)


def spread(
    redis: aioredis.Redis, keys: KeySpace, name: str, group: str, consumer: str
) -> list[StreamGroup]:
    """One logical stream as one stream per shard (`<prefix>{s<k>}:<name>`), each with its
    own consumer group: consumers read them all."""
    return [
        StreamGroup(redis, keys.in_shard(shard, name), group, consumer) for shard in keys.shards
    ]


def route(streams: list[StreamGroup], key: str) -> StreamGroup:
    """The stream an entry about `key` goes to: the same one every time."""
    return streams[zlib.crc32(key.encode()) % len(streams)]
