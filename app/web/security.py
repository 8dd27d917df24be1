"""Security headers on every response, and the Origin check for cookie-authenticated writes."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import ApiError
from app.settings import Settings

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
    "object-src 'none'"
)


class SecurityHeaders:
    """Add CSP, framing, referrer and content-type headers to every HTTP response."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.hsts = settings.secure_cookies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", CSP)
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("Cache-Control", "no-store")
                if self.hsts:
                    headers.setdefault("Strict-Transport-Security", "max-age=31536000")
            await send(message)

        await self.app(scope, receive, with_headers)


def origin_allowed(conn: HTTPConnection, settings: Settings) -> bool:
    """True when the request's Origin header is one of the allowed browser origins."""
    origin = conn.headers.get("origin")
    return origin is not None and origin.rstrip("/") in settings.origins


def check_csrf(conn: HTTPConnection, settings: Settings) -> None:
    """Refuse a cookie-authenticated write sent from a foreign site.

    Browsers always send Origin (or Sec-Fetch-Site) on cross-site POSTs; non-browser
    clients send neither and carry no ambient cookies, so they pass.
    """
    origin = conn.headers.get("origin")
    if origin is not None and origin != "null" and origin.rstrip("/") in settings.origins:
        return
    site = conn.headers.get("sec-fetch-site")
    if origin is None and site in (None, "same-origin", "none"):
        return
    raise ApiError(403, "csrf", "cross-site request refused (Origin not allowed)")
