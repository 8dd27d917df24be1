"""Logging setup: one JSON object per line, or readable console lines, with a request id.

The request id names one piece of work across processes: the HTTP request or socket being
served (from `X-Request-Id` or generated), and for everything about an approval (its
creation, each delivery attempt, the decision, in whichever process) the id of the login
or relying-party request that started it. `grep <request id>` follows a sign-in through
the logs of every web process and worker.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from contextvars import ContextVar, Token
from typing import Any

import orjson

from app.core.redaction import REDACTED, is_secret
from app.settings import Settings

_request_id: ContextVar[str | None] = ContextVar("tapprove_request_id", default=None)

# What a caller may hand us in `X-Request-Id`: short and harmless in a log line.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def current_request_id() -> str | None:
    """The request id of the work this task is doing, if any."""
    return _request_id.get()


def valid_request_id(value: str | None) -> str | None:
    """`value` if it is acceptable as a request id from a caller, else None."""
    if value and _REQUEST_ID.fullmatch(value):
        return value
    return None


class request_id_bound:
    """Log everything inside the block (and tasks started in it) under `request_id`.

    A class rather than a generator-based context manager: it lives as long as a socket
    does, and a suspended generator frame costs an idle socket about half a kilobyte.
    """

    __slots__ = ("_request_id", "_token")

    def __init__(self, request_id: str | None) -> None:
        self._request_id = request_id
        self._token: Token[str | None] | None = None

    def __enter__(self) -> None:
        self._token = _request_id.set(self._request_id)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _request_id.reset(self._token)


class RequestIdFilter(logging.Filter):
    """Give every record a `request_id`: the one passed in `extra=`, else the current one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get()
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_") or key == "color_message":
            continue
        if value is None:
            continue
        found[key] = REDACTED if is_secret(key) else value
    return found


def _timestamp(record: logging.LogRecord) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z"
    )


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line; extra fields given with `extra=` are kept."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update(_extras(record))
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    """`12:00:01.123 INFO  logger: message key=value ...`, for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: "
        line += record.getMessage()
        extras = _extras(record)
        if extras:
            line += "  " + " ".join(f"{key}={value}" for key, value in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(settings: Settings) -> None:
    """Log to stderr in the configured format (`console` on a terminal, else `json`)."""
    fmt = settings.log_format or ("console" if sys.stderr.isatty() else "json")
    # The logging HOWTO's optimisations: neither format shows the caller's file and line,
    # threads or processes, so LogRecord need not look them up for every line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # uvicorn's own access log carries query strings (tokens); ours does not (requestlog).
    logging.getLogger("uvicorn.access").disabled = True
