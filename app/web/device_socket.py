"""`WS /ws/device`: a phone's socket. Auth frame, then approval requests out and acks and
decisions in (PROTOCOL §3).

A process may hold tens of thousands of these, mostly idle, so each costs as little as it
can: one task (the connection's own), no queue, events handed over by the process's event
bus as a callback, and only the three facts of the device that deciding needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from app import passcodes
from app.approval.answer import decide
from app.approval.errors import ApprovalError
from app.core.signatures import peek_aid
from app.core.tokens import hash_token
from app.db.accounts import touch_device
from app.services import Services
from app.store.events import RECONNECTED, Event
from app.web.common import client_ip, services
from app.web.requestlog import RequestLog

log = logging.getLogger(__name__)

PATH = "/ws/device"

MAX_FRAME = 64 * 1024
AUTH_TIMEOUT = 5.0
CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_BIG = 1009
MAX_TOKEN = 256

# The events of the user's channel that go to the phone as they are, frames of their own
# (docs/protocol.md §3.7); the channel's other events are for the server.
FORWARDED_EVENTS = frozenset({"approval_request", "approval_resolved"})


@dataclass(frozen=True, slots=True)
class ConnectedDevice:
    """The device behind a socket: who it is, whose it is, the key its answers are signed with."""

    id: str
    user_id: str
    public_jwk: str
    # It has not confirmed an offline-passcode seed yet: one is offered after `ready`.
    passcode_seed_pending: bool = False


class _BadMessage(Exception):
    pass


class _TooBig(Exception):
    pass


def _parse_frame(text: str) -> dict[str, Any]:
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise _BadMessage from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise _BadMessage
    return frame


async def _receive_text(websocket: WebSocket) -> str | None:
    """The next text frame; None when the peer left. Binary frames count as bad messages."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        return None
    text = message.get("text")
    if text is None:
        data = message.get("bytes") or b""
        if len(data) > MAX_FRAME:
            raise _TooBig
        return "\x00"  # not JSON: answered with bad_message
    if len(text) > MAX_FRAME:
        raise _TooBig
    return str(text)


async def _authenticate(svc: Services, websocket: WebSocket) -> ConnectedDevice | None:
    """The live device named by the first frame's token (and its last-seen time updated)."""
    try:
        async with asyncio.timeout(AUTH_TIMEOUT):
            text = await _receive_text(websocket)
    except (TimeoutError, _TooBig):
        return None
    if text is None:
        return None
    try:
        frame = _parse_frame(text)
    except _BadMessage:
        return None
    token = frame.get("token")
    if frame.get("type") != "auth" or not isinstance(token, str) or not token:
        return None
    if len(token) > MAX_TOKEN:
        return None
    found = await touch_device(svc.engine, hash_token(token), now=svc.clock.now())
    return ConnectedDevice(*found) if found else None


def _bad_message(message: str) -> dict[str, Any]:
    return {"type": "error", "error": "bad_message", "message": message}


