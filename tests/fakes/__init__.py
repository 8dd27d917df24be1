"""Local stand-ins for FCM, APNs and Twilio that the real client libraries talk to.

Each fake listens on 127.0.0.1 (random port), records every request and answers from a
script: a queue of `Reply` objects, falling back to a success when the queue is empty.
Start one with `await fake.start()` (or `async with fake:`) in the test's event loop, or
with `run_in_thread(fake)` for synchronous tests and subprocess servers.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol, Self, TypeVar

from aiohttp import web


@dataclass
class Reply:
    """One programmed answer: status, JSON (or raw) body, extra headers, delay before it."""

    status: int = 200
    json: Any = None
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    def payload(self) -> bytes | None:
        """The body bytes to send, or None for no body at all."""
        if self.body is not None:
            return self.body
        if self.json is not None:
            return json.dumps(self.json).encode("utf-8")
        return None


class ReplyScript:
    """A queue of replies consumed one per request; empty means "use the default"."""

    def __init__(self) -> None:
        self._queue: deque[Reply] = deque()

    def add(self, *replies: Reply) -> None:
        self._queue.extend(replies)

    def next(self) -> Reply | None:
        try:
            return self._queue.popleft()
        except IndexError:
            return None

    def __len__(self) -> int:
        return len(self._queue)


class Fake(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


class AiohttpFake:
    """Shared life cycle of the HTTP/1.1 fakes (FCM, Twilio) built on aiohttp.web."""

    def __init__(self) -> None:
        self.replies = ReplyScript()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:43127 (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    def reply(self, *replies: Reply) -> None:
        """Queue answers for the next requests, in order."""
        self.replies.add(*replies)

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._closing = asyncio.Event()
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def pause(self, seconds: float) -> None:
        """Sleep for a scripted delay, cut short when the fake closes."""
        if seconds > 0:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), seconds)

    @staticmethod
    def respond(reply: Reply) -> web.Response:
        body = reply.payload()
        headers = dict(reply.headers)
        if reply.json is not None and reply.body is None:
            headers.setdefault("Content-Type", "application/json; charset=UTF-8")
        return web.Response(status=reply.status, body=body, headers=headers)


async def wait_until(check: Callable[[], bool], *, timeout: float = 5.0) -> None:
    """Poll `check` until it is true (e.g. a fake saw N requests); TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


F = TypeVar("F", bound=Fake)


@contextmanager
def run_in_thread(fake: F) -> Iterator[F]:
    """Run a fake on its own event loop in a daemon thread (for sync tests / subprocesses).

    Read its records from the test thread freely; `fake.reply(...)` is thread-safe enough
    (deque append). Stopped and closed on exit.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-provider", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(fake.start(), loop).result(10)
        yield fake
    finally:
        try:
            asyncio.run_coroutine_threadsafe(fake.close(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
