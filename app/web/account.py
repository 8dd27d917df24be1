"""The signed-in user's account: settings, trusted browsers, activity."""

from __future__ import annotations

from typing import Any, Literal

import orjson
import phonenumbers
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema
from sqlmodel import col, select
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from app import recovery
from app.audit_trail import recent_events
from app.core.clock import rfc3339, to_datetime
from app.core.errors import ApiError
from app.core.tokens import hash_token, new_numeric_code
from app.db import audit
from app.db.accounts import active_devices
from app.db.models import TrustedBrowser as TrustedBrowserRow
from app.db.models import User
from app.db.passkeys import user_passkeys
from app.db.recovery_codes import codes_left
from app.services import Services
from app.store.sessions import Session
from app.web.common import TRUST_COOKIE, client_ip, current_session, plausible_id, services
from app.web.contract import (
    RATE_LIMITED,
    SESSION,
    Answer,
    Done,
    Reply,
    Time,
    answer,
    answers,
    omitted_if_none,
)
from app.web.devices import Device
from app.web.errors import StrictBody, read_body
from app.web.passkeys import Passkey
from app.web.security import check_csrf


class AccountUpdate(StrictBody):
    sms_fallback: bool | None = None


class PhoneBody(StrictBody):
    phone: str = Field(min_length=2, max_length=32)


class PhoneCode(StrictBody):
    code: str = Field(min_length=1, max_length=32)


PHONE_CODE = "phone-verify"  # the one-time code store's purpose (app.store.codes)
PHONE_CODE_DIGITS = 6
PHONE_CODE_LIFE = 600
PHONE_CODE_ATTEMPTS = 5


class TrustedBrowser(Answer):
    id: str
    browser: str
    os: str
    ip: str
    created_at: Time
    last_used_at: Time | None
    expires_at: Time
    # The browser asking: the account page labels it "This browser".
    current: bool

    @classmethod
    def of(cls, browser: TrustedBrowserRow, trust_cookie: str | None) -> TrustedBrowser:
        return cls(
            id=browser.id,
            browser=browser.browser,
            os=browser.os,
            ip=browser.ip,
            created_at=rfc3339(browser.created_at),
            last_used_at=rfc3339(browser.last_used_at) if browser.last_used_at else None,
            expires_at=rfc3339(browser.expires_at),
            current=trust_cookie is not None and browser.token_hash == hash_token(trust_cookie),
        )


SignedInWith = Literal[
    "password", "device", "sms_code", "recovery_code", "passkey", "trusted_browser"
]


class Account(Answer):
    email: str
    phone: str | None
    phone_verified: bool
    sms_fallback: bool
    locked: bool
    devices: list[Device]
    trusted_browsers: list[TrustedBrowser]
    recovery_codes_left: int = Field(ge=0, le=10)
    passkeys: list[Passkey]
    passkeys_enabled: bool
    # GET only: what this session may do, and how it was proven.
    restricted: bool | SkipJsonSchema[None] = omitted_if_none()
    signed_in_with: SignedInWith | SkipJsonSchema[None] = omitted_if_none(
        "How this session was proven (GET only)"
    )


class RecoveryCodes(Answer):
    codes: list[str] = Field(
        min_length=10, json_schema_extra={"items": {"pattern": "^[0-9a-z]{5}-[0-9a-z]{5}$"}}
    )
    created_at: Time


class PhoneCodeSent(Answer):
    status: Literal["code_sent"]
    phone: str = Field(description="The number in E.164 form")


class PhoneVerified(Answer):
    status: Literal["verified"]
    phone: str


class AuditEvent(Answer):
    at: Time
    kind: str
    ip: str | None
    device_id: str | None
    approval_id: str | None
    detail: dict[str, Any]


class Activity(Answer):
    events: list[AuditEvent]


async def _account(
    svc: Services, user: User, request: Request, session: Session | None = None
) -> Account:
    """The account; with the `session` asking (GET), what it may do and how it was proven."""
    now = to_datetime(svc.clock.now())
    async with svc.db() as db:
        result = await db.exec(
            select(TrustedBrowserRow)
            .where(
                TrustedBrowserRow.user_id == user.id,
                TrustedBrowserRow.revoked_at == None,  # noqa: E711
                TrustedBrowserRow.expires_at > now,
            )
            .order_by(col(TrustedBrowserRow.created_at).desc())
        )
        browsers = list(result.all())
        recovery_codes_left = await codes_left(db, user.id)
        own_passkeys = await user_passkeys(db, user.id)
    trust_cookie = request.cookies.get(TRUST_COOKIE)
    return Account(
        email=user.email,
        phone=user.phone,
        phone_verified=user.phone_verified,
        sms_fallback=user.sms_fallback,
        locked=user.locked,
        devices=[Device.of(d) for d in await active_devices(svc.db, user.id)],
        trusted_browsers=[TrustedBrowser.of(b, trust_cookie) for b in browsers],
        recovery_codes_left=recovery_codes_left,
        passkeys=[Passkey.of(p) for p in own_passkeys],
        passkeys_enabled=svc.settings.passkey_login,
        restricted=session.restricted if session else None,
        signed_in_with=session.signed_in_with if session else None,
    )


