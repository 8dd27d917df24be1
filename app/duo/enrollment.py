"""Duo's `enroll` and `enroll_status`, for integrations created with `--allow-enroll`:
an enrollment link for a user's very first device, and how that link stands.

The link is an ordinary `first_device` enrollment code (docs/enrollment.md): made only for a
verified, unlocked user who never had a second factor, and used only while that is still
true (checked again, atomically, when a phone uses it), so an integration can never add a
device to an account that has or had one. Duo's names map onto it:
- `activation_code`: the `tapprove://enroll?url=…&code=…` link (mobile_stub, native apps);
- `activation_url`: the `/phone` page with the code in its fragment (a phone's browser);
- `activation_barcode`: a QR code of `activation_url`, as a `data:image/png` URL.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, quote, urlsplit

import segno

from app.core.clock import to_datetime
from app.core.enrollment import enrollment_uri
from app.core.tokens import hash_token
from app.db import audit
from app.db.accounts import ENROLLMENT_CODE_TTL, create_enrollment_code, get_user_by_email
from app.db.models import EnrollmentCode, User
from app.duo.integrations import LiveIntegration
from app.services import Services

log = logging.getLogger(__name__)

EnrollStatus = Literal["success", "waiting", "invalid"]


@dataclass(frozen=True)
class Activation:
    """What `enroll` answers: Duo's fields for one enrollment link."""

    user_id: str
    username: str
    activation_code: str
    activation_url: str
    activation_barcode: str
    expiration: int
    valid_secs: int

    def v2(self) -> dict[str, object]:
        return {
            "activation_barcode": self.activation_barcode,
            "activation_code": self.activation_code,
            "activation_url": self.activation_url,
            "expiration": self.expiration,
            "user_id": self.user_id,
            "username": self.username,
            "valid_secs": self.valid_secs,
        }


def _barcode(url: str) -> str:
    buffer = io.BytesIO()
    segno.make(url, error="m").save(buffer, kind="png", scale=4, border=2)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


async def start(
    svc: Services,
    integration: LiveIntegration,
    email: str,
    username: str,
    *,
    valid_secs: int,
    ip: str,
) -> Activation | None:
    """An enrollment link for the first device of the user with this email, or None when
    there is no such user or they may not get one here (unverified, locked, or they have
    or had a second factor): one answer for all, so it says no more than it must."""
    now = svc.clock.now()
    ttl = max(1, min(valid_secs, ENROLLMENT_CODE_TTL))
    async with svc.db() as db:
        user = await get_user_by_email(db, email)
        if (
            user is None
            or not user.email_verified
            or user.locked
            or user.second_factor_at is not None
        ):
            return None
        code, expires_at = await create_enrollment_code(
            db, user.id, now=now, ttl=ttl, kind="first_device"
        )
        await audit.record(
            db,
            "device.enrollment_started",
            user_id=user.id,
            ip=ip,
            detail={"kind": "first_device", "requester": integration.name},
            now=now,
        )
        await db.commit()
        user_id = user.id
    log.info(
        "duo enroll for integration %s: a first-device link for user %s",
        integration.name,
        user_id,
        extra={"integration": integration.name, "user_id": user_id},
    )
    public_url = svc.settings.public_url
    phone_url = f"{public_url}/phone#enroll={quote(code, safe='')}"
    return Activation(
        user_id=user_id,
        username=username,
        activation_code=enrollment_uri(public_url, code),
        activation_url=phone_url,
        activation_barcode=_barcode(phone_url),
        expiration=int(expires_at),
        valid_secs=ttl,
    )


def code_of(activation_code: str) -> str:
    """The enrollment code in what `enroll` returned (the tapprove:// link or the /phone
    URL), or the text itself (a bare code)."""
    text = activation_code.strip()
    parts = urlsplit(text)
    if parts.scheme == "tapprove":
        return parse_qs(parts.query).get("code", [""])[0]
    if parts.scheme in ("http", "https"):
        return parse_qs(parts.fragment).get("enroll", [""])[0]
    return text


async def status(svc: Services, user_id: str, activation_code: str) -> EnrollStatus:
    """`success` once a phone used the link, `waiting` while it still can, `invalid` for a
    link that is not this user's, expired, or can no longer be used (the user got a
    device some other way)."""
    code = code_of(activation_code)
    if not code or len(code) > 200:
        return "invalid"
    async with svc.db() as db:
        row = await db.get(EnrollmentCode, hash_token(code))
        if row is None or row.user_id != user_id:
            return "invalid"
        if row.used_at is not None:
            return "success"
        if row.expires_at <= to_datetime(svc.clock.now()):
            return "invalid"
        user = await db.get(User, user_id)
    if user is None or (row.kind == "first_device" and user.second_factor_at is not None):
        return "invalid"
    return "waiting"
