"""Random secrets, their hashes and constant-time comparison: the one place for all three."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets


def new_token(nbytes: int = 32) -> str:
    """A URL-safe random secret with `nbytes` of entropy (default 256 bits)."""
    return secrets.token_urlsafe(nbytes)


def new_id() -> str:
    """An opaque public identifier (128 bits), for rows and approvals."""
    return secrets.token_hex(16)


def new_numeric_code(digits: int) -> str:
    """A code a person types, e.g. `"042917"`: uniformly random, zero-padded."""
    return f"{secrets.randbelow(10**digits):0{digits}d}"


def hash_token(token: str) -> str:
    """The stored form of a secret: SHA-256 hex (secrets are high-entropy, so no salt needed)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def same_secret(a: str, b: str) -> bool:
    """Compare two secrets (or their hashes) in constant time."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE uses."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url; raises ValueError on bad input."""
    pad = "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(text + pad)
