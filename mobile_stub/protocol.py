"""The device side of docs/protocol.md §3 as pure functions: enrollment links, decisions, backoff.

Nothing here does I/O, so tests drive it directly; `client.py` moves the bytes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import pyotp

Approval = dict[str, Any]
"""An Approval object as the server sends it (docs/protocol.md §3.3)."""

ENROLL_SCHEME = "tapprove"
WS_DEVICE_PATH = "/ws/device"


class EnrollLinkError(ValueError):
    """An enrollment link or code that cannot be used; the message says why."""


@dataclass(frozen=True)
class EnrollTarget:
    """Where to enroll and with which one-time code."""

    server_url: str
    code: str


def normalize_server_url(url: str) -> str:
    """An http(s) base URL without a trailing slash; EnrollLinkError if it is not one."""
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EnrollLinkError(f"server URL must be http:// or https:// with a host, got {url!r}")
    if parts.query or parts.fragment:
        raise EnrollLinkError(f"server URL must not carry a query or fragment, got {url!r}")
    return url.rstrip("/")


def _check_code(code: str) -> str:
    code = code.strip()
    if not code:
        raise EnrollLinkError("the enrollment code is empty")
    if any(ch.isspace() for ch in code) or not code.isprintable():
        raise EnrollLinkError("the enrollment code contains spaces or control characters")
    return code


def parse_enroll(text: str, server: str | None = None) -> EnrollTarget:
    """Read `tapprove://enroll?url=<base>&code=<code>`, or a bare code when `server` is given.

    An explicit `server` wins over the link's `url` (useful when the public URL is not reachable
    from where the stub runs, e.g. inside a container).
    """
    text = text.strip()
    if not text:
        raise EnrollLinkError("give an enrollment link (tapprove://enroll?...) or a code")
    if "://" not in text and not text.lower().startswith(f"{ENROLL_SCHEME}:"):
        if server is None:
            raise EnrollLinkError("a bare enrollment code needs --server URL")
        return EnrollTarget(normalize_server_url(server), _check_code(text))

    parts = urlsplit(text)
    if parts.scheme.lower() != ENROLL_SCHEME:
        raise EnrollLinkError(
            f"not an enrollment link: scheme must be {ENROLL_SCHEME}://, got {parts.scheme!r}"
        )
    if parts.netloc.lower() != "enroll" or parts.path not in ("", "/"):
        raise EnrollLinkError("not an enrollment link: expected tapprove://enroll?url=...&code=...")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise EnrollLinkError(f"malformed enrollment link query: {exc}") from None
    for name in ("url", "code"):
        values = query.get(name, [])
        if len(values) != 1:
            what = "is missing" if not values else "appears more than once"
            raise EnrollLinkError(f"enrollment link parameter {name!r} {what}")
    base = server if server is not None else query["url"][0]
    return EnrollTarget(normalize_server_url(base), _check_code(query["code"][0]))


def device_ws_url(server_url: str) -> str:
    """The device WebSocket URL for a server base URL: http→ws, https→wss, plus /ws/device."""
    base = normalize_server_url(server_url)
    scheme, rest = base.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{WS_DEVICE_PATH}"


@dataclass(frozen=True)
class Decision:
    """What the person chose for one approval: approve with a number, deny, or report fraud."""

    decision: Literal["approve", "deny"]
    number: str = ""
    reason: Literal["fraud"] | None = None

    @classmethod
    def approve(cls, number: str) -> Decision:
        """Approve, with the number the person read in the browser."""
        return cls("approve", number.strip())

    @classmethod
    def deny(cls, number: str = "") -> Decision:
        """Deny (the login was expected but should not go through)."""
        return cls("deny", number.strip())

    @classmethod
    def fraud(cls, number: str = "") -> Decision:
        """Deny and report fraud: the person did not try to log in."""
        return cls("deny", number.strip(), "fraud")

    @property
    def label(self) -> str:
        """`approve`, `deny` or `fraud`, as the CLI spells it."""
        return "fraud" if self.reason == "fraud" else self.decision


def decision_claims(
    approval: Mapping[str, Any], decision: Decision, *, now: float
) -> dict[str, Any]:
    """The JWS claims for a decision on `approval` (docs/protocol.md §3.4)."""
    claims: dict[str, Any] = {
        "aid": approval["id"],
        "chl": approval["challenge"],
        "decision": decision.decision,
        "number": decision.number,
    }
    if decision.reason is not None:
        claims["reason"] = decision.reason
    claims["iat"] = int(now)
    return claims


def number_choices(approval: Mapping[str, Any]) -> list[str] | None:
    """The numbers offered in `choices` mode, else None (the person types the number)."""
    choices = approval.get("number_choices")
    if isinstance(choices, list) and choices:
        return [str(c) for c in choices]
    return None


def seconds_left(approval: Mapping[str, Any], now: float) -> float | None:
    """Seconds until the approval expires (at least 0); None if `expires_at` is unreadable."""
    raw = approval.get("expires_at")
    if not isinstance(raw, str):
        return None
    try:
        expires = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    if expires.tzinfo is None:
        return None
    return max(0.0, expires.timestamp() - now)


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff, full jitter: attempt n waits uniform(0, min(cap, base·2ⁿ))."""

    base: float = 0.5
    cap: float = 30.0

    def ceiling(self, attempt: int) -> float:
        """The largest delay allowed for the n-th consecutive failure (n starts at 0)."""
        # The exponent is clamped so huge attempt counts cannot overflow a float.
        return min(self.cap, self.base * 2.0 ** min(max(attempt, 0), 64))

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """A random delay in [0, ceiling(attempt)]; `rand` returns floats in [0, 1)."""
        return min(self.ceiling(attempt), max(0.0, rand() * self.ceiling(attempt)))


# Close codes after which reconnecting cannot help: the server rejected us, or we broke the
# protocol (retrying would loop). Anything else (1000, 1001, 1006, 1011, 1012, 1013, ...) is
# a restart, a deploy or a network drop, so the device reconnects.
CLOSE_UNAUTHORIZED = 4401
_FATAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010})


def close_is_fatal(code: int) -> bool:
    """Whether a close code ends the device session for good instead of reconnecting."""
    return code in _FATAL_CLOSE_CODES or 4000 <= code <= 4999


@dataclass(frozen=True)
class Passcode:
    """The offline passcode a phone shows: the code, and how long it stays current."""

    code: str
    seconds_left: int


def passcode_seed(given: object) -> str | None:
    """The base32 secret of a `passcode` object (enrollment answer, `passcode_seed` frame),
    if it has the parameters this phone computes with (6 digits, 30 s, SHA1)."""
    if not isinstance(given, Mapping):
        return None
    secret = given.get("secret")
    if (given.get("digits"), given.get("period"), given.get("algorithm")) != (6, 30, "SHA1"):
        return None
    if not isinstance(secret, str) or not secret:
        return None
    try:
        pyotp.TOTP(secret).at(0)
    except (ValueError, TypeError):
        return None
    return secret


def passcode_at(secret: str, now: float) -> Passcode:
    """The code of `secret` at `now` (RFC 6238: SHA1, 6 digits, 30 s) and its seconds left."""
    return Passcode(pyotp.TOTP(secret).at(now), math.ceil(30 - now % 30))