async def _user(svc: Services, user_id: str) -> User:
    async with svc.db() as db:
        user = await db.get(User, user_id)
    if user is None:
        raise ApiError(401, "unauthorized", "sign in first")
    return user


@answers({200: Reply("The account", Account), 401: "unauthorized"}, auth=SESSION)
async def get_account(request: Request) -> Response:
    """GET /api/account."""
    svc = services(request)
    session = await current_session(request)
    return answer(await _account(svc, await _user(svc, session.user_id), request, session))


@answers(
    {
        200: Reply("The updated account (without restricted and signed_in_with)", Account),
        401: "unauthorized",
        403: "not_allowed",
    },
    body=AccountUpdate,
    auth=SESSION,
)
async def patch_account(request: Request) -> Response:
    """PATCH /api/account `{"sms_fallback": bool}`."""
    svc = services(request)
    check_csrf(request, svc.settings)
    session = await current_session(request, allow_restricted=False)
    body = await read_body(request, AccountUpdate)
    async with svc.db() as db:
        user = await db.get(User, session.user_id)
        if user is None:
            raise ApiError(401, "unauthorized", "sign in first")
        if body.sms_fallback is not None:
            user.sms_fallback = body.sms_fallback
        db.add(user)
        await audit.record(
            db,
            "account.updated",
            user_id=user.id,
            ip=client_ip(request),
            detail=body.model_dump(exclude_none=True),
            now=svc.clock.now(),
        )
        await db.commit()
    return answer(await _account(svc, user, request))


@answers(
    {200: Reply("Revoked (`revoked`)", Done), 401: "unauthorized", 404: "not_found"},
    auth=SESSION,
)
async def revoke_trusted_browser(request: Request) -> Response:
    """DELETE /api/account/trusted-browsers/<id>."""
    svc = services(request)
    check_csrf(request, svc.settings)
    session = await current_session(request, allow_restricted=False)
    browser_id = request.path_params["browser_id"]
    async with svc.db() as db:
        browser = await db.get(TrustedBrowserRow, browser_id) if plausible_id(browser_id) else None
        if browser is None or browser.user_id != session.user_id or browser.revoked_at:
            raise ApiError(404, "not_found", "no such trusted browser")
        browser.revoked_at = to_datetime(svc.clock.now())
        db.add(browser)
        await audit.record(
            db,
            "browser.untrusted",
            user_id=session.user_id,
            ip=client_ip(request),
            detail={"trusted_browser_id": browser.id},
            now=svc.clock.now(),
        )
        await db.commit()
    return answer(Done(status="revoked"))


@answers(
    {
        201: Reply("A new set of codes, shown only in this answer", RecoveryCodes),
        401: "unauthorized",
        403: "not_allowed: needs a sign-in approved on a phone, or with a passkey",
    },
    auth=SESSION,
    description="An addition to PROTOCOL.md v1 (docs/protocol.md §7).",
)
async def create_recovery_codes(request: Request) -> Response:
    """POST /api/account/recovery-codes: a new set of 10 recovery codes, shown only now.

    The old set stops working. Only a sign-in approved on a phone (or with a passkey) may
    make them: a session that got in with a recovery code must not mint itself ten more.
    """
    svc = services(request)
    check_csrf(request, svc.settings)
    session = await current_session(request, allow_restricted=False)
    if not (session.approved_with_device or session.signed_in_with_passkey):
        raise ApiError(
            403,
            "not_allowed",
            "new recovery codes need a sign-in approved on your phone, or with a passkey",
        )
    now = svc.clock.now()
    async with svc.db() as db:
        codes = await recovery.issue(db, session.user_id, now=now)
        await audit.record(
            db,
            "recovery_codes.created",
            user_id=session.user_id,
            ip=client_ip(request),
            detail={"by": "owner", "count": len(codes)},
            now=now,
        )
        await db.commit()
    return answer(RecoveryCodes(codes=codes, created_at=rfc3339(now)), 201)


