"""Recovery codes: ten single-use codes a person prints or stores, each a way back into the
account after losing every phone.

A code is 10 characters of Crockford's base32 (50 random bits), shown as `xxxxx-xxxxx`.
Typing is forgiving: case, spaces and hyphens do not matter, and the letters Crockford
leaves out read as the digits they look like (o → 0, i and l → 1).

Stored form (SECURITY.md explains the choice): argon2id of the code, one random salt per set
of ten, so checking a typed code costs one hash whichever of the ten it is, and a copy of the
database gives an attacker 50 bits to search at argon2's price per guess.
"""

from __future__ import annotations

import secrets

from argon2.low_level import Type, hash_secret_raw

COUNT = 10
LENGTH = 10  # characters; 5 bits each
ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford's base32, lower case
SALT_BYTES = 16
# OWASP's argon2id floor (19 MiB, 2 passes, 1 lane): ~20 ms. The codes are random, not
# chosen, so the work factor multiplies 2^50, not a dictionary.
TIME_COST = 2
MEMORY_KIB = 19 * 1024
PARALLELISM = 1
HASH_BYTES = 32

_READS_AS = {"o": "0", "i": "1", "l": "1"}


def new_code() -> str:
    """One random code, in its canonical form (10 characters, no hyphen)."""
    return "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))


def new_set() -> list[str]:
    """A fresh set of COUNT distinct codes."""
    codes: list[str] = []
    while len(codes) < COUNT:
        code = new_code()
        if code not in codes:
            codes.append(code)
    return codes


def shown(code: str) -> str:
    """The code grouped for reading: `xxxxx-xxxxx`."""
    return f"{code[:5]}-{code[5:]}"


def normalize(typed: str) -> str | None:
    """The canonical form of what a person typed, or None if it cannot be a code."""
    letters = "".join(ch for ch in typed.lower() if ch not in " -\t")
    canonical = "".join(_READS_AS.get(ch, ch) for ch in letters)
    if len(canonical) != LENGTH or any(ch not in ALPHABET for ch in canonical):
        return None
    return canonical


def new_salt() -> bytes:
    """The salt for a new set of codes."""
    return secrets.token_bytes(SALT_BYTES)


def code_hash(code: str, salt: bytes) -> bytes:
    """The stored form of a canonical code (argon2id; CPU-heavy, run it off the event loop)."""
    return hash_secret_raw(
        code.encode("ascii"),
        salt,
        time_cost=TIME_COST,
        memory_cost=MEMORY_KIB,
        parallelism=PARALLELISM,
        hash_len=HASH_BYTES,
        type=Type.ID,
    )
