"""Which devices hold a WebSocket right now, and on which process.

Each entry of a user's presence hash names the process that holds the device's socket.
Processes say they are alive with a heartbeat in their shard's process registry (Redis's
own clock), so a crashed process's sockets stop counting within PROCESS_TTL seconds by
themselves: the scripts that read presence look each process up there, in the same step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from app.core.tokens import new_id
from app.store.lua import Script
from app.store.redis import KeySpace

log = logging.getLogger(__name__)

PROCESS_TTL = 30
HEARTBEAT = 10
STOP_WAIT = 2.0
# A process gone this long leaves the registry (its entries no longer count long before).
FORGET_AFTER = 86400


@dataclass(frozen=True)
class Snapshot:
    """What a new approval needs to know about its user, read in one round trip."""

    connected: frozenset[str]  # devices whose socket a live process holds
    account_version: str  # changes whenever the user or their devices change (account_changed)

    @classmethod
    def from_lua(cls, found: list[str]) -> Snapshot:
        return cls(connected=frozenset(found[1:]), account_version=found[0])

    def lua(self) -> str:
        """The `snapshot` Lua library's result, joined: the create script compares it."""
        return "\n".join([self.account_version, *sorted(self.connected)])


async def account_changed(redis: aioredis.Redis, keys: KeySpace, user_id: str) -> None:
    """Tell every process that the user or their devices changed (call it after the commit).

    Processes check the version before they use what they cached (app.account_cache). It is
    a fresh random value, never a counter, and it never expires, so no old value comes back.
    """
    await redis.set(keys.account_version(user_id), new_id())


class Presence:
    """Register connected devices and ask which of a user's devices are reachable."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, process_id: str) -> None:
        self._redis = redis
        self._keys = keys
        self.process_id = process_id
        self._leave = Script(redis, "app.store", "presence_leave")
        self._snapshot = Script(redis, "app.store", "presence_snapshot")
        self._heartbeat = Script(redis, "app.store", "presence_heartbeat")
        self._beating: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Announce this process and keep announcing it."""
        if self._beating is None:
            self._beating = asyncio.create_task(self._beat(), name="presence-heartbeat")

    async def stop(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(BaseException):
                await self._beating
            self._beating = None
        # Bounded: a process stopping while Redis (or a shard) is away must still stop; its
        # entries stop counting PROCESS_TTL seconds after its last heartbeat anyway.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STOP_WAIT):
                await asyncio.gather(
                    *(self._redis.zrem(self._keys.processes(s), self.process_id)
                      for s in self._keys.shards),
                    return_exceptions=True,
                )

    async def _beat(self) -> None:
        while True:
            # Shard by shard: one that is down (a Redis Cluster master lost) must not stop
            # the heartbeat in the others, or their phones would stop counting as connected.
            for shard in self._keys.shards:
                try:
                    await self._say_alive(shard)
                except Exception as exc:
                    log.warning("presence heartbeat failed: %s", type(exc).__name__)
            await asyncio.sleep(HEARTBEAT)

    async def _say_alive(self, shard: int, client: aioredis.Redis | Pipeline | None = None) -> None:
        await self._heartbeat(
            {"processes": self._keys.processes(shard)},
            {"process": self.process_id, "forget_after": FORGET_AFTER},
            client=client,
        )

    async def join(self, user_id: str, device_id: str) -> None:
        """Record the device's socket as held here (again after Redis lost it, too)."""
        shard = self._keys.shard_of(user_id)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(self._keys.presence(user_id), device_id, self.process_id)
                # Counted at once, even before the next heartbeat (a restarted Redis lost them).
                await self._say_alive(shard, client=pipe)
                await pipe.execute()
        except NoScriptError:
            # A cluster's pipeline does not load scripts: a master promoted since lacks it.
            await self._say_alive(shard)

    async def leave(self, user_id: str, device_id: str) -> None:
        await self._leave(
            {"presence": self._keys.presence(user_id)},
            {"device": device_id, "process": self.process_id},
        )

    async def snapshot(self, user_id: str) -> Snapshot:
        """The user's connected devices and account version, in one round trip."""
        found: list[str] = await self._snapshot(
            {
                "presence": self._keys.presence(user_id),
                "account_version": self._keys.account_version(user_id),
                "processes": self._keys.processes(self._keys.shard_of(user_id)),
            },
            {"process_ttl": PROCESS_TTL},
        )
        return Snapshot.from_lua(found)

    async def connected_devices(self, user_id: str) -> frozenset[str]:
        """Devices of the user whose socket is held by a live process."""
        return (await self.snapshot(user_id)).connected
