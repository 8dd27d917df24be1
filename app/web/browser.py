"""Routes a browser calls: sign-in, the approval stream, completion, sign-out, account."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from datetime import timedelta
from typing import Any

import orjson
from pydantic import Field
from sqlmodel import select
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from app import metrics
from app.approval_flow import raise_if_final, start_approval
from app.core.approvals import PendingApproval, Status
from app.core.clock import rfc3339, to_datetime
from app.core.errors import ApiError
from app.core.tokens import hash_token, new_id, new_token, same_secret
from app.db import audit
from app.db.accounts import (
    InvalidAccountData,
    check_password,
    get_user_by_email,
    normalize_email,
)
from app.db.models import TrustedBrowser, User
from app.delivery.sms_codes import sms_phone
from app.services import Services
from app.store.events import RECONNECTED
from app.store.ratelimit import Verdict
from app.web.common import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    TRUST_COOKIE,
    TRUST_DAYS,
    clear_cookie,
    client_ip,
    json,
    request_context,
    services,
    set_cookie,
)
from app.web.errors import StrictBody, read_body
from app.web.security import check_csrf, origin_allowed

FAILED_LOGIN_WINDOW = 15 * 60
FAILED_PER_ACCOUNT = 10
FAILED_PER_IP = 100
MAX_RESENDS = 3


class LoginBody(StrictBody):
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)
    remember_browser: bool = False


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


async def login(request: Request) -> Response:
    """POST /api/login: password check, then a trusted skip, enrollment, or an approval."""
    svc = services(request)
    check_csrf(request, svc.settings)
    body = await read_body(request, LoginBody)
    ip = client_ip(request)
    try:
        # The canonical form, so `A@EXAMPLE.com` and full-width spellings share one budget.
        email = normalize_email(body.email)
    except InvalidAccountData:
        email = body.email.strip().lower()
    trusted = await _trusted_browser(svc, request)
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
    password_ok = await check_password(user, body.password)
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
        raise ApiError(423, "locked", "sign-in is locked after a fraud report; contact support")

    if trusted is not None and trusted.user_id == user.id:
        trusted_response = await _trusted_sign_in(svc, request, user, trusted)
        metrics.LOGINS.labels("authenticated").inc()  # refusals are counted in web.errors
        return trusted_response

    recipient = await svc.accounts.for_user(user)
    if not recipient.devices:
        if user.second_factor_at is None:
            # Never had a second factor: the password may enroll the very first device.
            token = await svc.sessions.create(user.id, restricted=True)
            async with svc.db() as db:
                await audit.record(
                    db, "login.enrollment_required", user_id=user.id, ip=ip, now=now
                )
                await db.commit()
            response = json({"status": "enrollment_required"})
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
                "add one: ask your administrator for a reset link",
            )

    login_token = new_token()
    approval = await start_approval(
        svc,
        recipient,
        kind="login",
        context=request_context(request),
        browser_binding=hash_token(login_token),
        remember_browser=body.remember_browser,
    )
    response = json(
        {
            "status": "approval_required",
            "approval_id": approval.id,
            "number": approval.number,
            "match": approval.match.to_json(),
            "expires_at": rfc3339(approval.expires_at),
            "channels": approval.channels,
            "stream": f"/ws/login/{approval.id}",
            # Lets the page offer "Use an SMS code instead" only when it can work.
            "sms_available": svc.providers.sms is not None
            and user.phone_verified
            and bool(user.phone),
        },
        status=202,
    )
    set_cookie(response, request, LOGIN_COOKIE, login_token, svc.settings.approval_ttl + 300)
    metrics.LOGINS.labels("approval_required").inc()
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
    response = json({"status": "authenticated"})
    set_cookie(response, request, SESSION_COOKIE, token, None)
    return response


def _bound_to_browser(approval: PendingApproval | None, login_cookie: str | None) -> bool:
    return (
        approval is not None
        and approval.browser_binding is not None
        and login_cookie is not None
        and len(login_cookie) <= 128
        and same_secret(hash_token(login_cookie), approval.browser_binding)
    )


async def _delivered(svc: Services, approval_id: str) -> list[str]:
    raw = await svc.redis.hget(svc.keys.approval(approval_id), "delivered")
    found: list[str] = orjson.loads(raw) if raw else []
    return found


async def _browser_approval(request: Request) -> PendingApproval:
    """The approval named in the path, if this browser holds its `tapprove_login` cookie."""
    svc = services(request)
    approval = await svc.approvals.get(request.path_params["approval_id"])
    if approval is None:
        raise ApiError(404, "not_found", "no such approval")
    if not _bound_to_browser(approval, request.cookies.get(LOGIN_COOKIE)):
        raise ApiError(403, "not_allowed", "this browser did not start that sign-in")
    return approval


async def _pending_browser_approval(request: Request) -> PendingApproval:
    svc = services(request)
    approval = await _browser_approval(request)
    past_deadline = approval.expires_at <= svc.clock.now()
    raise_if_final(Status.EXPIRED if past_deadline else approval.status)
    return approval


async def login_status(request: Request) -> Response:
    """GET /api/login/<id>: the stream's information as JSON, for clients without sockets."""
    svc = services(request)
    approval = await _browser_approval(request)
    if approval.status is Status.PENDING and approval.expires_at <= svc.clock.now():
        await svc.approvals.expire_if_due(approval.id)
        approval = await _browser_approval(request)
    return json(
        {
            "approval_id": approval.id,
            "status": approval.status.value,
            "channels": approval.channels,
            "delivered": await _delivered(svc, approval.id),
            "expires_at": rfc3339(approval.expires_at),
            "reason": approval.final_reason,
        }
    )


