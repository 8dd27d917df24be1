"""Number matching as PROTOCOL §2/§3 describe it: typed, choices and nist modes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.core.matching import (
    MATCH_MODES,
    MatchPolicy,
    canonical_number,
    draw_number,
    number_matches,
)

TYPED = MatchPolicy.for_mode("typed")
CHOICES = MatchPolicy.for_mode("choices")
NIST = MatchPolicy.for_mode("nist")

policies = st.builds(
    MatchPolicy, mode=st.sampled_from(MATCH_MODES), digits=st.integers(min_value=1, max_value=9)
)


class _Always(random.Random):
    """A random source that draws the same value every time, then the next ones in turn."""

    def __init__(self, *values: int) -> None:
        super().__init__(0)
        self._values = list(values)

    def randrange(self, *args: object, **kwargs: object) -> int:
        return self._values.pop(0) if len(self._values) > 1 else self._values[0]


def test_modes_have_the_protocol_digits() -> None:
    assert (TYPED.mode, TYPED.digits) == ("typed", 2)
    assert (CHOICES.mode, CHOICES.digits) == ("choices", 2)
    assert (NIST.mode, NIST.digits) == ("nist", 6)


def test_match_object_is_mode_and_digits() -> None:
    assert TYPED.to_json() == {"mode": "typed", "digits": 2}
    assert NIST.to_json() == {"mode": "nist", "digits": 6}


def test_match_object_reads_back() -> None:
    for policy in (TYPED, CHOICES, NIST):
        assert MatchPolicy.from_json(policy.to_json()) == policy


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        {"mode": "typed"},
        {"mode": "typed", "digits": "2"},
        {"mode": "typed", "digits": True},
        {"mode": "emoji", "digits": 2},
        {"mode": "typed", "digits": 2, "extra": 1},
    ],
)
def test_a_malformed_match_object_is_refused(obj: object) -> None:
    with pytest.raises(ValueError):
        MatchPolicy.from_json(obj)


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError):
        MatchPolicy.for_mode("emoji")


@pytest.mark.parametrize("digits", [0, -1, 10, True])
def test_a_policy_needs_a_sensible_digit_count(digits: int) -> None:
    with pytest.raises(ValueError):
        MatchPolicy("typed", digits)


def test_typed_and_nist_draw_no_choices() -> None:
    number, choices = draw_number(TYPED)
    assert len(number) == 2 and number.isdigit() and choices is None
    number, choices = draw_number(NIST)
    assert len(number) == 6 and number.isdigit() and choices is None


def test_small_numbers_are_zero_padded() -> None:
    assert draw_number(TYPED, _Always(7)) == ("07", None)
    assert draw_number(NIST, _Always(42)) == ("000042", None)


def test_choices_hold_the_number_and_two_distinct_decoys() -> None:
    for seed in range(200):
        number, choices = draw_number(CHOICES, random.Random(seed))
        assert choices is not None
        assert len(choices) == 3
        assert len(set(choices)) == 3
        assert number in choices
        assert all(len(c) == 2 and c.isdigit() for c in choices)


def test_repeated_decoy_draws_are_skipped() -> None:
    # The decoy source keeps repeating the number and the first decoy before a new one appears.
    number, choices = draw_number(CHOICES, _Always(5, 5, 5, 9, 9, 3))
    assert number == "05"
    assert choices is not None and sorted(choices) == ["03", "05", "09"]


def test_confirm_offers_the_number_alone() -> None:
    confirm = MatchPolicy.for_mode("confirm")
    assert confirm.to_json() == {"mode": "confirm", "digits": 2}
    assert confirm.offers_choices and CHOICES.offers_choices
    assert not TYPED.offers_choices and not NIST.offers_choices
    for seed in range(50):
        number, choices = draw_number(confirm, random.Random(seed))
        assert choices == [number] and len(number) == 2 and number.isdigit()


def test_the_right_choice_is_not_always_in_the_same_place() -> None:
    places = set()
    for seed in range(100):
        number, choices = draw_number(CHOICES, random.Random(seed))
        assert choices is not None
        places.add(choices.index(number))
    assert places == {0, 1, 2}


def test_a_seeded_draw_repeats() -> None:
    assert draw_number(CHOICES, random.Random(1)) == draw_number(CHOICES, random.Random(1))


def test_the_default_draw_is_not_constant() -> None:
    assert len({draw_number(NIST)[0] for _ in range(20)}) > 1


def test_the_number_matches_as_string_or_json_number() -> None:
    assert number_matches(TYPED, "07", "07")
    assert number_matches(TYPED, "07", 7)
    assert number_matches(NIST, "000042", 42)
    assert number_matches(TYPED, "00", 0)


@pytest.mark.parametrize(
    "given_value",
    [
        "08",
        "7",  # a string must be the exact zero-padded form
        "007",  # over-long
        107,
        -7,
        7.0,
        None,
        True,
        ["07"],
        {"number": "07"},
        b"07",
        " 07",
        "+7",
        "\u0660\u0667",  # Arabic-Indic 0 and 7 are digits, but not the number shown
        "",
    ],
)
def test_anything_else_is_a_wrong_number(given_value: object) -> None:
    assert not number_matches(TYPED, "07", given_value)


def test_a_json_true_is_not_the_number_one() -> None:
    assert not number_matches(TYPED, "01", True)
    assert not number_matches(TYPED, "00", False)


@given(policies, st.integers(min_value=0, max_value=2**32))
def test_draw_number_always_yields_digits_digits(policy: MatchPolicy, seed: int) -> None:
    number, choices = draw_number(policy, random.Random(seed))
    assert len(number) == policy.digits and number.isascii() and number.isdigit()
    if policy.mode == "choices":
        assert choices is not None and number in choices and len(set(choices)) == 3
        assert all(len(c) == policy.digits for c in choices)
    elif policy.mode == "confirm":
        assert choices == [number]
    else:
        assert choices is None


@given(policies, st.integers(min_value=0, max_value=2**32))
def test_a_drawn_number_matches_itself_and_its_int(policy: MatchPolicy, seed: int) -> None:
    number, _ = draw_number(policy, random.Random(seed))
    assert number_matches(policy, number, number)
    assert number_matches(policy, number, int(number))


@given(
    st.one_of(
        st.text(),
        st.integers(),
        st.floats(),
        st.booleans(),
        st.none(),
        st.binary(),
        st.lists(st.integers()),
    )
)
def test_random_answers_never_crash_and_match_only_the_number(given_value: object) -> None:
    result = number_matches(TYPED, "42", given_value)
    assert result is (given_value == "42" or (type(given_value) is int and given_value == 42))


def test_the_canonical_number_is_the_stored_form_or_nothing() -> None:
    two = MatchPolicy.for_mode("typed")
    six = MatchPolicy.for_mode("nist")
    assert canonical_number(two, "07") == "07"
    assert canonical_number(two, 7) == "07"
    assert canonical_number(six, 42) == "000042"
    for sent in (None, True, -1, 100, "", " 7", "7", "\uff10\uff17", "07.0", 7.0, [7], {"n": 7}):
        assert canonical_number(two, sent) is None, sent
