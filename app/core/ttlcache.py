"""A small bounded cache whose entries expire after a fixed time, on an injectable clock.

Used for look-ups that are read on every request but change rarely (API keys), so the hot
path skips a SQL round trip; the TTL bounds how long a revoked entry stays usable.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from app.core.clock import Clock

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """At most `max_entries` values, each forgotten `ttl` seconds after it was stored."""

    def __init__(self, clock: Clock, *, ttl: float, max_entries: int) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max = max_entries
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored_until, value = entry
        if stored_until <= self._clock.now():
            del self._entries[key]
            return None
        return value

    def put(self, key: K, value: V) -> None:
        self._entries[key] = (self._clock.now() + self._ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