async def login_stream(websocket: WebSocket) -> None:
    """WS /ws/login/<id>: status, each delivery, then the result; refused without cookie+Origin."""
    svc = services(websocket)
    approval_id = websocket.path_params["approval_id"]
    approval = await svc.approvals.get(approval_id)
    if not origin_allowed(websocket, svc.settings) or not _bound_to_browser(
        approval, websocket.cookies.get(LOGIN_COOKIE)
    ):
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
    # One queue hears both: each delivery (a channel of its own) and the end (the waiters).
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    try:
        async with (
            svc.events.subscribe(queue.put_nowait, svc.keys.delivery_channel(approval_id)),
            svc.waiters.watch(approval_id, queue.put_nowait) as current,
        ):
            if current is None:
                await websocket.close(1000)
                return
            if current.status is not Status.PENDING:
                await _send_result(websocket, current)
                return
            await websocket.send_json(
                {"type": "status", "status": "pending", "channels": current.channels}
            )
            for channel in await _delivered(svc, approval_id):
                await websocket.send_json({"type": "delivered", "channel": channel})
            ended = await _relay_until_final(svc, websocket, queue, current, closed)
            if ended is not None:
                await _send_result(websocket, ended)
    except WebSocketDisconnect:
        pass
    finally:
        watcher.cancel()


async def _relay_until_final(
    svc: Services,
    websocket: WebSocket,
    queue: asyncio.Queue[dict[str, Any]],
    approval: PendingApproval,
    closed: asyncio.Event,
) -> PendingApproval | None:
    """The approval once it has ended (None if the browser left first), relaying each
    delivery meanwhile."""
    while not closed.is_set():
        until_deadline = approval.expires_at - svc.clock.now()
        if until_deadline <= 0:
            status = await svc.approvals.expire_if_due(approval.id)
            if status is not None and status is not Status.PENDING:
                # Read for the reason it ended with (this call's or another's).
                return await svc.approvals.get(approval.id) or replace(approval, status=status)
            until_deadline = 0.5
        getter = asyncio.ensure_future(queue.get())
        closer = asyncio.ensure_future(closed.wait())
        done, _ = await asyncio.wait(
            {getter, closer}, timeout=until_deadline + 0.05, return_when=asyncio.FIRST_COMPLETED
        )
        for task in (getter, closer):
            if task not in done:
                task.cancel()
        if getter not in done:
            continue
        event = getter.result()
        if event is RECONNECTED:
            latest = await svc.approvals.get(approval.id)
            if latest is not None and latest.status is not Status.PENDING:
                return latest
        elif event.get("type") == "delivered":
            await websocket.send_json(event)
        elif event.get("type") == "result":
            # The event carries status, time and reason; an older one without is read.
            ended = approval.ended(event) or await svc.approvals.get(approval.id)
            if ended is not None and ended.status is not Status.PENDING:
                return ended
    return None


async def _send_result(websocket: WebSocket, ended: PendingApproval) -> None:
    if websocket.client_state is WebSocketState.CONNECTED:
        await websocket.send_json(
            {"type": "result", "status": ended.status.value, "reason": ended.final_reason}
        )
        await websocket.close(1000)


