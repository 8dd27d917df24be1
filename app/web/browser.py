"""Routes a browser calls: sign-in, the approval stream, completion, sign-out, account."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Literal

from pydantic import Field
from pydantic.json_schema import SkipJsonSchema
from sqlmodel import select
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from app import metrics, passcodes, recovery
from app.approval import login as sign_in
from app.approval.errors import ApprovalError, Locked
from app.approval.model import PendingApproval, Status
from app.approval.rules import browser_binding
from app.approval.start import start_approval
from app.approval.waiting import Watch, watching
from app.core.clock import rfc3339, to_datetime
from app.core.errors import ApiError
from app.core.tokens import hash_token, new_id, new_token
from app.db import audit
from app.db.accounts import (
    InvalidAccountData,
    check_password,
    get_user_by_email,
    normalize_email,
)
from app.db.models import TrustedBrowser, User
from app.db.passkeys import has_passkey
from app.delivery.sms_codes import sms_phone
from app.services import Services
from app.store.ratelimit import Verdict
from app.web.common import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    TRUST_COOKIE,
    TRUST_DAYS,
    clear_cookie,
    client_ip,
    request_context,
    services,
    set_cookie,
)
from app.web.contract import (
    LOGIN,
    RATE_LIMITED,
    Answer,
    ApprovalStatus,
    Channel,
    Decision,
    Done,
    Match,
    Reason,
    Reply,
    Time,
    answer,
    answers,
    omitted_if_none,
)
from app.web.errors import StrictBody, read_body
from app.web.security import check_csrf, origin_allowed

FAILED_LOGIN_WINDOW = 15 * 60
FAILED_PER_ACCOUNT = 10
FAILED_PER_IP = 100


class LoginBody(StrictBody):
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)
    remember_browser: bool = False


class RecoveryLoginBody(StrictBody):
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)
    code: str = Field(min_length=1, max_length=64)


class LoginResult(Answer):
    """The answer to a password: signed in, a first device to enroll, or an approval to wait
    for (the members after `status` only then)."""

    status: Literal["authenticated", "enrollment_required", "approval_required"]
    approval_id: str | SkipJsonSchema[None] = omitted_if_none()
    number: str | SkipJsonSchema[None] = omitted_if_none()
    match: Match | SkipJsonSchema[None] = omitted_if_none()
    expires_at: Time | SkipJsonSchema[None] = omitted_if_none()
    channels: list[Channel] | SkipJsonSchema[None] = omitted_if_none()
    stream: str | SkipJsonSchema[None] = omitted_if_none("WebSocket path /ws/login/<id>")
    # Lets the page offer "Use an SMS code instead" only when it can work (an addition).
    sms_available: bool | SkipJsonSchema[None] = omitted_if_none()


class SignedIn(Answer):
    status: Literal["authenticated"]


class RecoverySignIn(Answer):
    status: Literal["authenticated"]
    recovery_codes_left: int = Field(ge=0)


class LoginStatus(Answer):
    approval_id: str
    status: ApprovalStatus
    channels: list[Channel]
    delivered: list[Channel]
    expires_at: Time
    reason: Reason


class Resent(Answer):
    status: Literal["resent"]
    resends_left: int = Field(ge=0)


_SIGNED_IN = ("Set-Cookie",)


async def _trusted_browser(svc: Services, request: Request) -> TrustedBrowser | None:
    token = request.cookies.get(TRUST_COOKIE)
    if not token or len(token) > 128:
        return None
    now = to_datetime(svc.clock.now())
    async with svc.db() as db:
        result = await db.exec(
            select(TrustedBrowser).where(
                TrustedBrowser.token_hash == hash_token(token),
                TrustedBrowser.revoked_at == None,  # noqa: E711
                TrustedBrowser.expires_at > now,
            )
        )
        return result.first()


async def _password_checked(
    svc: Services, request: Request, given_email: str, password: str, trusted: TrustedBrowser | None
) -> User:
    """The user whose email and password these are, past the failed-sign-in budgets, with
    a verified email and not locked; else the refusal (401, 403, 423 or 429)."""
    ip = client_ip(request)
    try:
        # The canonical form, so `A@EXAMPLE.com` and full-width spellings share one budget.
        email = normalize_email(given_email)
    except InvalidAccountData:
        email = given_email.strip().lower()
    async with svc.db() as db:
        user = await get_user_by_email(db, email)

    # Every attempt takes its place in the budgets before the password is checked, so a burst
    # of parallel guesses cannot all slip in; a correct password gives its places back.
    spent: list[str] = []
    verdicts: list[Verdict] = []
    for key, limit in (
        (svc.limits.key("login-failed", "account", hash_token(email)), FAILED_PER_ACCOUNT),
        (svc.limits.key("login-failed", "ip", ip), FAILED_PER_IP),
    ):
        verdicts.append(await svc.limits.hit(key, limit=limit, window=FAILED_LOGIN_WINDOW))
        if verdicts[-1].allowed:
            spent.append(key)
    if not all(v.allowed for v in verdicts):
        # A correct password from a browser this user trusts is let through a rate limit;
        # that browser has a budget of failures of its own, so a stolen trust cookie does not
        # buy unlimited guesses.
        trusted_through = False
        if user is not None and trusted is not None and trusted.user_id == user.id:
            browser_key = svc.limits.key("login-failed", "browser", trusted.id)
            verdicts.append(
                await svc.limits.hit(
                    browser_key, limit=FAILED_PER_ACCOUNT, window=FAILED_LOGIN_WINDOW
                )
            )
            if verdicts[-1].allowed:
                spent.append(browser_key)
                trusted_through = True
        if not trusted_through:
            for key in spent:
                await svc.limits.refund(key)
            retry = max(v.retry_after for v in verdicts)
            raise ApiError(
                429, "rate_limited", "too many failed sign-ins", {"Retry-After": str(retry)}
            )

    # Unknown emails spend the same argon2 work as known ones (no timing oracle).
    password_ok = await check_password(user, password)
    now = svc.clock.now()
    if user is None or not password_ok:
        async with svc.db() as db:
            await audit.record(
                db, "login.failed", user_id=user.id if user else None, ip=ip, now=now
            )
            await db.commit()
        raise ApiError(401, "invalid_credentials", "email or password is wrong")
    for key in spent:
        await svc.limits.refund(key)
    if not user.email_verified:
        raise ApiError(403, "email_not_verified", "confirm your email address first")
    if user.locked:
        raise Locked()
    return user


@answers(
    {
        200: Reply(
            "Signed in (trusted browser), or a restricted session to enroll a first device",
            LoginResult,
            headers=_SIGNED_IN,
        ),
        202: Reply(
            "Approval required; stream the result from `stream`",
            LoginResult,
            headers=_SIGNED_IN,
        ),
        401: "invalid_credentials (unknown email and wrong password alike)",
        403: "email_not_verified; recovery_required (every device is gone and no SMS code "
        "can be sent: the password alone cannot add one; a recovery code can, through "
        "POST /api/login/recovery); passkey_required (the account has a passkey and "
        "TAPPROVE_PASSKEY_ALLOWS_PUSH=false); or csrf",
        423: "locked after a fraud report",
        429: RATE_LIMITED,
    },
    body=LoginBody,
)
async def login(request: Request) -> Response:
    """POST /api/login: password check, then a trusted skip, enrollment, or an approval."""
    svc = services(request)
    check_csrf(request, svc.settings)
    body = await read_body(request, LoginBody)
    ip = client_ip(request)
    trusted = await _trusted_browser(svc, request)
    user = await _password_checked(svc, request, body.email, body.password, trusted)
    now = svc.clock.now()

    if trusted is not None and trusted.user_id == user.id:
        trusted_response = await _trusted_sign_in(svc, request, user, trusted)
        metrics.LOGINS.labels("authenticated").inc()  # refusals are counted in web.errors
        return trusted_response

    if await _passkey_required(svc, user):
        async with svc.db() as db:
            await audit.record(db, "login.passkey_required", user_id=user.id, ip=ip, now=now)
            await db.commit()
        raise ApiError(
            403,
            "passkey_required",
            "this account signs in with its passkey; without it, use a recovery code",
        )

    recipient = await svc.accounts.for_user(user)
    if not recipient.devices:
        if user.second_factor_at is None:
            # Never had a second factor: the password may enroll the very first device.
            token = await svc.sessions.create(user.id, restricted=True)
            async with svc.db() as db:
                await audit.record(db, "login.enrollment_required", user_id=user.id, ip=ip, now=now)
                await db.commit()
            response = answer(LoginResult(status="enrollment_required"))
            set_cookie(response, request, SESSION_COOKIE, token, None)
            metrics.LOGINS.labels("enrollment_required").inc()
            return response
        # Every device is gone. The password alone is not enough any more: an approval that
        # only an SMS code can answer (no device can), or a refusal that names the ways back.
        if await sms_phone(svc, user.id) is None:
            async with svc.db() as db:
                await audit.record(db, "login.recovery_required", user_id=user.id, ip=ip, now=now)
                await db.commit()
            raise ApiError(
                403,
                "recovery_required",
                "no phone is enrolled on this account any more, and a password alone cannot "
                "add one: sign in with a recovery code, or ask your administrator for a reset "
                "link",
            )

    login_token = new_token()
    approval = await start_approval(
        svc,
        recipient,
        kind="login",
        context=request_context(request),
        browser_binding=browser_binding(login_token),
        remember_browser=body.remember_browser,
    )
    required = LoginResult(
        status="approval_required",
        approval_id=approval.id,
        number=approval.number,
        match=Match.model_validate(approval.match.to_json()),
        expires_at=rfc3339(approval.expires_at),
        channels=approval.channels,
        stream=f"/ws/login/{approval.id}",
        sms_available=svc.providers.sms is not None and user.phone_verified and bool(user.phone),
    )
    response = answer(required, 202)
    set_cookie(response, request, LOGIN_COOKIE, login_token, svc.settings.approval_ttl + 300)
    metrics.LOGINS.labels("approval_required").inc()
    return response


async def _passkey_required(svc: Services, user: User) -> bool:
    """Whether the password may not lead to the phone for this user: passkeys may sign in
    on their own, an account with one must use it (TAPPROVE_PASSKEY_ALLOWS_PUSH=false), and
    this one has one. Only then is the database asked."""
    settings = svc.settings
    if settings.passkey_allows_push or not settings.passkey_login:
        return False
    async with svc.db() as db:
        return await has_passkey(db, user.id)


@answers(
    {
        200: Reply(
            "Signed in with the password and a recovery code (used up now); the session "
            "may add a phone once every phone is gone",
            RecoverySignIn,
            headers=_SIGNED_IN,
        ),
        400: "invalid_code (wrong, used or malformed recovery code)",
        401: "invalid_credentials (unknown email and wrong password alike)",
        403: "email_not_verified, or csrf",
        423: "locked after a fraud report",
        429: "rate_limited: the sign-in budgets, or 10 wrong codes per account an hour",
    },
    body=RecoveryLoginBody,
    description="An addition to PROTOCOL.md v1 (docs/protocol.md §2.4).",
)
async def recovery_login(request: Request) -> Response:
    """POST /api/login/recovery: the password and a recovery code sign in, once per code.

    The way back after losing every phone: no approval is asked for (the lost phone must
    not be the one to answer), the session lands on the account page to add a new phone,
    and the owner is mailed. Limits: the sign-in budgets of `POST /api/login`, then
    app.recovery's own for wrong codes.
    """
    svc = services(request)
    check_csrf(request, svc.settings)
    body = await read_body(request, RecoveryLoginBody)
    trusted = await _trusted_browser(svc, request)
    user = await _password_checked(svc, request, body.email, body.password, trusted)
    left = await recovery.sign_in_with_code(svc, user, body.code, context=request_context(request))
    token = await svc.sessions.create(user.id, approved_with_recovery_code=True)
    response = answer(RecoverySignIn(status="authenticated", recovery_codes_left=left))
    set_cookie(response, request, SESSION_COOKIE, token, None)
    metrics.LOGINS.labels("recovery_code").inc()
    return response


async def _trusted_sign_in(
    svc: Services, request: Request, user: User, trusted: TrustedBrowser
) -> Response:
    now = svc.clock.now()
    async with svc.db() as db:
        trusted.last_used_at = to_datetime(now)
        db.add(trusted)
        await audit.record(
            db,
            "login.trusted_browser",
            user_id=user.id,
            ip=client_ip(request),
            detail={"trusted_browser_id": trusted.id},
            now=now,
        )
        await db.commit()
    token = await svc.sessions.create(user.id)
    response = answer(LoginResult(status="authenticated"))
    set_cookie(response, request, SESSION_COOKIE, token, None)
    return response


@answers(
    {
        200: Reply("The approval's status, for clients without sockets", LoginStatus),
        403: "not_allowed: this browser did not start that sign-in",
        404: "not_found",
    },
    auth=LOGIN,
)
async def login_status(request: Request) -> Response:
    """GET /api/login/<id>: the stream's information as JSON, for clients without sockets."""
    approval, delivered = await sign_in.current_state(
        services(request), request.path_params["approval_id"], request.cookies.get(LOGIN_COOKIE)
    )
    state = LoginStatus(
        approval_id=approval.id,
        status=approval.status.value,
        channels=approval.channels,
        delivered=delivered,
        expires_at=rfc3339(approval.expires_at),
        reason=approval.final_reason,
    )
    return answer(state)


