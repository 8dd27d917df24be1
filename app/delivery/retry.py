"""Retry timing for deliveries: capped exponential backoff with full jitter, pure functions."""

from __future__ import annotations

import math
import random
from datetime import UTC
from email.utils import parsedate_to_datetime

# Defaults for push retries: the first retry within 1 s, never more than 30 s apart.
PUSH_RETRY_BASE = 1.0
PUSH_RETRY_CAP = 30.0

# 2**64 is far beyond any cap; stops float overflow for absurd attempt numbers.
_MAX_EXPONENT = 64


def retry_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    rng: random.Random | None = None,
    retry_after: float | None = None,
) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry).

    Full jitter: uniform over [0, min(cap, base * 2**attempt)]. A provider's Retry-After is a
    floor: we never come back sooner than it asked, even if that is beyond `cap`.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    ceiling = min(cap, base * 2.0 ** min(attempt, _MAX_EXPONENT))
    delay = (rng or random).uniform(0.0, max(ceiling, 0.0))
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay


def next_attempt_at(
    now: float,
    attempt: int,
    deadline: float,
    *,
    base: float,
    cap: float,
    rng: random.Random | None = None,
    retry_after: float | None = None,
) -> float | None:
    """When to try again (Unix seconds), or None when that would be at or past `deadline`."""
    at = now + retry_delay(attempt, base=base, cap=cap, rng=rng, retry_after=retry_after)
    return at if at < deadline else None


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """A Retry-After header (delta seconds or HTTP date) as seconds from `now`; None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": UTC with no claim about local time
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(seconds, 0.0)
