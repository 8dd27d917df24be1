"""The embedded Redis (the default without TAPPROVE_REDIS_URL) stops when its handle closes,
so short-lived commands such as `tapprove user unlock` leave no redis-server behind."""

from __future__ import annotations

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
