"""Passkey routes: the account page adds, renames and removes passkeys (session), and the
login page signs in with one (no session yet). The rules are app.passkeys'."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from app import metrics, passkeys
from app.core.clock import rfc3339
from app.core.errors import ApiError
from app.db import audit
from app.db import passkeys as stored
from app.db.models import Passkey as PasskeyRow
from app.db.models import User
from app.store.sessions import Session
from app.web.common import (
    SESSION_COOKIE,
    client_ip,
    current_session,
    plausible_id,
    request_context,
    services,
    set_cookie,
)
from app.web.contract import (
    SESSION,
    Answer,
    Done,
    Reply,
    Time,
    answer,
    answers,
)
from app.web.errors import StrictBody, read_body
from app.web.security import check_csrf

_B64 = 8192  # generous for base64url fields; the whole body is capped at 64 KiB anyway


class AttestationResponse(StrictBody):
    clientDataJSON: str = Field(min_length=1, max_length=_B64)
    attestationObject: str = Field(min_length=1, max_length=32768)


class AssertionResponse(StrictBody):
    clientDataJSON: str = Field(min_length=1, max_length=_B64)
    authenticatorData: str = Field(min_length=1, max_length=_B64)
    signature: str = Field(min_length=1, max_length=2048)
    userHandle: str | None = Field(default=None, max_length=512)


class NewCredential(StrictBody):
    """What `navigator.credentials.create()` gave, in WebAuthn's JSON form (base64url)."""

    id: str = Field(min_length=1, max_length=1400)
    rawId: str = Field(min_length=1, max_length=1400)
    type: Literal["public-key"]
    response: AttestationResponse


class Assertion(StrictBody):
    """What `navigator.credentials.get()` gave, in WebAuthn's JSON form (base64url)."""

    id: str = Field(min_length=1, max_length=1400)
    rawId: str = Field(min_length=1, max_length=1400)
    type: Literal["public-key"]
    response: AssertionResponse


class AddPasskeyBody(StrictBody):
    credential: NewCredential
    name: str | None = Field(default=None, min_length=1, max_length=100)


class PasskeySignInBody(StrictBody):
    credential: Assertion


class PasskeyRename(StrictBody):
    name: str = Field(min_length=1, max_length=100)


class Passkey(Answer):
    """A passkey as its owner sees it on the account page."""

    id: str
    name: str
    created_at: Time
    last_used_at: Time | None

    @classmethod
    def of(cls, passkey: PasskeyRow) -> Passkey:
        return cls(
            id=passkey.id,
            name=passkey.name,
            created_at=rfc3339(passkey.created_at),
            last_used_at=rfc3339(passkey.last_used_at) if passkey.last_used_at else None,
        )


class PasskeyOptions(Answer):
    publicKey: dict[str, Any] = Field(
        description="PublicKeyCredentialCreationOptions or ...RequestOptions in WebAuthn's "
        "JSON form (binary members base64url), for navigator.credentials"
    )


class PasskeySignedIn(Answer):
    status: Literal["authenticated"]


_ADDITION = "An addition to PROTOCOL.md v1 (docs/protocol.md §2.4, §2.5, §7)."


def _strong(session: Session) -> None:
    """Adding a passkey needs a sign-in approved on a phone, or with a passkey."""
    if not (session.approved_with_device or session.signed_in_with_passkey):
        raise ApiError(
            403,
            "not_allowed",
            "adding a passkey needs a sign-in approved on your phone, or with a passkey",
        )


async def _user(request: Request, session: Session) -> User:
    async with services(request).db() as db:
        user = await db.get(User, session.user_id)
    if user is None:
        raise ApiError(401, "unauthorized", "sign in first")
    return user


@answers(
    {
        200: Reply(
            "Options for navigator.credentials.create(): discoverable credential, user "
            "verification required, ES256 or RS256, the user's passkeys excluded",
            PasskeyOptions,
        ),
        401: "unauthorized",
        403: "not_allowed (needs a sign-in approved on a phone, or with a passkey), "
        "passkeys_disabled, or csrf",
    },
    auth=SESSION,
    description=_ADDITION,
)
async def registration_options(request: Request) -> Response:
    """POST /api/account/passkeys/options: options for `navigator.credentials.create()`."""
    svc = services(request)
    check_csrf(request, svc.settings)
    session = await current_session(request, allow_restricted=False)
    _strong(session)
    options = await passkeys.registration_options(svc, await _user(request, session))
    return answer(PasskeyOptions(publicKey=options))


@answers(
    {
        201: Reply("The passkey was added (the owner is mailed)", Passkey),
        400: "passkey_refused (expired or replayed challenge, another origin, no user "
        "verification, an algorithm other than ES256/RS256, a malformed answer)",
        401: "unauthorized",
        403: "not_allowed, passkeys_disabled, or csrf",
        409: "passkey_exists: this credential is already registered",
    },
    body=AddPasskeyBody,
    auth=SESSION,
    description=_ADDITION,
)
async def add_passkey(request: Request) -> Response:
    """POST /api/account/passkeys: keep the new passkey the browser made; the owner is mailed."""
    svc = services(request)
    check_csrf(request, svc.settings)
    session = await current_session(request, allow_restricted=False)
    _strong(session)
    body = await read_body(request, AddPasskeyBody)
    passkey = await passkeys.add(
        svc,
        await _user(request, session),
        body.credential.model_dump(exclude_none=True),
        body.name,
        context=request_context(request),
    )
    return answer(Passkey.of(passkey), 201)


