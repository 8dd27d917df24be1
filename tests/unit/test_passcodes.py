"""Offline passcodes: RFC 6238's own test vectors, one use per time step, ±1 step of drift."""

from __future__ import annotations

import base64

import pytest

from app.core import passcodes

# RFC 6238 Appendix B: the SHA-1 seed is the ASCII string "12345678901234567890".
RFC_SEED = b"12345678901234567890"
RFC_SHA1_VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


@pytest.mark.parametrize(("unix_time", "expected"), RFC_SHA1_VECTORS)
def test_codes_are_rfc_6238s_sha1_test_vectors(unix_time: int, expected: str) -> None:
    step = passcodes.time_step(unix_time)
    assert passcodes.code_at(RFC_SEED, step, digits=8) == expected
    # Six digits are the same value reduced mod 10^6: the vector's last six.
    assert passcodes.code_at(RFC_SEED, step) == expected[-6:]


def test_a_device_gets_a_160_bit_base32_seed_and_the_usual_parameters() -> None:
    seed = passcodes.new_seed()
    given = passcodes.seed_json(seed)
    assert len(seed) == 20 and seed != passcodes.new_seed()
    assert given == {"secret": given["secret"], "digits": 6, "period": 30, "algorithm": "SHA1"}
    assert isinstance(given["secret"], str) and len(given["secret"]) == 32
    assert base64.b32decode(given["secret"]) == seed


def test_the_current_code_matches_its_step() -> None:
    now = 1_700_000_000.0
    code = passcodes.code_at(RFC_SEED, passcodes.time_step(now))
    assert passcodes.matching_step(RFC_SEED, code, now, last_used=None) == passcodes.time_step(now)


def test_a_code_is_refused_again_in_the_same_step() -> None:
    now = 1_700_000_000.0
    step = passcodes.time_step(now)
    code = passcodes.code_at(RFC_SEED, step)
    assert passcodes.matching_step(RFC_SEED, code, now, last_used=step) is None
    # And any earlier code once a later step was used.
    earlier = passcodes.code_at(RFC_SEED, step - 1)
    assert passcodes.matching_step(RFC_SEED, earlier, now, last_used=step) is None


@pytest.mark.parametrize("drift", [-1, 1])
def test_one_step_of_clock_drift_either_way_is_accepted(drift: int) -> None:
    now = 1_700_000_000.0
    step = passcodes.time_step(now) + drift
    code = passcodes.code_at(RFC_SEED, step)
    assert passcodes.matching_step(RFC_SEED, code, now, last_used=None) == step


@pytest.mark.parametrize("drift", [-3, -2, 2, 3])
def test_two_steps_or_more_off_are_refused(drift: int) -> None:
    now = 1_700_000_000.0
    code = passcodes.code_at(RFC_SEED, passcodes.time_step(now) + drift)
    others = {passcodes.code_at(RFC_SEED, passcodes.time_step(now) + d) for d in (-1, 0, 1)}
    if code in others:  # a 1-in-10^6 collision with a neighbouring step's code
        pytest.skip("the drifted code equals an accepted one")
    assert passcodes.matching_step(RFC_SEED, code, now, last_used=None) is None


def test_a_code_from_another_seed_is_refused() -> None:
    now = 1_700_000_000.0
    other = b"another 160-bit seed"
    code = passcodes.code_at(other, passcodes.time_step(now))
    step = passcodes.time_step(now)
    assert code not in {passcodes.code_at(RFC_SEED, step + d) for d in (-1, 0, 1)}
    assert passcodes.matching_step(RFC_SEED, code, now, last_used=None) is None


@pytest.mark.parametrize(
    ("typed", "read"),
    [
        ("123456", "123456"),
        (" 123 456 ", "123456"),
        ("12345", None),
        ("1234567", None),
        ("12345a", None),
        ("\uff11\uff12\uff13\uff14\uff15\uff16", None),  # full-width: digits to Python, not us
        ("", None),
    ],
)
def test_typed_codes_are_six_ascii_digits_spaces_aside(typed: str, read: str | None) -> None:
    assert passcodes.normalize(typed) == read
