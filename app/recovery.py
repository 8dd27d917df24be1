"""Recovery codes: issuing a set (account page, `tapprove user recovery-codes`) and signing
in with one after the password (`POST /api/login/recovery`), the way back after losing
every phone.

Each code works once. Wrong codes spend a budget of MAX_WRONG per account per WINDOW, taken
before the check (a burst of parallel guesses gets no more) and given back when right.
Using one mails the owner (`account_recovery`, method `recovery_code`).
"""

from __future__ import annotations

import hmac

from sqlmodel.ext.asyncio.session import AsyncSession

from app.approval.model import ApprovalContext
from app.core import recovery_codes
from app.core.errors import ApiError
from app.core.tokens import b64url, b64url_decode
from app.db import audit
from app.db import recovery_codes as stored
from app.db.hashing import run_hashing
from app.db.models import User
from app.delivery import notices, outbox
from app.services import Services

MAX_WRONG = 10
WINDOW = 3600

# Hashed when the account has no codes, so that costs the same time as having some.
_NO_SALT = bytes(recovery_codes.SALT_BYTES)


def _hash_all(codes: list[str], salt: bytes) -> list[bytes]:
    return [recovery_codes.code_hash(code, salt) for code in codes]


async def issue(session: AsyncSession, user_id: str, *, now: float) -> list[str]:
    """A new set of codes for the user, as shown once (`xxxxx-xxxxx`); the old set is gone.
    The caller commits."""
    codes = recovery_codes.new_set()
    salt = recovery_codes.new_salt()
    hashes = await run_hashing(_hash_all, codes, salt)
    await stored.replace_codes(session, user_id, salt, hashes, now=now)
    return [recovery_codes.shown(code) for code in codes]


async def sign_in_with_code(
    svc: Services, user: User, typed: str, *, context: ApprovalContext
) -> int:
    """Use up one of the user's codes (the password was checked); the codes left.
    400 `invalid_code` for a wrong, used or malformed code, 429 past the budget."""
    budget = svc.limits.user_key(user.id, "recovery-code", user.id)
    verdict = await svc.limits.hit(budget, limit=MAX_WRONG, window=WINDOW)
    if not verdict.allowed:
        raise ApiError(
            429,
            "rate_limited",
            "too many wrong recovery codes; wait before trying again",
            {"Retry-After": str(verdict.retry_after)},
        )
    code = recovery_codes.normalize(typed)
    now = svc.clock.now()
    async with svc.db() as db:
        unused = await stored.unused_codes(db, user.id)
        salts = {row.salt for row in unused} or {b64url(_NO_SALT)}
        used = None
        for salt in salts:
            # One hash per set (all of a set share its salt), compared with each of its codes.
            typed_hash = b64url(
                await run_hashing(recovery_codes.code_hash, code or "", b64url_decode(salt))
            )
            for row in unused:
                same = hmac.compare_digest(typed_hash.encode(), row.code_hash.encode())
                if same and row.salt == salt and code is not None and used is None:
                    used = row
        if used is None or not await stored.use_code(db, used.id, now=now):
            raise ApiError(400, "invalid_code", "that recovery code is not right")
        left = len(unused) - 1
        await audit.record(
            db,
            "login.recovery_code",
            user_id=user.id,
            ip=context.ip,
            detail={"codes_left": left},
            now=now,
        )
        notice = notices.account_recovery(
            svc.settings,
            db,
            user,
            method="recovery_code",
            context=context,
            codes_left=left,
            now=now,
        )
        await db.commit()
    await svc.limits.refund(budget)
    await outbox.kick(svc, notice.id)
    return left