async def login_stream(websocket: WebSocket) -> None:
    """WS /ws/login/<id>: status, each delivery, then the result; refused without cookie+Origin."""
    svc = services(websocket)
    approval_id = websocket.path_params["approval_id"]
    try:
        await sign_in.browser_approval(svc, approval_id, websocket.cookies.get(LOGIN_COOKIE))
        allowed = origin_allowed(websocket, svc.settings)
    except ApprovalError:
        allowed = False
    if not allowed:
        await websocket.close()  # before accept: the client sees HTTP 403
        return
    await websocket.accept()
    closed = asyncio.Event()

    async def watch_client() -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
        closed.set()

    watcher = asyncio.create_task(watch_client())
    try:
        async with watching(svc, approval_id, deliveries=True) as watch:
            await _stream(svc, websocket, watch, closed)
    except WebSocketDisconnect:
        pass
    finally:
        watcher.cancel()


async def _stream(svc: Services, websocket: WebSocket, watch: Watch, closed: asyncio.Event) -> None:
    """The stream's frames: the state now, each delivery as it lands, then the result."""
    current = watch.approval
    if current is None:
        await websocket.close(1000)
        return
    if current.status is Status.PENDING:
        await websocket.send_json(
            {"type": "status", "status": "pending", "channels": current.channels}
        )
        for channel in await svc.approvals.delivered(current.id):
            await websocket.send_json({"type": "delivered", "channel": channel})
        while watch.pending and not closed.is_set():
            landed = await watch.next(60.0, stop=closed)
            if landed is not None:
                await websocket.send_json({"type": "delivered", "channel": landed})
    if watch.approval is not None and not watch.pending:
        await _send_result(websocket, watch.approval)


