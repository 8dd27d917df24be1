"""Which devices hold a WebSocket right now, and on which process.

Each entry names the process that holds the socket; a process proves it is alive with a
short-lived key, so a crashed process's sockets stop counting within 30 s by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

from app.store.redis import KeySpace

log = logging.getLogger(__name__)

PROCESS_TTL = 30
HEARTBEAT = 10

# KEYS: presence hash. ARGV: device id, process id. Deletes only our own entry.
_LEAVE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


class Presence:
    """Register connected devices and ask which of a user's devices are reachable."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, process_id: str) -> None:
        self._redis = redis
        self._keys = keys
        self.process_id = process_id
        self._leave = redis.register_script(_LEAVE)
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
        await self._leave(keys=[self._keys.presence(user_id)], args=[device_id, self.process_id])

    async def connected_devices(self, user_id: str) -> set[str]:
        """Devices of the user whose socket is held by a live process."""
        entries: dict[str, str] = await self._redis.hgetall(self._keys.presence(user_id))  # type: ignore[assignment]
        if not entries:
            return set()
        processes = sorted(set(entries.values()))
        alive = await self._redis.mget([self._keys.process(p) for p in processes])
        live = {p for p, flag in zip(processes, alive, strict=True) if flag}
        return {device for device, process in entries.items() if process in live}
