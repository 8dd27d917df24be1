"""Servers started with the uvicorn options `tapprove serve` uses (`app.server.server_options`):
its HTTP protocol (request deadlines, JSON parser errors) and its proxy trust, which the
shared fixtures' plain uvicorn servers do not have. Raw-socket helpers to talk to them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from app.core.clock import SystemClock
from app.db.migrate import upgrade_async
from app.delivery.push import Providers
from app.main import create_app
from app.server import server_options
from tests.fixtures.app import LiveServer, free_port, make_settings

Start = Callable[..., Awaitable[LiveServer]]


@contextlib.asynccontextmanager
async def production_servers(
    tmp_path: Path, redis_url: str, prefix: str, database_url: str
) -> AsyncIterator[Start]:
    """Start servers (settings as keyword overrides) on one Redis prefix and one database."""
    started: list[tuple[uvicorn.Server, asyncio.Task[None], LiveServer]] = []
    migrated = False

    async def start(**overrides: Any) -> LiveServer:
        nonlocal migrated
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        settings = make_settings(
            tmp_path,
            redis_url,
            prefix,
            database_url,
            public_url=overrides.pop("public_url", url),
            **overrides,
        )
        if not migrated:
            await upgrade_async(settings)
            migrated = True
        app = create_app(settings, clock=SystemClock(), providers=Providers(), run_worker=True)
        options = server_options(settings)
        # As in tests/fixtures/app.py: no client may reuse a keep-alive connection at the
        # instant the server drops it (request deadlines do not depend on this timer).
        options["timeout_keep_alive"] = 300
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **options
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        for _ in range(1000):
            if server.started:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        live = LiveServer(url, app, settings)
        started.append((server, task, live))
        return live

    try:
        yield start
    finally:
        for server, task, live in reversed(started):
            for client in live.clients:
                await client.aclose()
            server.should_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, timeout=10)


# --- raw sockets -------------------------------------------------------------------------------


@dataclass
class RawAnswer:
    """What came back on a raw connection before the server closed it."""

    status: int | None  # None: closed without a word
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def parse_answer(raw: bytes) -> RawAnswer:
    """The first HTTP response in `raw` (everything up to the server's close)."""
    if not raw:
        return RawAnswer(None, {}, b"")
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawAnswer(int(status_line.split()[1]), headers, body)


async def read_until_closed(reader: asyncio.StreamReader, within: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection; fails after `within` s."""
    received = bytearray()

    async def drain() -> None:
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                received.extend(chunk)

    try:
        await asyncio.wait_for(drain(), timeout=within)
    except TimeoutError:
        raise AssertionError(
            f"the server kept the connection open for {within} s (got {bytes(received)!r})"
        ) from None
    return bytes(received)
