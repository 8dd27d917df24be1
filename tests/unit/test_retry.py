"""Delivery retry timing: capped exponential backoff, full jitter, Retry-After as a floor."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from app.delivery.retry import next_attempt_at, parse_retry_after, retry_delay


class FixedRandom(random.Random):
    """uniform() always returns the given fraction of its range."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


@pytest.mark.parametrize(
    ("attempt", "ceiling"), [(0, 1.0), (1, 2.0), (2, 4.0), (4, 16.0), (5, 30.0)]
)
def test_the_upper_bound_doubles_each_attempt_until_the_cap(attempt: int, ceiling: float) -> None:
    assert retry_delay(attempt, base=1.0, cap=30.0, rng=FixedRandom(1.0)) == ceiling


def test_full_jitter_can_retry_immediately() -> None:
    assert retry_delay(3, base=1.0, cap=30.0, rng=FixedRandom(0.0)) == 0.0


def test_delays_are_spread_over_the_whole_window() -> None:
    rng = random.Random(42)
    delays = [retry_delay(3, base=1.0, cap=30.0, rng=rng) for _ in range(2000)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert min(delays) < 0.5 and max(delays) > 7.5
    assert 3.5 < sum(delays) / len(delays) < 4.5


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    assert retry_delay(10_000, base=1.0, cap=30.0, rng=FixedRandom(1.0)) == 30.0


def test_retry_after_is_a_floor() -> None:
    assert retry_delay(0, base=1.0, cap=30.0, rng=FixedRandom(0.5), retry_after=7.0) == 7.0


def test_retry_after_may_exceed_the_cap() -> None:
    assert retry_delay(0, base=1.0, cap=30.0, rng=FixedRandom(1.0), retry_after=120.0) == 120.0


def test_a_longer_jittered_delay_wins_over_a_short_retry_after() -> None:
    assert retry_delay(4, base=1.0, cap=30.0, rng=FixedRandom(1.0), retry_after=2.0) == 16.0


def test_negative_attempt_is_rejected() -> None:
    with pytest.raises(ValueError):
        retry_delay(-1, base=1.0, cap=30.0)


def test_next_attempt_is_now_plus_the_delay() -> None:
    at = next_attempt_at(1000.0, 2, 1100.0, base=1.0, cap=30.0, rng=FixedRandom(0.5))
    assert at == 1002.0


def test_no_next_attempt_past_the_deadline() -> None:
    assert next_attempt_at(1000.0, 5, 1010.0, base=1.0, cap=30.0, rng=FixedRandom(1.0)) is None


def test_no_next_attempt_exactly_at_the_deadline() -> None:
    assert next_attempt_at(1000.0, 0, 1001.0, base=1.0, cap=30.0, rng=FixedRandom(1.0)) is None


def test_retry_after_beyond_the_deadline_means_give_up() -> None:
    rng = FixedRandom(0.0)
    assert next_attempt_at(1000.0, 0, 1060.0, base=1.0, cap=30.0, rng=rng, retry_after=90) is None


def test_retry_after_in_seconds() -> None:
    assert parse_retry_after("30", now=0.0) == 30.0
    assert parse_retry_after(" 2.5 ", now=0.0) == 2.5


def test_retry_after_as_an_http_date() -> None:
    now = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC).timestamp()
    when = format_datetime(datetime(2026, 11, 22, 10, 0, 45, tzinfo=UTC), usegmt=True)
    assert parse_retry_after(when, now=now) == 45.0


def test_retry_after_in_the_past_means_now() -> None:
    assert parse_retry_after("-5", now=0.0) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=2e9) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "nan", "inf"])
def test_unusable_retry_after_is_ignored(value: str | None) -> None:
    assert parse_retry_after(value, now=0.0) is None
