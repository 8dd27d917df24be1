"""Registration and email verification (PROTOCOL §1): register, confirm page, confirm, resend.

Every answer about an address is the same whether or not it is registered; the mail the
owner gets differs, and the request only queues it (outbox), so the timing does not tell.
"""

from __future__ import annotations

from functools import lru_cache

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from app.core.errors import ApiError
from app.core.tokens import hash_token
from app.db import audit
from app.db.accounts import (
    DuplicateUser,
    InvalidAccountData,
    create_user,
    get_user_by_email,
    normalize_email,
    validate_password,
)
from app.delivery.outbox import kick
from app.services import Services
from app.verification import confirm, issue_verification, notify_existing_account, publish
from app.web.common import client_ip, services
from app.web.contract import HTML, Done, Query, Reply, answer, answers
from app.web.errors import StrictBody, read_body

# Mails one address may receive (verification or "account exists"): per minute and per day.
MAILS_PER_MINUTE = 1
MAILS_PER_DAY = 10
# Resend requests one IP may make per hour, whatever the addresses.
RESENDS_PER_IP_HOUR = 30
# Registrations, as (calls, window seconds). A person registers once, and retries after a
# typo or a lost mail fit well within 5 an hour for one address; 20 per IP in 15 minutes
# covers a household or small office behind one address, while a burst of fresh addresses
# (a mail and an argon2 hash each) stops there. Bulk onboarding is `tapprove user import`.
REGISTRATIONS_PER_ADDRESS = (5, 3600)
REGISTRATIONS_PER_IP = (20, 15 * 60)
# Tokens are 43 characters; anything far longer is not one of ours.
MAX_TOKEN_LENGTH = 256

SENT = Done(status="verification_sent")
_SENT = Reply("Accepted (the same answer for known and unknown addresses)", Done)


class RegisterBody(StrictBody):
    email: str
    password: str


class TokenBody(StrictBody):
    token: str


class EmailBody(StrictBody):
    email: str


def _invalid(exc: InvalidAccountData) -> ApiError:
    return ApiError(422, "invalid_request", f"{exc.field}: {exc.message}")


async def _mail_allowed(svc: Services, email: str) -> bool:
    """Spend one mail from the address's budget; False once it is used up."""
    address = hash_token(email)  # no plain addresses in Redis key names
    for window, limit in ((60, MAILS_PER_MINUTE), (86_400, MAILS_PER_DAY)):
        key = svc.limits.key("mail", str(window), address)
        if not (await svc.limits.hit(key, limit=limit, window=window)).allowed:
            return False
    return True


async def _registration_allowed(svc: Services, kind: str, who: str, limit: tuple[int, int]) -> None:
    """Spend one registration from `who`'s budget, or 429 `rate_limited`."""
    calls, window = limit
    key = svc.limits.key("register", kind, who)
    verdict = await svc.limits.hit(key, limit=calls, window=window)
    if not verdict.allowed:
        raise ApiError(
            429,
            "rate_limited",
            "too many registrations; try again later",
            {"Retry-After": str(verdict.retry_after)},
        )


@answers(
    {
        202: _SENT,
        422: "invalid_request: malformed email or a password under 8 characters",
        429: "rate_limited (with Retry-After): too many for this address or this IP "
        "(an addition to PROTOCOL.md v1)",
    },
    body=RegisterBody,
)
async def register(request: Request) -> Response:
    """POST /api/register: 202 for new and taken addresses alike, 429 past either budget."""
    svc = services(request)
    body = await read_body(request, RegisterBody)
    ip = client_ip(request)
    await _registration_allowed(svc, "ip", ip, REGISTRATIONS_PER_IP)
    try:
        email = normalize_email(body.email)
        validate_password(body.password)
    except InvalidAccountData as exc:
        raise _invalid(exc) from None
    # Counted for the address whether or not it is registered: the same answers either way.
    await _registration_allowed(svc, "address", hash_token(email), REGISTRATIONS_PER_ADDRESS)
    now = svc.clock.now()
    # Both paths spend the address's mail budget, hash the password (in create_user), and
    # write one outbox row: the same work, so the same time.
    allowed = await _mail_allowed(svc, email)
    try:
        async with svc.db.begin() as session:
            user = await create_user(session, email, password=body.password, now=now)
            message = await issue_verification(session, user, settings=svc.settings, now=now)
            await audit.record(session, "user.registered", user_id=user.id, ip=ip, now=now)
    except DuplicateUser:
        await _notify_existing(svc, email, ip=ip, now=now, send=allowed)
        return answer(SENT, 202)
    await kick(svc, message.id)
    await publish(svc, "user.registered", user_id=user.id, email=user.email)
    return answer(SENT, 202)