class DeviceConnection:
    """One phone's socket: replay pending work, relay events, take acks and decisions."""

    __slots__ = ("_outbox", "device", "svc", "ws")

    def __init__(self, svc: Services, websocket: WebSocket, device: ConnectedDevice) -> None:
        self.svc = svc
        self.ws = websocket
        self.device = device
        # Frames waiting to go out, while one caller sends them; None when idle (most of
        # a socket's life), so an idle socket holds no buffer.
        self._outbox: deque[dict[str, Any]] | None = None

    # --- out: one ordered stream of frames, whoever sends them -------------------------

    async def send(self, frame: dict[str, Any]) -> None:
        """Send `frame` after any frames queued before it."""
        if self._outbox is not None:
            self._outbox.append(frame)  # the caller already sending will send it
        else:
            await self._drain(frame)

    def _send_soon(self, frame: dict[str, Any]) -> None:
        if self._outbox is not None:
            self._outbox.append(frame)
        else:
            self.svc.spawn(self._drain(frame))

    async def _drain(self, first: dict[str, Any]) -> None:
        outbox = self._outbox = deque((first,))
        try:
            while outbox:
                frame = outbox.popleft()
                if self.ws.client_state is WebSocketState.CONNECTED:
                    await self.ws.send_text(orjson.dumps(frame).decode())
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the phone is gone; its socket's end cleans up
        finally:
            self._outbox = None

    # --- events from other processes (the bus calls this; it must not block) -----------

    def on_event(self, event: Event) -> None:
        kind = event.get("type")
        if event is RECONNECTED:
            # Redis may have restarted empty: say again that this phone is here.
            self.svc.spawn(self._rejoin())
        elif kind in FORWARDED_EVENTS:
            self._send_soon(event)
        elif kind == "device_revoked" and event.get("device_id") == self.device.id:
            self.svc.spawn(self._close(CLOSE_UNAUTHORIZED, "device revoked"))

    async def _rejoin(self) -> None:
        with contextlib.suppress(Exception):
            await self.svc.presence.join(self.device.user_id, self.device.id)
            await self.offer_pending()

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)

    async def offer_passcode_seed(self) -> None:
        """Send the offline-passcode seed this device has yet to confirm (on every connection
        until it sends `passcode_seed_ack`, so a crash between the two loses nothing)."""
        seed = await passcodes.seed_to_deliver(self.svc, self.device.id)
        if seed is not None:
            await self.send({"type": "passcode_seed", "passcode": seed})

    async def offer_pending(self) -> None:
        approval = await self.svc.approvals.pending_for_user(self.device.user_id)
        if approval is not None:
            await self.send({"type": "approval_request", "approval": approval.device_json()})

    # --- in: frames from the phone -----------------------------------------------------

    async def serve_frames(self) -> int | None:
        """Handle frames until the peer leaves; returns a close code to send, if any."""
        while True:
            try:
                text = await _receive_text(self.ws)
            except _TooBig:
                return CLOSE_TOO_BIG
            if text is None:
                return None
            try:
                frame = _parse_frame(text)
            except _BadMessage:
                await self.send(_bad_message("frames are JSON objects with a type"))
                continue
            kind = frame["type"]
            if kind == "ack":
                await self.on_ack(frame)
            elif kind == "decision":
                await self.on_decision(frame)
            elif kind == "passcode_seed_ack":
                await passcodes.seed_confirmed(self.svc, self.device.id)
            elif kind == "auth":
                continue  # a repeated auth frame is harmless
            else:
                await self.send(_bad_message(f"unknown frame type {kind[:40]!r}"))

    async def on_ack(self, frame: dict[str, Any]) -> None:
        approval_id = frame.get("id")
        if not isinstance(approval_id, str) or len(approval_id) > 64:
            await self.send(_bad_message("ack needs an id"))
            return
        acked = await self.svc.approvals.ack(approval_id, self.device.user_id, self.device.id)
        if acked is None:
            await self.send(_error_frame(approval_id, "not_found", "no such approval"))

    async def on_decision(self, frame: dict[str, Any]) -> None:
        jws = frame.get("jws")
        approval_id = frame.get("id")
        if not isinstance(jws, str) or len(jws) > 8192:
            await self.send(_bad_message("decision needs a jws string"))
            return
        if not isinstance(approval_id, str):
            approval_id = peek_aid(jws)
        if approval_id is None:
            await self.send(_error_frame(None, "bad_signature", "the JWS names no approval"))
            return
        if not jws:
            message = "jws: expected a compact JWS string"
            await self.send(_error_frame(approval_id, "invalid_request", message))
            return
        try:
            status = await decide(self.svc, self.device, approval_id, jws, ip=client_ip(self.ws))
        except ApprovalError as exc:
            await self.send(_error_frame(approval_id, exc.code, exc.message))
            return
        await self.send({"type": "decision_result", "id": approval_id, "status": status.value})


def _error_frame(approval_id: str | None, code: str, message: str) -> dict[str, Any]:
    """An `error` frame (PROTOCOL §3): the codes of the HTTP answers, the approval's id if
    known. Every refusal of a decision (app.approval.errors) becomes one, by its own code."""
    frame: dict[str, Any] = {"type": "error", "error": code, "message": message}
    if approval_id:
        frame["id"] = approval_id
    return frame


async def device_socket(websocket: WebSocket) -> None:
    """WS /ws/device: auth frame within 5 s, then approval requests both ways."""
    svc = services(websocket)
    await websocket.accept()
    device = await _authenticate(svc, websocket)
    if device is None:
        with contextlib.suppress(Exception):
            await websocket.close(CLOSE_UNAUTHORIZED, "authenticate first with a device token")
        return
    # Nothing reads the handshake's headers from here on, but the server keeps the scope
    # for the socket's life: about 1.3 KB per idle phone.
    websocket.scope["headers"] = []
    connection = DeviceConnection(svc, websocket, device)
    channel = svc.keys.user_channel(device.user_id)
    await svc.presence.join(device.user_id, device.id)
    close_code: int | None = None
    listening = False
    try:
        await svc.events.add_listener(connection.on_event, channel)
        listening = True
        await connection.send({"type": "ready", "device_id": device.id})
        await connection.offer_pending()
        if device.passcode_seed_pending:
            await connection.offer_passcode_seed()
        close_code = await connection.serve_frames()
    except WebSocketDisconnect:
        pass
    except Exception as exc:
        log.warning("device socket failed: %r", exc)
    finally:
        with contextlib.suppress(Exception):
            if listening:
                await svc.events.remove_listener(connection.on_event, channel)
            await svc.presence.leave(device.user_id, device.id)
        if close_code is not None:
            with contextlib.suppress(Exception):
                await websocket.close(close_code)


async def _device_socket_app(scope: Scope, receive: Receive, send: Send) -> None:
    await device_socket(WebSocket(scope, receive, send))


class DeviceSocketShortcut:
    """Middleware: serve `WS /ws/device` right here, past the rest of the stack.

    Each layer a request passes through stays suspended for as long as it lasts, and a
    phone's socket lasts for hours: the Starlette stack below (the other middleware, the
    exception handlers, the router) held about 5 KB per idle socket. Phone sockets keep
    what matters of it, the request id, the access line and the open-socket gauge
    (RequestLog), and reach the same `device_socket` as the route table's entry.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._device_socket = RequestLog(_device_socket_app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == PATH:
            await self._device_socket(scope, receive, send)
        else:
            await self.app(scope, receive, send)
