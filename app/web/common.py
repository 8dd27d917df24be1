"""Helpers every route module shares: services, caller identity, context, cookies."""

from __future__ import annotations

from functools import lru_cache

from sqlmodel import select
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from app.approval.model import ApprovalContext
from app.core.errors import ApiError
from app.core.tokens import hash_token
from app.db.models import Device
from app.services import Services
from app.store.sessions import Session

SESSION_COOKIE = "tapprove_session"
LOGIN_COOKIE = "tapprove_login"
TRUST_COOKIE = "tapprove_trust"
TRUST_DAYS = 30


def services(conn: HTTPConnection) -> Services:
    """The Services of the app serving this request."""
    found: Services = conn.app.state.services
    return found


def client_ip(conn: HTTPConnection) -> str:
    """The caller's IP as uvicorn saw it (proxy headers are resolved by uvicorn's settings)."""
    return conn.client.host if conn.client else ""


@lru_cache(maxsize=4096)
def _browser_and_os(user_agent: str) -> tuple[str, str]:
    from ua_parser import parse

    result = parse(user_agent)
    browser = result.user_agent.family if result.user_agent else "Unknown"
    os_name = result.os.family if result.os else "Unknown"
    if result.user_agent and result.user_agent.major:
        browser = f"{browser} {result.user_agent.major}"
    return browser, os_name


def request_context(conn: HTTPConnection, extra: dict[str, str] | None = None) -> ApprovalContext:
    """What the phone shows about the sign-in: IP, user agent, browser, OS."""
    user_agent = conn.headers.get("user-agent", "")[:512]
    browser, os_name = _browser_and_os(user_agent) if user_agent else ("Unknown", "Unknown")
    ip = client_ip(conn)
    if extra:
        ip = extra.get("ip", ip)[:64]
        user_agent = extra.get("user_agent", user_agent)[:512]
        browser = extra.get("browser", browser)[:100]
        os_name = extra.get("os", os_name)[:100]
    return ApprovalContext(ip=ip, user_agent=user_agent, browser=browser, os=os_name)


def set_cookie(
    response: Response, conn: HTTPConnection, name: str, value: str, max_age: int | None
) -> None:
    """Set an HttpOnly, SameSite=Strict cookie; Secure behind an https public URL."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=services(conn).settings.secure_cookies,
        path="/",
    )


def clear_cookie(response: Response, conn: HTTPConnection, name: str) -> None:
    response.delete_cookie(
        name,
        httponly=True,
        samesite="strict",
        secure=services(conn).settings.secure_cookies,
        path="/",
    )


async def current_session(conn: HTTPConnection, *, allow_restricted: bool = True) -> Session:
    """The caller's session, or 401 `unauthorized`."""
    session = await services(conn).sessions.get(conn.cookies.get(SESSION_COOKIE))
    if session is None:
        raise ApiError(401, "unauthorized", "sign in first")
    if session.restricted and not allow_restricted:
        raise ApiError(403, "not_allowed", "this session may only enroll a first device")
    return session


def plausible_id(value: str) -> bool:
    """Whether a path parameter could be one of our ids (`new_id()`); others name no row,
    and must not reach SQL (a NUL would make PostgreSQL refuse the query)."""
    return 0 < len(value) <= 64 and value.isascii() and value.isalnum()


def bearer(conn: HTTPConnection) -> str | None:
    """The token of an `Authorization: Bearer` header."""
    header = conn.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def device_by_token(svc: Services, token: str | None) -> Device | None:
    """The live (not revoked) device holding this bearer token."""
    if not token or len(token) > 256:
        return None
    async with svc.db() as db:
        result = await db.exec(
            select(Device).where(Device.token_hash == hash_token(token), Device.revoked_at == None)  # noqa: E711
        )
        return result.first()


async def authenticated_device(request: Request) -> Device:
    """The device calling with `Authorization: Bearer <device_token>`, or 401."""
    device = await device_by_token(services(request), bearer(request))
    if device is None:
        raise ApiError(401, "unauthorized", "missing, unknown or revoked device token")
    return device