async def _own_passkey(request: Request, session: Session) -> PasskeyRow:
    passkey_id = request.path_params["passkey_id"]
    async with services(request).db() as db:
        passkey = await db.get(PasskeyRow, passkey_id) if plausible_id(passkey_id) else None
    if passkey is None or passkey.user_id != session.user_id:
        raise ApiError(404, "not_found", "no such passkey")
    return passkey


@answers(
    {200: Reply("Renamed", Passkey), 401: "unauthorized", 404: "not_found"},
    body=PasskeyRename,
    auth=SESSION,
    description=_ADDITION,
)
async def rename_passkey(request: Request) -> Response:
    """PATCH /api/account/passkeys/<id> `{"name"}`."""
    svc = services(request)
    check_csrf(request, svc.settings)
    session = await current_session(request, allow_restricted=False)
    body = await read_body(request, PasskeyRename)
    passkey = await _own_passkey(request, session)
    async with svc.db() as db:
        passkey.name = body.name.strip() or passkey.name
        db.add(passkey)
        await audit.record(
            db,
            "passkey.renamed",
            user_id=session.user_id,
            ip=client_ip(request),
            detail={"passkey_id": passkey.id},
            now=svc.clock.now(),
        )
        await db.commit()
    return answer(Passkey.of(passkey))


@answers(
    {
        200: Reply("Removed: it no longer signs in (`removed`)", Done),
        401: "unauthorized",
        404: "not_found",
    },
    auth=SESSION,
    description=_ADDITION,
)
async def remove_passkey(request: Request) -> Response:
    """DELETE /api/account/passkeys/<id>: the passkey stops signing in at once."""
    svc = services(request)
    check_csrf(request, svc.settings)
    session = await current_session(request, allow_restricted=False)
    passkey = await _own_passkey(request, session)
    async with svc.db() as db:
        if not await stored.remove(db, session.user_id, passkey.id):
            raise ApiError(404, "not_found", "no such passkey")
        await audit.record(
            db,
            "passkey.removed",
            user_id=session.user_id,
            ip=client_ip(request),
            detail={"passkey_id": passkey.id, "name": passkey.name},
            now=svc.clock.now(),
        )
        await db.commit()
    return answer(Done(status="removed"))


# One page load asks for sign-in options (for conditional mediation), so they are cheap but
# counted: each keeps a challenge in Redis for a few minutes.
OPTIONS_PER_IP = 100
OPTIONS_WINDOW = 5 * 60


@answers(
    {
        200: Reply(
            "Options for a usernameless navigator.credentials.get() (a single-use "
            "challenge, 5 minutes, user verification required)",
            PasskeyOptions,
        ),
        403: "passkeys_disabled (TAPPROVE_PASSKEY_LOGIN=false), or csrf",
        429: "rate_limited: 100 per IP in 5 minutes (with Retry-After)",
    },
    description=_ADDITION,
)
async def login_options(request: Request) -> Response:
    """POST /api/login/passkey/options: options for a usernameless `navigator.credentials.get()`."""
    svc = services(request)
    check_csrf(request, svc.settings)
    passkeys.require_enabled(svc)
    verdict = await svc.limits.hit(
        svc.limits.key("passkey-options", client_ip(request)),
        limit=OPTIONS_PER_IP,
        window=OPTIONS_WINDOW,
    )
    if not verdict.allowed:
        raise ApiError(
            429,
            "rate_limited",
            "too many passkey sign-ins started from this address",
            {"Retry-After": str(verdict.retry_after)},
        )
    return answer(PasskeyOptions(publicKey=await passkeys.login_options(svc)))


@answers(
    {
        200: Reply(
            "Signed in with the passkey: no password, no phone (session cookie)",
            PasskeySignedIn,
            headers=("Set-Cookie",),
        ),
        400: "passkey_refused (expired, replayed or foreign challenge; another origin; "
        "unknown or removed passkey; a user handle not the owner's; a bad signature; a "
        "signature counter that went backwards, which is audited)",
        403: "passkeys_disabled, or csrf",
        423: "locked after a fraud report",
    },
    body=PasskeySignInBody,
    description=_ADDITION,
)
async def passkey_sign_in(request: Request) -> Response:
    """POST /api/login/passkey: a passkey's answer signs in, without password or phone."""
    svc = services(request)
    check_csrf(request, svc.settings)
    body = await read_body(request, PasskeySignInBody)
    credential: dict[str, Any] = body.credential.model_dump(exclude_none=True)
    user = await passkeys.sign_in(svc, credential, ip=client_ip(request))
    token = await svc.sessions.create(user.id, signed_in_with_passkey=True)
    response = answer(PasskeySignedIn(status="authenticated"))
    set_cookie(response, request, SESSION_COOKIE, token, None)
    metrics.LOGINS.labels("passkey").inc()
    return response


routes: list[BaseRoute] = [
    Route("/api/login/passkey/options", login_options, methods=["POST"]),
    Route("/api/login/passkey", passkey_sign_in, methods=["POST"]),
    Route("/api/account/passkeys/options", registration_options, methods=["POST"]),
    Route("/api/account/passkeys", add_passkey, methods=["POST"]),
    Route("/api/account/passkeys/{passkey_id}", rename_passkey, methods=["PATCH"]),
    Route("/api/account/passkeys/{passkey_id}", remove_passkey, methods=["DELETE"]),
]
