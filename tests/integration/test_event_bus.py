"""The event bus on a real Redis: its reader keeps reading while subscriptions are made.

A phone that connects subscribes to its user's channel under the bus's lock; after a server
restart thousands do so at once and queue on that lock. The reader must not queue there too:
when it took the lock before every read, each event and each subscription confirmation
waited for a pass through the whole queue (a sign-in's request reached its phone 11-21 s
late during the bench's reconnect storm, and hundreds to thousands of phones timed out
subscribing).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis

from app.store.events import Event, EventBus, Listener

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def bus(redis_url: str) -> AsyncIterator[tuple[EventBus, aioredis.Redis]]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    events = EventBus(client)
    await events.start()
    try:
        yield events, client
    finally:
        await events.close()
        await client.aclose()


async def test_events_arrive_while_a_subscription_holds_the_lock(
    bus: tuple[EventBus, aioredis.Redis], redis_prefix: str
) -> None:
    events, client = bus
    channel = f"{redis_prefix}user:someone"
    seen: list[Event] = []
    all_arrived = asyncio.Event()

    def listener(event: Event) -> None:
        seen.append(event)
        if len(seen) == 3:
            all_arrived.set()

    await events.add_listener(listener, channel)
    # What a connecting phone holds while it sends its SUBSCRIBE (reached into on purpose:
    # a storm's queue of them cannot be made to hold it for a known time). Three events:
    # a read already under way when the lock is taken would deliver the first one anyway.
    async with events._lock:
        for n in (1, 2, 3):
            await client.publish(channel, orjson.dumps({"type": "approval_request", "n": n}))
        await asyncio.wait_for(all_arrived.wait(), 5)
    assert seen == [{"type": "approval_request", "n": n} for n in (1, 2, 3)]
    await events.remove_listener(listener, channel)


async def test_many_phones_subscribing_at_once_all_get_confirmed_and_hear_events(
    bus: tuple[EventBus, aioredis.Redis], redis_prefix: str
) -> None:
    events, client = bus
    channels = [f"{redis_prefix}user:{i}" for i in range(2000)]
    heard: dict[str, Event] = {}

    def listener_for(channel: str) -> Listener:
        def listener(event: Event) -> None:
            heard[channel] = event

        return listener

    await asyncio.gather(*(events.add_listener(listener_for(c), c) for c in channels))
    assert events.listener_count() == len(channels)
    for channel in channels[::100]:
        await client.publish(channel, orjson.dumps({"type": "ping", "to": channel}))
    async with asyncio.timeout(10):
        while len(heard) < len(channels[::100]):
            await asyncio.sleep(0.01)
    assert heard == {c: {"type": "ping", "to": c} for c in channels[::100]}
