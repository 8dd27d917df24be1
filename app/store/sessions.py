"""Server-side sessions in Redis: the cookie holds a random token, Redis holds its hash."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import orjson
import redis.asyncio as aioredis

from app.core.clock import Clock
from app.core.tokens import hash_token, new_token
from app.store.redis import KeySpace

SESSION_TTL = 12 * 3600


@dataclass(frozen=True)
class Session:
    """Who is signed in, and how strongly."""

    user_id: str
    created_at: float
    # A restricted session may only enroll a first device and see the account page.
    restricted: bool = False
    # True when this sign-in was approved on an enrolled device (needed to add another one).
    approved_with_device: bool = False
    approval_id: str | None = None
    # True when this sign-in was approved with an SMS code to the verified number: with every
    # device gone, such a session may enroll one (app.core.enrollment).
    approved_with_sms: bool = False
    # True when the password was followed by a recovery code (a way back, like an SMS code).
    approved_with_recovery_code: bool = False
    # True for a passkey sign-in (WebAuthn, user verified; app.passkeys).
    signed_in_with_passkey: bool = False

    @property
    def signed_in_with(self) -> str:
        """How this session was proven, as the account page names it."""
        if self.signed_in_with_passkey:
            return "passkey"
        if self.approved_with_recovery_code:
            return "recovery_code"
        if self.approved_with_sms:
            return "sms_code"
        if self.approved_with_device:
            return "device"
        return "password" if self.restricted else "trusted_browser"


class SessionStore:
    """Create, read and revoke sessions."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, clock: Clock) -> None:
        self._redis = redis
        self._keys = keys
        self._clock = clock

    async def create(
        self,
        user_id: str,
        *,
        restricted: bool = False,
        approved_with_device: bool = False,
        approval_id: str | None = None,
        approved_with_sms: bool = False,
        approved_with_recovery_code: bool = False,
        signed_in_with_passkey: bool = False,
    ) -> str:
        """Start a session and return the cookie value."""
        token = new_token()
        session = Session(
            user_id,
            self._clock.now(),
            restricted,
            approved_with_device,
            approval_id,
            approved_with_sms,
            approved_with_recovery_code=approved_with_recovery_code,
            signed_in_with_passkey=signed_in_with_passkey,
        )
        token_hash = hash_token(token)
        # Not a transaction: the two keys are in different slots on a Redis Cluster. If
        # either write fails, the caller fails and the token is never handed out.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._keys.session(token_hash), orjson.dumps(asdict(session)), ex=SESSION_TTL)
            pipe.sadd(self._keys.user_sessions(user_id), token_hash)
            pipe.expire(self._keys.user_sessions(user_id), SESSION_TTL)
            await pipe.execute()
        return token

    async def get(self, token: str | None) -> Session | None:
        if not token or len(token) > 128:
            return None
        raw = await self._redis.get(self._keys.session(hash_token(token)))
        if raw is None:
            return None
        return Session(**orjson.loads(raw))

    async def delete(self, token: str) -> None:
        token_hash = hash_token(token)
        raw = await self._redis.getdel(self._keys.session(token_hash))
        if raw is not None:
            user_id = orjson.loads(raw)["user_id"]
            await self._redis.srem(self._keys.user_sessions(user_id), token_hash)

    async def revoke_user(self, user_id: str) -> None:
        """End every session of a user (after a fraud report, say)."""
        hashes: set[str] = await self._redis.smembers(self._keys.user_sessions(user_id))  # type: ignore[assignment]
        if hashes:
            await self._redis.delete(*(self._keys.session(h) for h in hashes))
        await self._redis.delete(self._keys.user_sessions(user_id))