async def complete(request: Request) -> Response:
    """POST /api/login/<id>/complete: turn an approved sign-in into a session, once."""
    svc = services(request)
    check_csrf(request, svc.settings)
    approval = await svc.approvals.get(request.path_params["approval_id"])
    if approval is None or approval.kind != "login":
        raise ApiError(404, "not_found", "no such approval")
    if not _bound_to_browser(approval, request.cookies.get(LOGIN_COOKIE)):
        raise ApiError(403, "not_allowed", "this browser did not start that sign-in")
    outcome = await svc.approvals.complete(approval.id)
    if outcome == "not_approved":
        raise ApiError(
            409,
            "not_approved",
            "the sign-in was not approved",
            extra={"status": approval.status.value},
        )
    if outcome == "already_completed":
        raise ApiError(409, "already_completed", "this sign-in was already completed")
    if outcome == "not_found":
        raise ApiError(404, "not_found", "no such approval")
    token = await svc.sessions.create(
        approval.user_id,
        # An SMS code is not a device: such a session may not add another device, only
        # replace the last one once every device is gone (app.core.enrollment).
        approved_with_device=approval.decided_by is not None,
        approved_with_sms=approval.reason == "sms_code",
        approval_id=approval.id,
    )
    now = svc.clock.now()
    response = json({"status": "authenticated"})
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


async def resend(request: Request) -> Response:
    """POST /api/login/<id>/resend: send the pending request to the devices again (3 times)."""
    from app.delivery import dispatch

    svc = services(request)
    check_csrf(request, svc.settings)
    approval = await _pending_browser_approval(request)
    count = await svc.redis.hincrby(svc.keys.approval(approval.id), "resends", 1)
    if count > MAX_RESENDS:
        raise ApiError(
            429,
            "rate_limited",
            f"at most {MAX_RESENDS} resends per request",
            {"Retry-After": str(max(1, int(approval.expires_at - svc.clock.now())))},
        )
    await dispatch.resend(svc, approval)
    return json({"status": "resent", "resends_left": MAX_RESENDS - count}, status=202)


class CodeBody(StrictBody):
    code: str = Field(min_length=1, max_length=32)


async def send_sms(request: Request) -> Response:
    """POST /api/login/<id>/sms: text a code to the user's verified phone."""
    from app.delivery.sms_codes import request_code

    svc = services(request)
    check_csrf(request, svc.settings)
    approval = await _pending_browser_approval(request)
    verdict = await svc.limits.hit(
        svc.limits.key("login-sms", approval.id), limit=3, window=svc.settings.approval_ttl + 60
    )
    if not verdict.allowed:
        raise ApiError(
            429,
            "rate_limited",
            "at most 3 SMS codes per sign-in",
            {"Retry-After": str(verdict.retry_after)},
        )
    if not await request_code(svc, approval, automatic=False):
        raise ApiError(
            409, "sms_unavailable", "no verified phone number, SMS turned off, or not set up"
        )
    return json({"status": "sms_sent"}, status=202)


async def enter_code(request: Request) -> Response:
    """POST /api/login/<id>/code: approve with the SMS code; 5 wrong codes deny."""
    from app.delivery.sms_codes import check_code

    svc = services(request)
    check_csrf(request, svc.settings)
    approval = await _pending_browser_approval(request)
    body = await read_body(request, CodeBody)
    checked = await check_code(svc, approval, "".join(body.code.split()))
    if checked == "denied":
        raise ApiError(
            400,
            "invalid_code",
            "that code is not right; too many wrong codes, so the sign-in was denied",
            extra={"status": Status.DENIED.value},
        )
    if checked == "wrong":
        raise ApiError(400, "invalid_code", "that code is not right")
    audit_line = audit.line(
        "approval.decided",
        user_id=approval.user_id,
        approval_id=approval.id,
        ip=client_ip(request),
        detail={"status": "approved", "via": "sms_code"},
        now=svc.clock.now(),
    )
    result = await svc.approvals.decide(
        approval.id, Status.APPROVED, audit_line=audit_line, reason="sms_code"
    )
    if result.kind != "decided":
        raise_if_final(result.status or Status.EXPIRED)
    return json({"status": "approved"})


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
    response = json({"status": "signed_out"})
    clear_cookie(response, request, SESSION_COOKIE)
    return response


routes: list[BaseRoute] = [
    Route("/api/login", login, methods=["POST"]),
    Route("/api/login/{approval_id}", login_status, methods=["GET"]),
    Route("/api/login/{approval_id}/complete", complete, methods=["POST"]),
    Route("/api/login/{approval_id}/resend", resend, methods=["POST"]),
    Route("/api/login/{approval_id}/sms", send_sms, methods=["POST"]),
    Route("/api/login/{approval_id}/code", enter_code, methods=["POST"]),
    Route("/api/logout", logout, methods=["POST"]),
    WebSocketRoute("/ws/login/{approval_id}", login_stream),
]
