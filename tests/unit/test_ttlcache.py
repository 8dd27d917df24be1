"""The bounded TTL cache behind the API-key look-up."""

from app.core.clock import ManualClock
from app.core.ttlcache import TtlCache


def test_an_entry_is_served_until_its_ttl_and_forgotten_after() -> None:
    clock = ManualClock()
    cache: TtlCache[str, int] = TtlCache(clock, ttl=10, max_entries=4)
    cache.put("k", 1)
    clock.advance(9.9)
    assert cache.get("k") == 1
    clock.advance(0.1)
    assert cache.get("k") is None
    assert len(cache) == 0


def test_the_oldest_entries_go_first_when_full() -> None:
    clock = ManualClock()
    cache: TtlCache[str, int] = TtlCache(clock, ttl=60, max_entries=2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 3)  # refreshing moves "a" to the young end
    cache.put("c", 4)
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (3, 4)


def test_unknown_keys_miss() -> None:
    cache: TtlCache[str, int] = TtlCache(ManualClock(), ttl=1, max_entries=1)
    assert cache.get("nope") is None
