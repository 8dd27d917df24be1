"""Offline passcodes (TOTP, RFC 6238) from an enrolled phone: the seed a device gets, the
code it shows, and which time step a typed code belongs to.

The parameters are the ones every authenticator app supports: a 160-bit seed, HMAC-SHA-1,
6 digits, 30-second steps. A code is accepted for the current step and one step either side
(clock drift), and only for a step later than the last one used on that device, so a code
works once (RFC 6238 §5.2). The arithmetic is pyotp's; this module only fixes the rules.
"""

from __future__ import annotations

import base64
import hmac
import secrets

import pyotp

SEED_BYTES = 20  # 160 bits, RFC 4226's recommended length for HMAC-SHA-1
DIGITS = 6
PERIOD = 30
ALGORITHM = "SHA1"
DRIFT_STEPS = 1


def new_seed() -> bytes:
    """A fresh random seed for one device."""
    return secrets.token_bytes(SEED_BYTES)


def seed_base32(seed: bytes) -> str:
    """The seed as authenticator apps take it (RFC 4648 base32; 160 bits need no padding)."""
    return base64.b32encode(seed).decode("ascii").rstrip("=")


def seed_json(seed: bytes) -> dict[str, object]:
    """What a device is given: `{"secret","digits","period","algorithm"}`."""
    return {
        "secret": seed_base32(seed),
        "digits": DIGITS,
        "period": PERIOD,
        "algorithm": ALGORITHM,
    }


def time_step(now: float) -> int:
    """The RFC 6238 time step `now` falls in."""
    return int(now // PERIOD)


def code_at(seed: bytes, step: int, *, digits: int = DIGITS) -> str:
    """The code of `seed` for time step `step` (zero-padded to `digits`)."""
    return pyotp.TOTP(seed_base32(seed), digits=digits, interval=PERIOD).generate_otp(step)


def normalize(typed: str) -> str | None:
    """The code a person typed, without spaces ("123 456"); None unless it is 6 ASCII digits."""
    code = "".join(typed.split())
    if len(code) != DIGITS or not code.isascii() or not code.isdigit():
        return None
    return code


def matching_step(seed: bytes, code: str, now: float, *, last_used: int | None) -> int | None:
    """The time step `code` is the code of, within ±DRIFT_STEPS of now and later than
    `last_used` (the device's last accepted step); None if there is none.

    Every candidate is computed and compared in constant time, whichever matches.
    """
    current = time_step(now)
    found: int | None = None
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        right = hmac.compare_digest(code_at(seed, step).encode(), code.encode())
        if right and found is None and (last_used is None or step > last_used):
            found = step
    return found
