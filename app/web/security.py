"""Security headers on every response, and the Origin check for cookie-authenticated writes."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import ApiError
from app.settings import Settings


def content_security_policy(settings: Settings) -> str:
    """The pages' CSP: everything from our own origin; sockets only to the allowed origins'
    ws:// or wss:// twins (`'self'` covers them only in CSP Level 3 browsers)."""
    sockets = " ".join(sorted(_socket_origin(origin) for origin in settings.origins))
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self' {sockets}; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'; object-src 'none'"
    )


def _socket_origin(origin: str) -> str:
    parts = urlsplit(origin)
    return f"{'wss' if parts.scheme == 'https' else 'ws'}://{parts.netloc}"


class SecurityHeaders:
    """Add CSP, framing, referrer and content-type headers to every HTTP response."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        defaults = {
            "content-security-policy": content_security_policy(settings),
            "x-frame-options": "DENY",
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
            "cache-control": "no-store",
        }
        if settings.secure_cookies:
            defaults["strict-transport-security"] = "max-age=31536000"
        # Encoded once: every response carries them.
        self._defaults = [(name.encode(), value.encode()) for name, value in defaults.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {bytes(name).lower() for name, _ in headers}
                # A response that set one of these itself keeps its own value.
                headers += [h for h in self._defaults if h[0] not in present]
                message["headers"] = headers
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
