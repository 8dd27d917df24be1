"""One-time codes a person types: SMS sign-in codes and phone-number verification codes.

Only a keyed hash of a live code is kept: HMAC under a key derived from the server's secret
key (app.server_keys.KeyedHash), of the code and its subject so equal codes of two subjects
differ; a 6-digit code's plain hash would be undone by trying a million codes. Each check
counts an attempt in the same atomic step as the read, and a code is right only before its
expiry and within the allowed attempts, compared in constant time. Whether a new code
brings a new budget of attempts is the issuer's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from app.core.clock import Clock
from app.core.tokens import same_secret
from app.server_keys import KeyedHash
from app.store.lua import Script
from app.store.redis import KeySpace


@dataclass(frozen=True)
class CodeCheck:
    """How one attempt at a code went."""

    issued: bool  # a code was issued (and is kept) for this subject
    right: bool
    exhausted: bool  # not right, and no attempts are left
    data: str  # what the issuer kept with the code


class OneTimeCodes:
    """Issue and check codes; `purpose` keeps kinds of codes apart, `subject` names whose."""

    def __init__(
        self, redis: aioredis.Redis, keys: KeySpace, clock: Clock, mac: KeyedHash
    ) -> None:
        self._redis = redis
        self._mac = mac
        self._keys = keys
        self._clock = clock
        self._issue = Script(redis, "app.store", "code_issue")
        self._check = Script(redis, "app.store", "code_check")

    def _code_hash(self, subject: str, code: str) -> str:
        return self._mac(f"{subject}:{code}")

    def _key(self, purpose: str, subject: str) -> str:
        return self._keys("code", purpose, subject)

    async def issue(
        self,
        purpose: str,
        subject: str,
        code: str,
        *,
        life: float,
        keep: int,
        data: str = "",
        fresh_attempts: bool = True,
    ) -> None:
        """Keep `code` valid for `life` seconds (its attempts counted for `keep`), replacing
        any earlier one; `fresh_attempts=False` carries the attempts so far over to it."""
        await self._issue(
            {"code": self._key(purpose, subject)},
            {
                "code_hash": self._code_hash(subject, code),
                "expires_at": repr(self._clock.now() + life),
                "data": data,
                "keep": keep,
                "fresh_attempts": "1" if fresh_attempts else "0",
            },
        )

    async def check(
        self, purpose: str, subject: str, code: str, *, max_attempts: int, keep: int
    ) -> CodeCheck:
        """Count one attempt at `code`: right only while valid and within `max_attempts`."""
        attempts, stored, expires_at, data = await self._check(
            {"code": self._key(purpose, subject)}, {"keep": keep}
        )
        fresh = bool(stored) and float(expires_at) > self._clock.now()
        right = (
            fresh
            and int(attempts) <= max_attempts
            and same_secret(self._code_hash(subject, code), str(stored))
        )
        exhausted = not right and int(attempts) >= max_attempts
        return CodeCheck(issued=bool(stored), right=right, exhausted=exhausted, data=str(data))

    async def forget(self, purpose: str, subject: str) -> None:
        """Drop the subject's code and the attempts counted."""
        await self._redis.delete(self._key(purpose, subject))
