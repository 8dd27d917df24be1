"""Cross-process events: one Redis pub/sub link per process, fanned out locally.

A socket never holds a Redis subscription of its own; it gets a local queue (`listen`) or
a callback (`subscribe`), and the process subscribes once per channel however many local
listeners share it.

On a Redis Cluster the link is sharded pub/sub (SPUBLISH / SSUBSCRIBE, Redis 7): an event
goes only to the master that owns its channel's slot (channels carry their keys' hash tag,
app.store.redis.KeySpace), and a process holds one connection per master it listens on,
not a copy of every event of the deployment. When the cluster's masters change (a
failover, slots moved) the link follows them, and listeners get RECONNECTED, as after a
lost connection, since events published meanwhile may be gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

Event = dict[str, Any]
# Called by the bus's reader for each event, so it must not block (schedule work instead).
Listener = Callable[[Event], None]
# Delivered to every local listener after the pub/sub link came back: events may have been
# missed, so listeners re-read the state they care about.
RECONNECTED: Event = {"type": "_reconnected"}

# Seconds between tries to subscribe channels whose shard was down.
HEAL_EVERY = 1.0

# Errors after which the link is rebuilt and every channel subscribed again.
LINK_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    RedisClusterException,
    MovedError,
    OSError,
)


class Link:
    """The process's subscriptions on a single Redis server: plain pub/sub."""

    confirmed = "subscribe"
    delivered = "message"

    def __init__(self, redis: aioredis.Redis) -> None:
        self.pubsub: PubSub = redis.pubsub(ignore_subscribe_messages=False)

    @property
    def active(self) -> bool:
        return bool(self.pubsub.subscribed)

    @property
    def connected(self) -> bool:
        return self.pubsub.connection is not None

    async def subscribe(self, *channels: str, tolerant: bool = False) -> None:
        await self.pubsub.subscribe(*channels)

    @property
    def needs_heal(self) -> bool:
        """Whether `heal` has anything to do now (never, on a single server)."""
        return False

    async def heal(self) -> bool:
        """Subscribe what a tolerant subscribe could not; True when something was."""
        return False

    async def unsubscribe(self, *channels: str) -> None:
        await self.pubsub.unsubscribe(*channels)

    async def get_message(self, wait: float) -> dict[str, Any] | None:
        message: dict[str, Any] | None = await self.pubsub.get_message(timeout=wait)
        return message

    def moved(self) -> bool:
        """Whether the servers behind the link changed since the last call."""
        return False

    async def close(self) -> None:
        await self.pubsub.aclose()


