"""One access-log line per request or socket, a request id for everything it logs, and the
open-socket gauge.

uvicorn's access log is off (`app.server`): it prints query strings, and ours may carry
tokens (`/verify-email?token=`). This line has the path only.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.core.tokens import new_id
from app.logs import request_id_bound, valid_request_id

log = logging.getLogger("tapprove.access")

# Probes hit these every few seconds; their lines are kept at debug level.
_QUIET = frozenset({"/healthz", "/readyz", "/metrics"})


def socket_kind(path: str) -> str:
    """`device` or `login` for the two WebSocket routes (bounded metric label values)."""
    if path == "/ws/device":
        return "device"
    if path.startswith("/ws/login/"):
        return "login"
    return "other"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class RequestLog:
    """Bind a request id (from `X-Request-Id` or new), echo it, and log how each call ended."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = valid_request_id(_header(scope, b"x-request-id")) or new_id()
        with request_id_bound(request_id):
            if scope["type"] == "http":
                await self._http(scope, receive, send, request_id)
            else:
                await self._websocket(scope, receive, send, request_id)

    async def _http(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", ()))
                if not any(bytes(name).lower() == b"x-request-id" for name, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = str(scope.get("path", ""))
            log.log(
                logging.DEBUG if path in _QUIET and status < 500 else logging.INFO,
                "%s %s %d",
                scope.get("method", ""),
                path,
                status,
                extra={
                    "method": scope.get("method", ""),
                    "path": path,
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                    "ip": (scope.get("client") or ("",))[0],
                    "request_id": request_id,
                },
            )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        started = time.perf_counter()
        path = str(scope.get("path", ""))
        watch = _SocketWatch(receive, send, metrics.OPEN_SOCKETS.labels(socket_kind(path)))
        try:
            await self.app(scope, watch.receive, watch.send)
        finally:
            # The socket is gone once the app returns: the server closes it then.
            if watch.accepted:
                watch.gauge.dec()
            log.info(
                "WS %s %s",
                path,
                watch.close_code if watch.accepted else "refused",
                extra={
                    "path": path,
                    "accepted": watch.accepted,
                    "close_code": watch.close_code,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                    "ip": (scope.get("client") or ("",))[0],
                    "request_id": request_id,
                },
            )


class _SocketWatch:
    """Sees a socket's accept and close go by (a small object, not closures: a phone socket
    lives for hours, and a server holds tens of thousands)."""

    __slots__ = ("_receive", "_send", "accepted", "close_code", "gauge")

    def __init__(self, receive: Receive, send: Send, gauge: Gauge) -> None:
        self._receive = receive
        self._send = send
        self.gauge = gauge
        self.accepted = False
        self.close_code: int | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "websocket.accept" and not self.accepted:
            self.accepted = True
            self.gauge.inc()
        elif message["type"] == "websocket.close":
            self.close_code = int(message.get("code", 1000))
        await self._send(message)

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "websocket.disconnect" and self.close_code is None:
            self.close_code = int(message.get("code", 1005))
        return message
