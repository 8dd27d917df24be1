"""Number matching: the code a person carries from the browser to the phone."""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from typing import Literal

from app.core.tokens import same_secret

MatchMode = Literal["typed", "choices", "nist", "confirm"]

MATCH_MODES: tuple[MatchMode, ...] = ("typed", "choices", "nist", "confirm")

# typed and choices are short codes a person reads at a glance; nist is the 6-digit typed
# code of NIST SP 800-63B-4 §3.1.3. confirm is the phone-only confirmation of a relying party
# that has nowhere to show a number (a Duo Auth API client): the one choice is the number,
# so approving proves the phone saw this request and nothing more. A deployment cannot
# choose it for sign-ins (app.settings offers the other three).
_DEFAULT_DIGITS: dict[MatchMode, int] = {"typed": 2, "choices": 2, "nist": 6, "confirm": 2}

# A person reads and types this number; more digits than this is a configuration mistake.
MAX_DIGITS = 9

CHOICE_COUNT = 3


@dataclass(frozen=True)
class MatchPolicy:
    """How the phone proves it sees the browser's number: the mode and the number of digits."""

    mode: MatchMode
    digits: int

    def __post_init__(self) -> None:
        if self.mode not in MATCH_MODES:
            raise ValueError(f"unknown match mode {self.mode!r}")
        if (
            not isinstance(self.digits, int)
            or isinstance(self.digits, bool)
            or not 1 <= self.digits <= MAX_DIGITS
        ):
            raise ValueError(f"digits must be an integer from 1 to {MAX_DIGITS}")

    @classmethod
    def for_mode(cls, mode: str) -> MatchPolicy:
        """The protocol's policy for a mode name: typed and choices 2 digits, nist 6."""
        if mode not in MATCH_MODES:
            raise ValueError(f"unknown match mode {mode!r}")
        return cls(mode=mode, digits=_DEFAULT_DIGITS[mode])

    @classmethod
    def from_json(cls, obj: object) -> MatchPolicy:
        """Read `{"mode","digits"}` back; ValueError if it is not a valid policy."""
        if not isinstance(obj, dict) or set(obj) != {"mode", "digits"}:
            raise ValueError("a match policy is an object with exactly mode and digits")
        mode, digits = obj["mode"], obj["digits"]
        if not isinstance(mode, str) or mode not in MATCH_MODES:
            raise ValueError(f"unknown match mode {mode!r}")
        if not isinstance(digits, int) or isinstance(digits, bool):
            raise ValueError("digits must be an integer")
        return cls(mode=mode, digits=digits)

    def to_json(self) -> dict[str, object]:
        """The protocol's `match` object: `{"mode": ..., "digits": ...}`."""
        return {"mode": self.mode, "digits": self.digits}

    @property
    def offers_choices(self) -> bool:
        """Whether the phone is shown the numbers to pick from (`number_choices`)."""
        return self.mode in ("choices", "confirm")


def _format(value: int, digits: int) -> str:
    return f"{value:0{digits}d}"


def draw_number(
    policy: MatchPolicy, rng: random.Random | None = None
) -> tuple[str, list[str] | None]:
    """Draw a zero-padded number and, in choices mode, three distinct shuffled choices with it.

    The choices are `None` in the typed and nist modes, where the person types the number,
    and the number alone in confirm mode.
    """
    draw = rng if rng is not None else secrets.SystemRandom()
    space = 10**policy.digits
    value = draw.randrange(space)
    number = _format(value, policy.digits)
    if policy.mode == "confirm":
        return number, [number]
    if policy.mode != "choices":
        return number, None
    picked = [value]
    while len(picked) < CHOICE_COUNT:
        decoy = draw.randrange(space)
        if decoy not in picked:
            picked.append(decoy)
    choices = [_format(v, policy.digits) for v in picked]
    # Without the shuffle the right answer would always come first.
    draw.shuffle(choices)
    return number, choices


def canonical_number(policy: MatchPolicy, given: object) -> str | None:
    """The number a phone sent, in the stored form (zero-padded digits), or None when it
    cannot be one: the exact string (`"07"`) or a non-negative int (`7`), nothing else."""
    # bool is an int subclass, but `true` from a JSON body is never a number.
    if isinstance(given, bool):
        return None
    if isinstance(given, int):
        # A JSON number loses its leading zeros, so 7 stands for "07".
        if 0 <= given < 10**policy.digits:
            return _format(given, policy.digits)
        return None
    if isinstance(given, str):
        # Only the exact ASCII form: no signs, spaces, or other scripts' digits.
        if len(given) == policy.digits and given.isascii() and given.isdigit():
            return given
        return None
    return None


def number_matches(policy: MatchPolicy, expected: str, given: object) -> bool:
    """Whether the number a phone sent is the expected one, compared in constant time.

    Accepts the exact zero-padded string (`"07"`) or a non-negative int (`7`); anything else
    (bool, None, float, a longer or shorter string, other types) is simply not a match.
    """
    normalized = canonical_number(policy, given)
    if normalized is None:
        return False
    # Only the length (which is public) is learned before this constant-time comparison.
    return same_secret(expected, normalized)
