"""Recovery codes: 50 random bits each, grouped for reading, forgiving to type."""

from __future__ import annotations

import math

from app.core import recovery_codes


def test_a_set_is_ten_distinct_codes_of_at_least_50_bits() -> None:
    codes = recovery_codes.new_set()
    assert len(codes) == 10 == len(set(codes))
    alphabet = set(recovery_codes.ALPHABET)
    assert len(alphabet) == 32
    for code in codes:
        assert len(code) == 10 and set(code) <= alphabet
    assert recovery_codes.LENGTH * math.log2(len(alphabet)) >= 50
    assert codes != recovery_codes.new_set()


def test_codes_are_shown_in_two_groups_and_read_back_however_typed() -> None:
    code = "0123456789"
    assert recovery_codes.shown(code) == "01234-56789"
    for typed in ("01234-56789", " 01234 56789 ", "o1234-56789", "0I234-56789", "0l23456789"):
        assert recovery_codes.normalize(typed) == code, typed
    assert recovery_codes.normalize("ABCDE-FGHJK") == "abcdefghjk"


def test_what_cannot_be_a_code_is_refused() -> None:
    full_width = "".join(chr(0xFF10 + n) for n in range(10))
    for typed in ("", "0123", "01234-567890", "01234-5678u", "01234_56789", full_width):
        assert recovery_codes.normalize(typed) is None, typed


def test_the_stored_form_depends_on_the_code_and_the_salt() -> None:
    salt, other_salt = recovery_codes.new_salt(), recovery_codes.new_salt()
    code = recovery_codes.new_code()
    stored = recovery_codes.code_hash(code, salt)
    assert len(stored) == 32
    assert recovery_codes.code_hash(code, salt) == stored
    assert recovery_codes.code_hash(code, other_salt) != stored
    assert recovery_codes.code_hash(recovery_codes.new_code(), salt) != stored