class ShardedLink:
    """The process's subscriptions on a Redis Cluster: sharded pub/sub, one connection per
    master that owns a subscribed channel's slot, each read by a task of its own (so an
    event waits for no other master's) into one queue.

    A master lost, a slot moved away (Redis then ends the subscription with SUNSUBSCRIBE) or
    a subscription answered MOVED is reported as a lost link: the bus builds a new one from
    a refreshed slot map and tells its listeners (RECONNECTED).
    """

    confirmed = "ssubscribe"
    delivered = "smessage"

    def __init__(self, redis: RedisCluster) -> None:
        self._cluster = redis
        self._nodes: dict[str, tuple[aioredis.Redis, PubSub, asyncio.Task[None]]] = {}
        self._owner: dict[str, str] = {}  # channel -> the node holding its subscription
        self._leaving: set[str] = set()
        self._missing: set[str] = set()  # wanted, but their master did not answer
        self._next_heal = 0.0
        self._inbox: asyncio.Queue[dict[str, Any] | Exception] = asyncio.Queue()
        self._masters = self._current_masters()

    def _current_masters(self) -> frozenset[str]:
        return frozenset(node.name for node in self._cluster.get_primaries())

    @property
    def active(self) -> bool:
        return bool(self._owner or self._missing)

    @property
    def connected(self) -> bool:
        return bool(self._nodes)

    def _pubsub(self, node: ClusterNode) -> PubSub:
        found = self._nodes.get(node.name)
        if found is not None:
            return found[1]
        # No retries of its own: a lost connection must reach the bus, which resubscribes
        # everything and tells the listeners.
        kwargs = {**node.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
        pool = aioredis.ConnectionPool(connection_class=node.connection_class, **kwargs)
        client = aioredis.Redis(connection_pool=pool)
        pubsub = client.pubsub(ignore_subscribe_messages=False)
        reader = asyncio.create_task(self._read(node.name, pubsub), name=f"shard-{node.name}")
        self._nodes[node.name] = (client, pubsub, reader)
        return pubsub

    async def subscribe(self, *channels: str, tolerant: bool = False) -> None:
        """SSUBSCRIBE on the masters of the channels' slots. `tolerant`: channels whose
        master does not answer (a shard down) are kept aside for `heal`, so one shard's
        outage leaves the other shards' listeners hearing."""
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
        refreshed = False
        # One SSUBSCRIBE per slot: Redis refuses one that spans slots.
        for group in by_slot.values():
            try:
                node = self._cluster.get_node_from_key(group[0])
                if node is None:  # the slot has no master now: its shard is down
                    raise RedisConnectionError(f"no master serves {group[0]}")
                await self._pubsub(node).ssubscribe(*group)
            except (MovedError, RedisConnectionError, RedisTimeoutError, OSError):
                if not refreshed:
                    # The slot map may be stale (a failover, a slot moved): the next try
                    # uses a fresh one.
                    refreshed = True
                    with contextlib.suppress(*LINK_ERRORS):
                        await self._cluster.nodes_manager.initialize()
                if not tolerant:
                    raise
                self._missing.update(group)
                continue
            for channel in group:
                self._owner[channel] = node.name
                self._leaving.discard(channel)
                self._missing.discard(channel)

    @property
    def needs_heal(self) -> bool:
        return bool(self._missing) and time.monotonic() >= self._next_heal

    async def heal(self) -> bool:
        if not self.needs_heal:
            return False
        self._next_heal = time.monotonic() + HEAL_EVERY
        before = len(self._missing)
        await self.subscribe(*self._missing, tolerant=True)
        return len(self._missing) < before

    async def unsubscribe(self, *channels: str) -> None:
        for channel in channels:
            self._missing.discard(channel)
            name = self._owner.pop(channel, None)
            if name is not None and name in self._nodes:
                self._leaving.add(channel)
                await self._nodes[name][1].sunsubscribe(channel)

    async def _read(self, name: str, pubsub: PubSub) -> None:
        while True:
            try:
                if not pubsub.subscribed:
                    await asyncio.sleep(0.05)  # nothing to read on this node yet
                    continue
                message = await pubsub.get_message(timeout=1.0)
            except Exception as exc:  # lost: the bus resubscribes
                self._inbox.put_nowait(exc)
                return
            if message is None:
                continue
            if message["type"] == "sunsubscribe":
                channel = str(message["channel"])
                if channel in self._leaving:
                    self._leaving.discard(channel)
                elif self._owner.get(channel) == name:  # the slot moved to another master
                    self._inbox.put_nowait(RedisConnectionError(f"{channel} moved"))
                    return
                continue
            self._inbox.put_nowait(message)

    async def get_message(self, wait: float) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(wait):
                item = await self._inbox.get()
        except TimeoutError:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    def moved(self) -> bool:
        masters = self._current_masters()
        if masters == self._masters:
            return False
        self._masters = masters
        return True

    async def close(self) -> None:
        for client, pubsub, reader in self._nodes.values():
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            with contextlib.suppress(Exception):
                await client.aclose(close_connection_pool=True)
        self._nodes.clear()


def open_link(redis: aioredis.Redis) -> Link | ShardedLink:
    """A sharded link on a Redis Cluster, a plain one on a single server."""
    if isinstance(redis, RedisCluster):
        return ShardedLink(redis)
    return Link(redis)


class EventBus:
    """Publish JSON events to Redis channels and listen to them from many local tasks."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._sharded = isinstance(redis, RedisCluster)
        self._link = open_link(redis)
        # Lists, not sets: most channels have one listener (a phone's user channel), and a
        # one-item set costs an idle socket 150 bytes more.
        self._listeners: dict[str, list[Listener]] = {}
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        """Start the reader task (idempotent)."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_forever(), name="event-bus")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        with contextlib.suppress(Exception):
            await self._link.close()

    async def publish(self, channel: str, event: Event) -> None:
        """Send one event to every listener of `channel`, in every process."""
        if self._sharded:
            await self._redis.spublish(channel, orjson.dumps(event))
        else:
            await self._redis.publish(channel, orjson.dumps(event))

    @contextlib.asynccontextmanager
    async def listen(self, *channels: str) -> AsyncIterator[asyncio.Queue[Event]]:
        """A queue that receives every event on `channels` until the block ends.

        Returns only once Redis has confirmed the subscriptions, so state read afterwards
        cannot miss an event published after that read.
        """
        queue: asyncio.Queue[Event] = asyncio.Queue()
        listener = queue.put_nowait
        await self.add_listener(listener, *channels)
        try:
            yield queue
        finally:
            await self.remove_listener(listener, *channels)

    @contextlib.asynccontextmanager
    async def subscribe(self, listener: Listener, *channels: str) -> AsyncIterator[None]:
        """Call `listener` with every event on `channels` until the block ends; like
        `listen`, it returns once Redis has confirmed the subscriptions."""
        await self.add_listener(listener, *channels)
        try:
            yield
        finally:
            await self.remove_listener(listener, *channels)

    async def add_listener(self, listener: Listener, *channels: str) -> None:
        """Start calling `listener` with every event on `channels`, once Redis has confirmed
        the subscriptions; `remove_listener` ends it. (`subscribe` is the block form; a
        long-lived socket calls these two itself and keeps no context manager alive.)"""
        await self.start()
        new: list[str] = []
        async with self._lock:
            waits = []
            for channel in channels:
                listeners = self._listeners.setdefault(channel, [])
                if not listeners:
                    new.append(channel)
                elif channel in self._confirmations:
                    # Another listener's subscription is still on its way: wait for it too.
                    waits.append(self._confirmations[channel])
                if listener not in listeners:
                    listeners.append(listener)
            for channel in new:
                future = asyncio.get_running_loop().create_future()
                self._confirmations[channel] = future
                waits.append(future)
            if new:
                try:
                    await self._link.subscribe(*new)
                except Exception:
                    self._drop(listener, channels)
                    raise
        if not waits:
            return
        try:
            # asyncio.timeout, not wait_for: no task per listener on this hot path.
            async with asyncio.timeout(5):
                for wait in waits:
                    await wait
        except BaseException as exc:
            await self.remove_listener(listener, *channels)
            if isinstance(exc, TimeoutError):
                # Redis is away (the reader is reconnecting): the caller answers 503.
                raise RedisTimeoutError("pub/sub subscription not confirmed") from None
            raise

    async def remove_listener(self, listener: Listener, *channels: str) -> None:
        async with self._lock:
            gone = self._drop(listener, channels)
            if gone and self._link.connected:
                with contextlib.suppress(Exception):
                    await self._link.unsubscribe(*gone)

    def _drop(self, listener: Listener, channels: tuple[str, ...]) -> list[str]:
        gone = []
        for channel in channels:
            listeners = self._listeners.get(channel)
            if listeners is None:
                continue
            if listener in listeners:
                listeners.remove(listener)
            if not listeners:
                del self._listeners[channel]
                gone.append(channel)
                future = self._confirmations.pop(channel, None)
                if future is not None and not future.done():
                    future.cancel()
        return gone

    def listener_count(self) -> int:
        return sum(len(v) for v in self._listeners.values())

    async def _read_forever(self) -> None:
        failures = 0
        while True:
            if failures:
                # Keep trying until Redis is back: a failed resubscribe must not leave the
                # listeners of this process deaf.
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))
                try:
                    await self._resubscribe()
                except LINK_ERRORS as exc:
                    failures += 1
                    log.warning("event bus cannot resubscribe yet (%s)", type(exc).__name__)
                    continue
            if self._link.moved():
                # A failover or resharding: events sent meanwhile may be lost.
                log.warning("event bus: the cluster's masters changed")
                self._broadcast(RECONNECTED)
            # The lock only when there is something to heal: phones connecting take it to
            # subscribe, and during a reconnect storm thousands queue on it; a reader taking
            # it for every message read one message per pass through that queue, so events
            # and subscription confirmations waited for seconds.
            if self._link.needs_heal:
                try:
                    async with self._lock:
                        healed = await self._link.heal()
                    if healed:
                        self._broadcast(RECONNECTED)  # a shard is back: its events were missed
                except LINK_ERRORS as exc:
                    log.warning("event bus cannot heal yet (%s)", type(exc).__name__)
            if not self._link.active:
                if failures:
                    failures = 0
                    self._broadcast(RECONNECTED)
                # get_message on a connection with no subscriptions returns at once; idle politely.
                await asyncio.sleep(0.05)
                continue
            try:
                message = await self._link.get_message(1.0)
                if failures:
                    failures = 0
                    self._broadcast(RECONNECTED)
            except LINK_ERRORS as exc:
                failures += 1
                log.warning("event bus lost Redis (%s); retrying", type(exc).__name__)
                continue
            if message is None:
                continue
            self._dispatch(message)

    async def _resubscribe(self) -> None:
        """A fresh pub/sub connection subscribed to every channel that has listeners."""
        async with self._lock:
            with contextlib.suppress(Exception):
                await self._link.close()
            self._link = open_link(self._redis)
            channels = list(self._listeners)
            if channels:
                # Tolerant: a shard that is down must not keep the others' listeners deaf.
                await self._link.subscribe(*channels, tolerant=True)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode()
        if kind == self._link.confirmed:
            future = self._confirmations.pop(str(channel), None)
            if future is not None and not future.done():
                future.set_result(None)
            return
        if kind != self._link.delivered:
            return
        try:
            event = orjson.loads(message["data"])
        except orjson.JSONDecodeError:
            log.warning("dropping a malformed event on %s", channel)
            return
        for listener in list(self._listeners.get(str(channel), ())):
            self._call(listener, event)

    def _broadcast(self, event: Event) -> None:
        # Once per listener, however many channels it listens to.
        for listener in {each for listeners in self._listeners.values() for each in listeners}:
            self._call(listener, event)

    @staticmethod
    def _call(listener: Listener, event: Event) -> None:
        try:
            listener(event)
        except Exception:  # one broken listener must not starve the others
            log.exception("event listener failed")