async def _send_result(websocket: WebSocket, ended: PendingApproval) -> None:
    if websocket.client_state is WebSocketState.CONNECTED:
        await websocket.send_json(
            {"type": "result", "status": ended.status.value, "reason": ended.final_reason}
        )
        await websocket.close(1000)


@answers(
    {
        200: Reply("Signed in (session cookie)", SignedIn, headers=_SIGNED_IN),
        403: "not_allowed",
        404: "not_found",
        409: "not_approved or already_completed",
    },
    auth=LOGIN,
)
async def complete(request: Request) -> Response:
    """POST /api/login/<id>/complete: turn an approved sign-in into a session, once."""
    svc = services(request)
    check_csrf(request, svc.settings)
    approval = await sign_in.complete(
        svc, request.path_params["approval_id"], request.cookies.get(LOGIN_COOKIE)
    )
    token = await svc.sessions.create(
        approval.user_id,
        # An SMS code is not a device: such a session may not add another device, only
        # replace the last one once every device is gone (app.core.enrollment).
        approved_with_device=approval.decided_by is not None,
        approved_with_sms=approval.reason == "sms_code",
        approval_id=approval.id,
    )
    now = svc.clock.now()
    response = answer(SignedIn(status="authenticated"))
    if approval.remember_browser:
        trust_token = new_token()
        context = approval.context
        async with svc.db() as db:
            db.add(
                TrustedBrowser(
                    id=new_id(),
                    user_id=approval.user_id,
                    token_hash=hash_token(trust_token),
                    user_agent=context.user_agent,
                    browser=context.browser,
                    os=context.os,
                    ip=context.ip,
                    created_at=to_datetime(now),
                    expires_at=to_datetime(now) + timedelta(days=TRUST_DAYS),
                )
            )
            await audit.record(
                db,
                "browser.trusted",
                user_id=approval.user_id,
                ip=client_ip(request),
                approval_id=approval.id,
                now=now,
            )
            await db.commit()
        set_cookie(response, request, TRUST_COOKIE, trust_token, TRUST_DAYS * 86400)
    async with svc.db() as db:
        await audit.record(
            db,
            "login.completed",
            user_id=approval.user_id,
            ip=client_ip(request),
            approval_id=approval.id,
            now=now,
        )
        await db.commit()
    # The login cookie stays: it binds only to this approval, and a second call must be told
    # `already_completed` rather than `not_allowed`.
    set_cookie(response, request, SESSION_COOKIE, token, None)
    metrics.LOGINS.labels("completed").inc()
    return response


