"""Push-fatigue backoff (PROTOCOL §3): 10 s after a failed approval, doubling, at most 1 h.
The rule lives in app.approval.rules; the store's scripts only look up its schedule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.approval.rules import BACKOFF_BASE, BACKOFF_CAP, backoff_schedule, backoff_seconds


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(0, 0), (1, 10), (2, 20), (3, 40), (4, 80), (9, 2560), (10, 3600), (11, 3600)],
)
def test_the_wait_doubles_from_ten_seconds(failures: int, seconds: int) -> None:
    assert backoff_seconds(failures) == seconds


def test_the_protocol_numbers() -> None:
    assert BACKOFF_BASE == 10 and BACKOFF_CAP == 3600


def test_no_failures_means_no_wait() -> None:
    assert backoff_seconds(0) == 0
    assert backoff_seconds(-3) == 0


def test_a_huge_failure_count_is_just_the_cap() -> None:
    assert backoff_seconds(10**12) == BACKOFF_CAP


@given(st.integers(min_value=0, max_value=10_000))
def test_the_wait_never_shrinks_and_never_passes_an_hour(failures: int) -> None:
    wait = backoff_seconds(failures)
    assert 0 <= wait <= BACKOFF_CAP
    assert backoff_seconds(failures + 1) >= wait
    assert isinstance(wait, int)


def test_the_schedule_the_scripts_look_up_is_the_rule() -> None:
    schedule = backoff_schedule()
    assert schedule == (10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600)
    # The scripts take entry min(failures, len) - 1: the same wait as the rule, always.
    for failures in range(1, 40):
        assert schedule[min(failures, len(schedule)) - 1] == backoff_seconds(failures)
