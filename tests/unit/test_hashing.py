"""Password hashing runs in a few low-priority threads of its own, never more at once."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from app.db import hashing
from app.db.accounts import hash_password, verify_password


def _nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


async def test_hashing_threads_run_at_the_lowest_priority() -> None:
    assert await hashing.run_hashing(_nice_of_this_thread) == hashing.NICENESS
    assert _nice_of_this_thread() == 0  # the event loop's own thread keeps its priority


async def test_no_more_hashes_run_at_once_than_there_are_hashing_threads() -> None:
    running = 0
    most = 0
    lock = threading.Lock()
    gate = threading.Event()

    def hold() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        # Held until the test has seen the hashing threads all busy at once: how long the
        # threads take to start on a loaded machine does not matter.
        assert gate.wait(30), "the gate never opened"
        with lock:
            running -= 1

    work = asyncio.gather(*(hashing.run_hashing(hold) for _ in range(4 * hashing.HASHING_THREADS)))
    try:
        deadline = time.monotonic() + 30
        while running < hashing.HASHING_THREADS:
            assert time.monotonic() < deadline, f"only {running} hashing threads ran at once"
            await asyncio.sleep(0.01)
        # Every thread that could take one of the waiting calls is busy: there are no more.
        threads = [t for t in threading.enumerate() if t.name.startswith("argon2")]
        assert len(threads) == hashing.HASHING_THREADS, threads
        assert running == hashing.HASHING_THREADS
    finally:
        gate.set()
        await work
    assert most == hashing.HASHING_THREADS


async def test_a_hash_made_there_verifies_there() -> None:
    stored = await hashing.run_hashing(hash_password, "a long password")
    assert await hashing.run_hashing(verify_password, stored, "a long password")
    assert not await hashing.run_hashing(verify_password, stored, "another password")
