"""Which devices hold a WebSocket right now, and on which process.

Each entry names the process that holds the socket; a process proves it is alive with a
short-lived key, so a crashed process's sockets stop counting within 30 s by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis

from app.core.tokens import new_id
from app.store.lua import Script
from app.store.redis import KeySpace

log = logging.getLogger(__name__)

PROCESS_TTL = 30
HEARTBEAT = 10

# Lua: snapshot(prefix, user_id) is the account version ('' before any change) followed by
# the ids of the user's devices whose socket a live process holds, sorted (Snapshot.lua()).
# The approval create script uses it too, to check what its caller assumed.
SNAPSHOT_LUA = """
local function snapshot(prefix, uid)
  local entries = redis.call('HGETALL', prefix .. 'presence:' .. uid)
  local live = {}
  local alive = {}
  for i = 1, #entries, 2 do
    local process = entries[i + 1]
    if alive[process] == nil then
      alive[process] = redis.call('EXISTS', prefix .. 'proc:' .. process) == 1
    end
    if alive[process] then live[#live + 1] = entries[i] end
  end
  table.sort(live)
  table.insert(live, 1, redis.call('GET', prefix .. 'user:' .. uid .. ':account-version') or '')
  return live
end
"""

# KEYS: presence hash, account version (declared for the reader; snapshot builds them).
# ARGV: prefix, user id.
_SNAPSHOT = SNAPSHOT_LUA + "return snapshot(ARGV[1], ARGV[2])"


@dataclass(frozen=True)
class Snapshot:
    """What a new approval needs to know about its user, read in one round trip."""

    connected: frozenset[str]  # devices whose socket a live process holds
    account_version: str  # changes whenever the user or their devices change (account_changed)

    @classmethod
    def from_lua(cls, found: list[str]) -> Snapshot:
        return cls(connected=frozenset(found[1:]), account_version=found[0])

    def lua(self) -> str:
        """The form SNAPSHOT_LUA's result takes, joined: the create script compares it."""
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
        self._snapshot = redis.register_script(_SNAPSHOT)
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Announce this process and keep announcing it."""
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat(), name="presence-heartbeat")

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(BaseException):
                await self._heartbeat
            self._heartbeat = None
        with contextlib.suppress(Exception):
            await self._redis.delete(self._keys.process(self.process_id))

    async def _beat(self) -> None:
        while True:
            try:
                await self._redis.set(self._keys.process(self.process_id), "1", ex=PROCESS_TTL)
            except Exception as exc:
                log.warning("presence heartbeat failed: %s", type(exc).__name__)
            await asyncio.sleep(HEARTBEAT)

    async def join(self, user_id: str, device_id: str) -> None:
        """Record the device's socket as held here (again after Redis lost it, too)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(self._keys.presence(user_id), device_id, self.process_id)
            pipe.set(self._keys.process(self.process_id), "1", ex=PROCESS_TTL)
            await pipe.execute()

    async def leave(self, user_id: str, device_id: str) -> None:
        await self._leave(
            {"presence": self._keys.presence(user_id)},
            {"device": device_id, "process": self.process_id},
        )

    async def snapshot(self, user_id: str) -> Snapshot:
        """The user's connected devices and account version, in one round trip."""
        found: list[str] = await self._snapshot(
            keys=[self._keys.presence(user_id), self._keys.account_version(user_id)],
            args=[self._keys.prefix, user_id],
        )
        return Snapshot.from_lua(found)

    async def connected_devices(self, user_id: str) -> frozenset[str]:
        """Devices of the user whose socket is held by a live process."""
        return (await self.snapshot(user_id)).connected
