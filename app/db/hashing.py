"""Where argon2id runs: a few dedicated threads per process, at the lowest CPU priority.

One password check is about 130 ms of CPU (t=3, m=64 MiB, p=4 lanes). In asyncio's default
executor up to six ran at once and competed with the event-loop thread for the cores, so
every approval waiting on that loop waited for them too (its decision p99 grew twelvefold
under login load). Here at most HASHING_THREADS hashes run at once, in threads the kernel
runs only when the loop, Redis and the database leave a core free (nice 19): logins queue;
approvals do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# One core stays for the event loop; a hash's own lanes use the rest.
HASHING_THREADS = max(1, (os.cpu_count() or 2) - 1)
NICENESS = 19

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _lower_priority() -> None:
    # Linux keeps a nice value per thread (and argon2's lane threads inherit it).
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=HASHING_THREADS,
                thread_name_prefix="argon2",
                initializer=_lower_priority,
            )
        return _executor


async def run_hashing(work: Callable[..., T], *args: object) -> T:
    """Run CPU-heavy password work (`hash_password`, `verify_password`) off the event loop,
    in the low-priority hashing threads."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool(), functools.partial(work, *args))
