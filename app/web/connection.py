"""HTTP/1.1 connections: deadlines for receiving a request, and the parser's own 400.

uvicorn's httptools protocol waits for a request's head and body as long as the client
likes (its keep-alive timer only runs between requests, and any byte stops it), so a few
hundred half-sent requests hold a few hundred sockets forever. This subclass gives each
request `head_timeout` seconds from its first byte (or from the connection's start) to
finish its line and headers, and `body_timeout` seconds from when the app starts on it to
finish its body. While the app works on a request nothing is timed (a long poll may hold
30 s), and an upgraded connection (the phone WebSocket) carries no timer at all.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from app.core.errors import ApiError

log = logging.getLogger(__name__)

# Where the parser stands on the wire: between requests, inside a head, inside a body.
Phase = Literal["idle", "head", "body"]


@dataclass(frozen=True)
class RequestTimeouts:
    """Seconds a client may take to send a request's head, then its body."""

    head: float
    body: float


class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with request deadlines and JSON parser errors."""

    def __init__(self, *args: Any, timeouts: RequestTimeouts, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timeouts = timeouts
        self._phase: Phase = "idle"
        self._deadline: asyncio.TimerHandle | None = None

    # --- the deadline ----------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._cancel()
        self._deadline = self.loop.call_later(seconds, self._deadline_passed)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        log.debug("request %s not received in time; closing", self._phase)
        answer = self._may_answer()
        if self.cycle is not None and not self.cycle.response_complete:
            # The app sees a disconnect now, and nothing it sends reaches the wire.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if answer:
            error = ApiError(408, "request_timeout", f"the request {self._phase} came too slowly")
            self._answer_and_close(error)
        else:
            # Nothing of a request yet (an idle socket), or an answer already on the wire.
            self.transport.close()

    def _may_answer(self) -> bool:
        """Whether a response written now would be the answer to the late request."""
        if self.pipeline:  # an earlier request is still being answered
            return False
        if self._phase == "head":
            return self.cycle is None or self.cycle.response_complete
        return self._phase == "body" and not self.cycle.response_started

    def _answer_and_close(self, error: ApiError) -> None:
        """Write `error` in the protocol's JSON shape, then close the connection."""
        body = orjson.dumps(error.body())
        head = [STATUS_LINE[error.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    # --- uvicorn's protocol, with the phases tracked ---------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self._timeouts.head)  # a new connection must start a request in time

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self._phase == "idle":
            # Bytes after a response stop uvicorn's keep-alive timer; the head's clock starts.
            self._arm(self._timeouts.head)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = "head"
        if self._deadline is None:
            self._arm(self._timeouts.head)

    def on_headers_complete(self) -> None:
        self._cancel()  # a WebSocket upgrade leaves here untimed, and stays so
        self._phase = "body"
        super().on_headers_complete()  # starts the app, unless the request must wait its turn

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        super()._start_asgi_task(cycle, app)
        if cycle is self.cycle and cycle.more_body:
            self._arm(self._timeouts.body)

    def on_message_complete(self) -> None:
        self._cancel()
        self._phase = "idle"
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """A request line or headers the parser refuses: 400 in the JSON error shape."""
        self._cancel()
        self._answer_and_close(ApiError(400, "bad_request", "the request is not valid HTTP/1.1"))


def http_protocol(timeouts: RequestTimeouts) -> type[asyncio.Protocol]:
    """What uvicorn's `http=` option takes: it calls this like a protocol class. A partial of
    a module-level class, so it pickles into the processes of `serve --workers N`."""
    return cast(type[asyncio.Protocol], functools.partial(TimedHttpProtocol, timeouts=timeouts))
