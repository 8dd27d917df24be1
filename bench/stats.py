"""Latency summaries: percentiles in milliseconds, the same way everywhere in the report."""

from __future__ import annotations

import math
from collections.abc import Sequence

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (no interpolation, so p99 is a sample)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99 and max of durations given in seconds, reported in ms."""
    values = sorted(seconds)
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    out: dict[str, float | int | None] = {
        "count": len(values),
        "mean": round(1000 * sum(values) / len(values), 3),
    }
    for p in PERCENTILES:
        out[f"p{p}"] = round(1000 * percentile(values, p), 3)
    out["max"] = round(1000 * values[-1], 3)
    return out