def _e164(raw: str) -> str:
    try:
        number = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException:
        raise ApiError(
            422, "invalid_request", "phone: not an E.164 number like +15551234567"
        ) from None
    if not phonenumbers.is_valid_number(number):
        raise ApiError(422, "invalid_request", "phone: not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@answers(
    {
        202: Reply("A code was texted to the number", PhoneCodeSent),
        401: "unauthorized",
        409: "sms_unavailable",
        429: RATE_LIMITED,
        502: "sms_failed",
    },
    body=PhoneBody,
    auth=SESSION,
)
async def start_phone_verification(request: Request) -> Response:
    """POST /api/account/phone: text a code to a new number; it counts once verified."""
    svc = services(request)
    check_csrf(request, svc.settings)
    session = await current_session(request, allow_restricted=False)
    body = await read_body(request, PhoneBody)
    phone = _e164(body.phone)
    if svc.providers.sms is None:
        raise ApiError(409, "sms_unavailable", "SMS is not set up on this server")
    verdict = await svc.limits.hit(
        svc.limits.user_key(session.user_id, "phone-code", session.user_id),
        limit=5,
        window=3600,
    )
    if not verdict.allowed:
        raise ApiError(
            429,
            "rate_limited",
            "too many codes requested",
            {"Retry-After": str(verdict.retry_after)},
        )
    code = new_numeric_code(PHONE_CODE_DIGITS)
    await svc.codes.issue(
        PHONE_CODE,
        session.user_id,
        code,
        life=PHONE_CODE_LIFE,
        keep=PHONE_CODE_LIFE,
        data=phone,
    )
    result = await svc.providers.sms.send(phone, f"Your tapprove verification code is {code}.")
    if result.outcome != "accepted":
        raise ApiError(502, "sms_failed", "the SMS provider did not accept the message")
    return answer(PhoneCodeSent(status="code_sent", phone=phone), 202)


@answers(
    {200: Reply("The phone is verified", PhoneVerified), 400: "invalid_code", 401: "unauthorized"},
    body=PhoneCode,
    auth=SESSION,
)
async def verify_phone(request: Request) -> Response:
    """POST /api/account/phone/verify: confirm the number with the texted code."""
    svc = services(request)
    check_csrf(request, svc.settings)
    session = await current_session(request, allow_restricted=False)
    body = await read_body(request, PhoneCode)
    checked = await svc.codes.check(
        PHONE_CODE,
        session.user_id,
        body.code.strip(),
        max_attempts=PHONE_CODE_ATTEMPTS,
        keep=PHONE_CODE_LIFE,
    )
    if not checked.issued:
        raise ApiError(400, "invalid_code", "no code is pending; ask for a new one")
    if not checked.right:
        if checked.exhausted:
            await svc.codes.forget(PHONE_CODE, session.user_id)
        raise ApiError(400, "invalid_code", "that code is not right")
    await svc.codes.forget(PHONE_CODE, session.user_id)
    phone = checked.data
    async with svc.db() as db:
        user = await db.get(User, session.user_id)
        if user is None:
            raise ApiError(401, "unauthorized", "sign in first")
        user.phone = phone
        user.phone_verified = True
        db.add(user)
        await audit.record(
            db, "phone.verified", user_id=user.id, ip=client_ip(request), now=svc.clock.now()
        )
        await db.commit()
    return answer(PhoneVerified(status="verified", phone=phone))


@answers(
    {
        200: Reply("The user's recent audit events, newest first", Activity),
        401: "unauthorized",
    },
    auth=SESSION,
)
async def activity(request: Request) -> Response:
    """GET /api/account/activity: the user's recent audit events."""
    svc = services(request)
    session = await current_session(request)
    events = await recent_events(svc, session.user_id, limit=50)
    listed = [
        AuditEvent(
            at=rfc3339(e.at),
            kind=e.kind,
            ip=e.ip,
            device_id=e.device_id,
            approval_id=e.approval_id,
            detail=orjson.loads(e.detail or "{}"),
        )
        for e in events
    ]
    return answer(Activity(events=listed))


routes: list[BaseRoute] = [
    Route("/api/account", get_account, methods=["GET"]),
    Route("/api/account", patch_account, methods=["PATCH"]),
    Route("/api/account/trusted-browsers/{browser_id}", revoke_trusted_browser, methods=["DELETE"]),
    Route("/api/account/activity", activity, methods=["GET"]),
    Route("/api/account/recovery-codes", create_recovery_codes, methods=["POST"]),
    Route("/api/account/phone", start_phone_verification, methods=["POST"]),
    Route("/api/account/phone/verify", verify_phone, methods=["POST"]),
]