async def _pending(request: Request) -> PendingApproval:
    """The pending approval named in the path, if this browser started it."""
    return await sign_in.pending_browser_approval(
        services(request), request.path_params["approval_id"], request.cookies.get(LOGIN_COOKIE)
    )


@answers(
    {
        202: Reply("Sent to the devices again", Resent),
        403: "not_allowed",
        404: "not_found",
        409: "already_decided",
        410: "expired",
        429: "rate_limited: at most 3 resends",
    },
    auth=LOGIN,
)
async def resend(request: Request) -> Response:
    """POST /api/login/<id>/resend: send the pending request to the devices again (3 times)."""
    svc = services(request)
    check_csrf(request, svc.settings)
    left = await sign_in.resend(svc, await _pending(request))
    return answer(Resent(status="resent", resends_left=left), 202)


class CodeBody(StrictBody):
    code: str = Field(min_length=1, max_length=32)


@answers(
    {
        202: Reply("An SMS code is on its way (`sms_sent`)", Done),
        403: "not_allowed",
        404: "not_found",
        409: "already_decided or sms_unavailable",
        410: "expired",
        429: RATE_LIMITED,
    },
    auth=LOGIN,
)
async def send_sms(request: Request) -> Response:
    """POST /api/login/<id>/sms: text a code to the user's verified phone."""
    svc = services(request)
    check_csrf(request, svc.settings)
    await sign_in.send_sms_code(svc, await _pending(request))
    return answer(Done(status="sms_sent"), 202)


