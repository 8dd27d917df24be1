"""Push-fatigue backoff: how long a user's next approval waits after failed ones."""

from __future__ import annotations

BACKOFF_BASE = 10
BACKOFF_CAP = 3600

# 10 * 2**9 already passes the cap; stopping here keeps huge counters from building huge ints.
_DOUBLINGS_TO_CAP = 9


def backoff_seconds(failures: int) -> int:
    """Seconds the next approval waits after `failures` denied or unanswered ones in a row.

    0 -> 0, 1 -> 10, 2 -> 20, doubling each time, capped at one hour (PROTOCOL §3).
    """
    if failures <= 0:
        return 0
    doublings = min(failures - 1, _DOUBLINGS_TO_CAP)
    return min(BACKOFF_CAP, BACKOFF_BASE << doublings)