async def _notify_existing(svc: Services, email: str, *, ip: str, now: float, send: bool) -> None:
    message = None
    async with svc.db.begin() as session:
        user = await get_user_by_email(session, email)
        if user is None:  # deleted in between; nothing to tell anyone
            return
        if send:
            message = notify_existing_account(session, user, now=now)
        await audit.record(
            session,
            "user.register_existing",
            user_id=user.id,
            ip=ip,
            now=now,
            detail={"notified": send},
        )
    if message is not None:
        await kick(svc, message.id)


@lru_cache(maxsize=1)
def _pages() -> Environment:
    return Environment(
        loader=PackageLoader("app", "templates/pages"),
        autoescape=select_autoescape(default=True),
    )


@answers(
    {
        200: Reply(
            "A page whose button confirms; opening it changes nothing",
            schema={"type": "string"},
            media=HTML,
        )
    },
    query=(Query("token", "The token from the mailed link", {"type": "string"}),),
    store=False,
)
async def verify_page(request: Request) -> Response:
    """GET /verify-email?token=T: a page whose button confirms; opening it changes nothing."""
    token = request.query_params.get("token", "")
    if len(token) > MAX_TOKEN_LENGTH:
        token = ""
    html = _pages().get_template("verify_email.html").render(token=token)
    # no-referrer: the token in this URL must not travel to the stylesheet or anywhere else.
    return HTMLResponse(
        html, headers={"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
    )


@answers(
    {
        200: Reply("Verified", Done),
        400: "invalid_or_expired_token (unknown, expired and used alike)",
    },
    body=TokenBody,
)
async def verify_email(request: Request) -> Response:
    """POST /api/verify-email: use the token once; does not sign the user in."""
    svc = services(request)
    body = await read_body(request, TokenBody)
    invalid = ApiError(400, "invalid_or_expired_token", "this link is invalid, expired or used")
    if not body.token or len(body.token) > MAX_TOKEN_LENGTH:
        raise invalid
    now = svc.clock.now()
    async with svc.db.begin() as session:
        token = await confirm(session, body.token, now=now)
        if token is None:
            raise invalid
        await audit.record(
            session, "user.email_verified", user_id=token.user_id, ip=client_ip(request), now=now
        )
    await publish(svc, "user.verified", user_id=token.user_id)
    return answer(Done(status="verified"))


@answers({202: _SENT}, body=EmailBody)
async def resend(request: Request) -> Response:
    """POST /api/verify-email/resend: 202 always; a fresh link goes out within the limits."""
    svc = services(request)
    body = await read_body(request, EmailBody)
    try:
        email = normalize_email(body.email)
    except InvalidAccountData:
        return answer(SENT, 202)
    ip_key = svc.limits.key("resend", "ip", client_ip(request))
    by_ip = await svc.limits.hit(ip_key, limit=RESENDS_PER_IP_HOUR, window=3600)
    # Limits are silent: "202 always" must not turn into an oracle for anything.
    if by_ip.allowed and await _mail_allowed(svc, email):
        # The worker looks the address up, so known and unknown ones cost the request the same.
        await publish(svc, "verification.requested", email=email)
    return answer(SENT, 202)


routes: list[BaseRoute] = [
    Route("/api/register", register, methods=["POST"]),
    Route("/verify-email", verify_page, methods=["GET"]),
    Route("/api/verify-email", verify_email, methods=["POST"]),
    Route("/api/verify-email/resend", resend, methods=["POST"]),
]
