"""One JSON error shape for every failure, request body limits, and body parsing."""

from __future__ import annotations

import logging
import socket
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from redis.exceptions import ClusterDownError, MasterDownError, ReadOnlyError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.approval.errors import (
    AlreadyCompleted,
    AlreadyDecided,
    ApprovalError,
    BadSignature,
    Expired,
    InvalidCode,
    Locked,
    NotAllowed,
    NotApproved,
    NotFound,
    RateLimited,
    SmsUnavailable,
    UnknownUser,
    WrongNumber,
)
from app.core.errors import ApiError

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024

# Redis is down, restarting, loading its data, or failing over (Sentinel / Cluster): the
# caller should retry shortly, so these answer 503, not 500.
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    RedisConnectionError,  # includes BusyLoadingError and AuthenticationError
    RedisTimeoutError,
    ReadOnlyError,  # a replica promoted away from under us
    MasterDownError,
    ClusterDownError,
    TryAgainError,
)

# The database is down: SQLAlchemy wraps errors of a live connection, but asyncpg's failure
# to connect at all arrives as a plain socket error. (redis-py wraps its own.)
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    OperationalError,
    DBAPIError,
    ConnectionError,  # the built-in one: refused, reset, aborted
    socket.gaierror,
)

Body = TypeVar("Body", bound=BaseModel)


class FastJSON(JSONResponse):
    """JSONResponse rendered with orjson."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(error: ApiError) -> Response:
    """Render an ApiError as the protocol's `{"error","message"}` body."""
    return FastJSON(error.body(), status_code=error.status, headers=error.headers)


def _route_path(request: Request) -> str:
    """The matched route's template (`/api/login/{approval_id}`): a bounded metric label."""
    route = request.scope.get("route")
    return str(getattr(route, "path", "unmatched"))


def _observe(request: Request, error: ApiError) -> Response:
    """Count refusals worth an alert (rate limits, failed sign-ins), then render the error."""
    route = _route_path(request)
    if error.status == 429:
        metrics.RATE_LIMITED.labels(route).inc()
    if route == "/api/login":
        metrics.LOGINS.labels(error.code).inc()
        log.info(
            "sign-in refused: %s",
            error.code,
            extra={"result": error.code, "status": error.status},
        )
    return error_response(error)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _observe(request, exc)


# The HTTP status of each refusal of the approval's use cases (app.approval.errors), the one
# place they are mapped; a subclass answers as its nearest listed base.
APPROVAL_STATUS: dict[type[ApprovalError], int] = {
    BadSignature: 400,
    InvalidCode: 400,
    NotAllowed: 403,
    NotFound: 404,
    UnknownUser: 404,
    AlreadyDecided: 409,
    NotApproved: 409,
    AlreadyCompleted: 409,
    SmsUnavailable: 409,
    Expired: 410,
    WrongNumber: 422,
    Locked: 423,
    RateLimited: 429,
}


def approval_api_error(exc: ApprovalError) -> ApiError:
    """The protocol's answer to a refusal: its status, code, message and extra members."""
    status = next(APPROVAL_STATUS[kind] for kind in type(exc).__mro__ if kind in APPROVAL_STATUS)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else {}
    return ApiError(status, exc.code, exc.message, headers, exc.details())


async def _approval_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApprovalError)
    return _observe(request, approval_api_error(exc))


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = {
        404: f"no such route: {request.url.path}",
        405: f"{request.method} is not allowed here",
    }.get(exc.status_code, str(exc.detail))
    return _observe(request, ApiError(exc.status_code, code, message, dict(exc.headers or {})))


async def _dependency_down(request: Request, exc: Exception) -> Response:
    name = "redis" if isinstance(exc, REDIS_UNAVAILABLE) else "database"
    log.warning("%s unavailable: %s", name, type(exc).__name__, extra={"dependency": name})
    return _observe(
        request,
        ApiError(
            503, "unavailable", f"{name} is unavailable; try again shortly", {"Retry-After": "2"}
        ),
    )


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client closed the connection, or missed the body deadline (app.web.connection);
    # nobody reads this answer, but the access log shows the status (nginx's 499).
    return error_response(ApiError(499, "client_closed_request", "the request never finished"))


async def _unexpected(request: Request, exc: Exception) -> Response:
    return _observe(request, ApiError(500, "internal_error", "unexpected server error"))


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: _api_error,
    ApprovalError: _approval_error,
    HTTPException: _http_error,
    **{kind: _dependency_down for kind in REDIS_UNAVAILABLE},
    **{kind: _dependency_down for kind in DATABASE_UNAVAILABLE},
    ClientDisconnect: _client_gone,
    Exception: _unexpected,
}


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over 64 KiB with 413 `too_large`, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunked = False
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await self._too_large(scope, receive, send)
                    return
            elif name == b"transfer-encoding":
                chunked = True
        if not chunked:
            # The server reads no more than a declared length (and no body without one),
            # so there is nothing left to count.
            await self.app(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(413, "too_large", f"request body exceeds {self.limit} bytes")
        await error_response(error)(scope, receive, send)


def _field_name(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "body"


async def read_body(request: Request, model: type[Body]) -> Body:
    """Parse a JSON body into `model`, or raise 422 `invalid_request` naming the bad field."""
    raw = await request.body()
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        raise ApiError(422, "invalid_request", "body: not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_request", "body: expected a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _field_name(tuple(first["loc"]))
        raise ApiError(422, "invalid_request", f"{field}: {first['msg']}") from None
    except UnicodeEncodeError:
        raise ApiError(422, "invalid_request", "body: invalid unicode") from None
    holding_nul = _nul_field(data)
    if holding_nul is not None:
        # PostgreSQL text cannot hold NUL: let it in and the insert fails as a 503.
        raise ApiError(422, "invalid_request", f"{holding_nul}: must not contain NUL characters")
    return body


def _nul_field(data: dict[str, Any]) -> str | None:
    """The dotted name of the first member (key or string value) holding a NUL, if any."""
    stack: list[tuple[tuple[int | str, ...], object]] = [((), data)]
    while stack:  # not recursive: JSON nests deeper than Python's recursion limit
        loc, value = stack.pop()
        if isinstance(value, str) and "\x00" in value:
            return _field_name(loc)
        if isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in str(key):
                    return _field_name((*loc, "<key>"))
                stack.append(((*loc, str(key)), item))
        elif isinstance(value, list):
            stack.extend(((*loc, index), item) for index, item in enumerate(value))
    return None


class StrictBody(BaseModel):
    """Base for request bodies: unknown fields are ignored, wrong types are never coerced."""

    model_config = {"strict": True, "extra": "ignore"}