@answers(
    {
        200: Reply("Approved with the SMS code", Decision),
        400: "invalid_code (after 5 the approval is denied)",
        403: "not_allowed",
        404: "not_found",
        409: "already_decided",
        410: "expired",
    },
    body=CodeBody,
    auth=LOGIN,
)
async def enter_code(request: Request) -> Response:
    """POST /api/login/<id>/code: approve with the SMS code; 5 wrong codes deny."""
    svc = services(request)
    check_csrf(request, svc.settings)
    approval = await _pending(request)
    body = await read_body(request, CodeBody)
    await sign_in.approve_with_code(svc, approval, body.code, client_ip(request))
    return answer(Decision(status="approved"))


@answers(
    {
        200: Reply("Approved with an offline passcode from the phone", Decision),
        400: "invalid_code (the same for every wrong code, and for a user without a "
        "device; after 5 on one approval it is denied, with status denied)",
        403: "not_allowed",
        404: "not_found",
        409: "already_decided",
        410: "expired",
        429: "rate_limited: 10 wrong passcodes per user in 15 minutes (with Retry-After)",
    },
    body=CodeBody,
    auth=LOGIN,
    description="An addition to PROTOCOL.md v1 (docs/protocol.md §3.6).",
)
async def enter_passcode(request: Request) -> Response:
    """POST /api/login/<id>/passcode: approve with an offline passcode from the phone."""
    svc = services(request)
    check_csrf(request, svc.settings)
    approval = await _pending(request)
    body = await read_body(request, CodeBody)
    await passcodes.approve_with_passcode(svc, approval, body.code, ip=client_ip(request))
    return answer(Decision(status="approved"))


@answers({200: Reply("The session has ended (`signed_out`)", Done)})
async def logout(request: Request) -> Response:
    """POST /api/logout: end the server-side session."""
    svc = services(request)
    check_csrf(request, svc.settings)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        session = await svc.sessions.get(token)
        await svc.sessions.delete(token)
        if session is not None:
            async with svc.db() as db:
                await audit.record(
                    db,
                    "logout",
                    user_id=session.user_id,
                    ip=client_ip(request),
                    now=svc.clock.now(),
                )
                await db.commit()
    response = answer(Done(status="signed_out"))
    clear_cookie(response, request, SESSION_COOKIE)
    return response


routes: list[BaseRoute] = [
    Route("/api/login", login, methods=["POST"]),
    Route("/api/login/recovery", recovery_login, methods=["POST"]),
    Route("/api/login/{approval_id}", login_status, methods=["GET"]),
    Route("/api/login/{approval_id}/complete", complete, methods=["POST"]),
    Route("/api/login/{approval_id}/resend", resend, methods=["POST"]),
    Route("/api/login/{approval_id}/sms", send_sms, methods=["POST"]),
    Route("/api/login/{approval_id}/code", enter_code, methods=["POST"]),
    Route("/api/login/{approval_id}/passcode", enter_passcode, methods=["POST"]),
    Route("/api/logout", logout, methods=["POST"]),
    WebSocketRoute("/ws/login/{approval_id}", login_stream),
]
