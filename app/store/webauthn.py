"""WebAuthn challenges in Redis: single use, short-lived.

A challenge is 32 random bytes handed to the browser; Redis keeps what it is for (register
or sign in, and for whom) under the SHA-256 of the challenge, so a copy of Redis holds no
challenge that could be answered. The browser's answer names its challenge (clientDataJSON),
and taking it is one GETDEL: of two answers to one challenge, exactly one finds it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal

import orjson
import redis.asyncio as aioredis

from app.store.redis import KeySpace

CHALLENGE_BYTES = 32

Purpose = Literal["register", "login"]


@dataclass(frozen=True)
class Challenge:
    """What a challenge was issued for."""

    purpose: Purpose
    user_id: str | None  # the signed-in user a registration is for; None to sign in


class WebAuthnChallenges:
    """Issue a challenge, and take it back once."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace) -> None:
        self._redis = redis
        self._keys = keys

    def _key(self, challenge: bytes) -> str:
        return self._keys("webauthn", hashlib.sha256(challenge).hexdigest())

    async def issue(self, purpose: Purpose, *, user_id: str | None, ttl: int) -> bytes:
        """A fresh challenge, valid for `ttl` seconds."""
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        record = orjson.dumps({"purpose": purpose, "user_id": user_id})
        await self._redis.set(self._key(challenge), record, ex=ttl)
        return challenge

    async def take(self, challenge: bytes) -> Challenge | None:
        """What `challenge` was issued for, if it is live; it never is again."""
        raw = await self._redis.getdel(self._key(challenge))
        if raw is None:
            return None
        found = orjson.loads(raw)
        return Challenge(found["purpose"], found["user_id"])
