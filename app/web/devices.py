"""Routes a phone calls (bearer device token), enrollment, and the device WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from typing import Any, Literal

import orjson
import segno
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from app.approval_flow import active_devices, decide_with_jws
from app.core.approvals import Status
from app.core.clock import rfc3339, to_datetime
from app.core.enrollment import enrollment_uri
from app.core.errors import ApiError
from app.core.signatures import parse_device_jwk, peek_aid
from app.core.tokens import hash_token, new_id, new_token
from app.db import audit
from app.db.accounts import consume_enrollment_code, create_enrollment_code
from app.db.models import Device, User
from app.delivery import notices
from app.services import Services
from app.store.events import RECONNECTED
from app.store.presence import account_changed
from app.web.common import (
    authenticated_device,
    client_ip,
    current_session,
    device_by_token,
    json,
    plausible_id,
    services,
)
from app.web.errors import StrictBody, read_body
from app.web.security import check_csrf

log = logging.getLogger(__name__)

MAX_FRAME = 64 * 1024
AUTH_TIMEOUT = 5.0
CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_BIG = 1009


class PushRegistration(StrictBody):
    provider: Literal["fcm", "apns"]
    token: str = Field(min_length=1, max_length=4096)


class EnrollBody(StrictBody):
    code: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=100)
    platform: Literal["android", "ios", "web"]
    public_key: dict[str, Any]
    push: PushRegistration | None = None


class DeviceUpdate(StrictBody):
    name: str | None = Field(default=None, min_length=1, max_length=100)
    push: PushRegistration | None = None


class DecisionBody(StrictBody):
    jws: str = Field(min_length=1, max_length=8192)


def device_json(device: Device) -> dict[str, Any]:
    """A device as the account owner sees it."""
    return {
        "id": device.id,
        "device_id": device.id,
        "name": device.name,
        "platform": device.platform,
        "push": device.push_provider if device.push_token else None,
        "created_at": rfc3339(device.created_at),
        "last_seen_at": rfc3339(device.last_seen_at) if device.last_seen_at else None,
    }


def _qr_svg(uri: str) -> str:
    """The enrollment link as a standalone SVG (with its namespace, so it works as an image)."""
    buffer = io.BytesIO()
    segno.make(uri, error="m").save(
        buffer, kind="svg", xmldecl=False, nl=False, scale=4, dark="#111", light="#fff"
    )
    return buffer.getvalue().decode()


async def create_enrollment(request: Request) -> Response:
    """POST /api/devices/enrollments: a one-time code (and QR) to add a phone."""
    svc = services(request)
    check_csrf(request, svc.settings)
    session = await current_session(request)
    devices = await active_devices(svc, session.user_id)
    if devices and not session.approved_with_device:
        raise ApiError(
            403,
            "not_allowed",
            "adding another device needs a sign-in approved on one of your devices",
        )
    now = svc.clock.now()
    async with svc.db() as db:
        code, expires_at = await create_enrollment_code(db, session.user_id, now=now)
        await audit.record(
            db, "device.enrollment_started", user_id=session.user_id, ip=client_ip(request), now=now
        )
        await db.commit()
    uri = enrollment_uri(svc.settings.public_url, code)
    qr_svg = _qr_svg(uri)
    return json(
        {"code": code, "uri": uri, "qr_svg": qr_svg, "expires_at": rfc3339(expires_at)},
        status=201,
    )


async def enroll_device(request: Request) -> Response:
    """POST /api/devices: a phone joins with an enrollment code and its public key."""
    svc = services(request)
    body = await read_body(request, EnrollBody)
    try:
        jwk = parse_device_jwk(body.public_key)
    except ValueError as exc:
        raise ApiError(422, "invalid_request", f"public_key: {exc}") from None
    now = svc.clock.now()
    token = new_token()
    async with svc.db() as db:
        user_id = await consume_enrollment_code(db, body.code, now=now)
        if user_id is None:
            raise ApiError(
                400, "invalid_or_expired_code", "the enrollment code is invalid or expired"
            )
        user = await db.get(User, user_id)
        assert user is not None
        device = Device(
            id=new_id(),
            user_id=user_id,
            name=body.name.strip() or "Phone",
            platform=body.platform,
            public_jwk=orjson.dumps(jwk).decode(),
            token_hash=hash_token(token),
            push_provider=body.push.provider if body.push else None,
            push_token=body.push.token if body.push else None,
            created_at=to_datetime(now),
        )
        db.add(device)
        await audit.record(
            db,
            "device.added",
            user_id=user_id,
            device_id=device.id,
            ip=client_ip(request),
            detail={"name": device.name, "platform": device.platform},
            now=now,
        )
        await notices.device_added(svc, db, user, device, now)
        await db.commit()
    await account_changed(svc.redis, svc.keys, user_id)
    return json(
        {"device_id": device.id, "device_token": token, "user": {"email": user.email}},
        status=201,
    )


async def update_me(request: Request) -> Response:
    """PATCH /api/devices/me: rename, or refresh the push token."""
    svc = services(request)
    device = await authenticated_device(request)
    body = await read_body(request, DeviceUpdate)
    now = svc.clock.now()
    async with svc.db() as db:
        current = await db.get(Device, device.id)
        assert current is not None
        if body.name is not None:
            current.name = body.name.strip() or current.name
        if body.push is not None:
            current.push_provider = body.push.provider
            current.push_token = body.push.token
        db.add(current)
        await audit.record(
            db,
            "device.updated",
            user_id=device.user_id,
            device_id=device.id,
            ip=client_ip(request),
            detail={"name": body.name is not None, "push": body.push is not None},
            now=now,
        )
        await db.commit()
    await account_changed(svc.redis, svc.keys, device.user_id)
    return json(device_json(current))


async def _revoke(svc: Services, device: Device, *, ip: str, by: str) -> None:
    now = svc.clock.now()
    async with svc.db() as db:
        current = await db.get(Device, device.id)
        if current is None or current.revoked_at is not None:
            return
        current.revoked_at = to_datetime(now)
        current.push_token = None
        db.add(current)
        await audit.record(
            db,
            "device.revoked",
            user_id=device.user_id,
            device_id=device.id,
            ip=ip,
            detail={"by": by},
            now=now,
        )
        await db.commit()
    await account_changed(svc.redis, svc.keys, device.user_id)
    await svc.events.publish(
        svc.keys.user_channel(device.user_id), {"type": "device_revoked", "device_id": device.id}
    )


async def delete_me(request: Request) -> Response:
    """DELETE /api/devices/me: a phone unenrolls itself."""
    svc = services(request)
    device = await authenticated_device(request)
    await _revoke(svc, device, ip=client_ip(request), by="device")
    return json({"status": "revoked"})


async def my_pending(request: Request) -> Response:
    """GET /api/devices/me/approvals: pending approvals, for an app that just opened."""
    svc = services(request)
    device = await authenticated_device(request)
    approval = await svc.approvals.pending_for_user(device.user_id)
    return json({"approvals": [approval.device_json()] if approval else []})


async def get_approval(request: Request) -> Response:
    """GET /api/approvals/<id>: one approval of the device's user (404 for anyone else's)."""
    svc = services(request)
    device = await authenticated_device(request)
    approval = await svc.approvals.get(request.path_params["approval_id"])
    if approval is None or approval.user_id != device.user_id:
        raise ApiError(404, "not_found", "no such approval")
    if approval.status is Status.PENDING and approval.expires_at <= svc.clock.now():
        await svc.approvals.expire_if_due(approval.id)
        approval = await svc.approvals.get(approval.id) or approval
    return json(approval.device_json())


async def post_decision(request: Request) -> Response:
    """POST /api/approvals/<id>/decision: a signed answer over HTTP (e.g. after a push)."""
    svc = services(request)
    device = await authenticated_device(request)
    body = await read_body(request, DecisionBody)
    status = await decide_with_jws(
        svc, device, request.path_params["approval_id"], body.jws, ip=client_ip(request)
    )
    return json({"status": status.value})


async def list_devices(request: Request) -> Response:
    """GET /api/devices: the signed-in user's devices."""
    svc = services(request)
    session = await current_session(request)
    return json({"devices": [device_json(d) for d in await active_devices(svc, session.user_id)]})


async def revoke_device(request: Request) -> Response:
    """DELETE /api/devices/<id>: the owner revokes one of their devices."""
    svc = services(request)
    check_csrf(request, svc.settings)
    session = await current_session(request, allow_restricted=False)
    device_id = request.path_params["device_id"]
    async with svc.db() as db:
        device = await db.get(Device, device_id) if plausible_id(device_id) else None
    if device is None or device.user_id != session.user_id or device.revoked_at is not None:
        raise ApiError(404, "not_found", "no such device")
    await _revoke(svc, device, ip=client_ip(request), by="owner")
    return json({"status": "revoked"})


# --- the device WebSocket -------------------------------------------------------------


class _BadMessage(Exception):
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


class _TooBig(Exception):
    pass


async def _authenticate(svc: Services, websocket: WebSocket) -> Device | None:
    try:
        text = await asyncio.wait_for(_receive_text(websocket), AUTH_TIMEOUT)
    except (TimeoutError, _TooBig):
        return None
    if text is None:
        return None
    try:
        frame = _parse_frame(text)
    except _BadMessage:
        return None
    token = frame.get("token")
    if frame.get("type") != "auth" or not isinstance(token, str):
        return None
    return await device_by_token(svc, token)


class DeviceConnection:
    """One phone's socket: replay pending work, relay events, take acks and decisions."""

    def __init__(self, svc: Services, websocket: WebSocket, device: Device) -> None:
        self.svc = svc
        self.ws = websocket
        self.device = device
        self.sent: set[str] = set()
        self.send_lock = asyncio.Lock()

    async def send(self, frame: dict[str, Any]) -> None:
        async with self.send_lock:
            if self.ws.client_state is WebSocketState.CONNECTED:
                await self.ws.send_text(orjson.dumps(frame).decode())

    async def offer_pending(self) -> None:
        approval = await self.svc.approvals.pending_for_user(self.device.user_id)
        if approval is not None:
            await self.send({"type": "approval_request", "approval": approval.device_json()})

    async def relay(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        while True:
            event = await queue.get()
            kind = event.get("type")
            if event is RECONNECTED:
                # Redis may have restarted empty: say again that this phone is here.
                await self.svc.presence.join(self.device.user_id, self.device.id)
                await self.offer_pending()
            elif kind in ("approval_request", "approval_resolved"):
                await self.send(event)
            elif kind == "device_revoked" and event.get("device_id") == self.device.id:
                await self.ws.close(CLOSE_UNAUTHORIZED, "device revoked")
                return

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
                await self.send(
                    {
                        "type": "error",
                        "error": "bad_message",
                        "message": "frames are JSON objects with a type",
                    }
                )
                continue
            kind = frame["type"]
            if kind == "ack":
                await self.on_ack(frame)
            elif kind == "decision":
                await self.on_decision(frame)
            elif kind == "auth":
                continue  # a repeated auth frame is harmless
            else:
                await self.send(
                    {
                        "type": "error",
                        "error": "bad_message",
                        "message": f"unknown frame type {kind[:40]!r}",
                    }
                )

    async def on_ack(self, frame: dict[str, Any]) -> None:
        approval_id = frame.get("id")
        if not isinstance(approval_id, str) or len(approval_id) > 64:
            await self.send({"type": "error", "error": "bad_message", "message": "ack needs an id"})
            return
        event = orjson.dumps({"type": "delivered", "channel": "websocket"})
        acked = await self.svc.approvals.ack(
            approval_id, self.device.user_id, self.device.id, event
        )
        if acked is None:
            await self.send(
                {
                    "type": "error",
                    "id": approval_id,
                    "error": "not_found",
                    "message": "no such approval",
                }
            )

    async def on_decision(self, frame: dict[str, Any]) -> None:
        jws = frame.get("jws")
        approval_id = frame.get("id")
        if not isinstance(jws, str) or len(jws) > 8192:
            await self.send(
                {"type": "error", "error": "bad_message", "message": "decision needs a jws string"}
            )
            return
        if not isinstance(approval_id, str):
            approval_id = peek_aid(jws)
        try:
            if approval_id is None:
                raise ApiError(400, "bad_signature", "the JWS names no approval")
            status = await decide_with_jws(
                self.svc, self.device, approval_id, jws, ip=client_ip(self.ws)
            )
        except ApiError as exc:
            error: dict[str, Any] = {"type": "error", "error": exc.code, "message": exc.message}
            if approval_id:
                error["id"] = approval_id
            await self.send(error)
            return
        await self.send({"type": "decision_result", "id": approval_id, "status": status.value})


async def device_socket(websocket: WebSocket) -> None:
    """WS /ws/device: auth frame within 5 s, then approval requests both ways."""
    svc = services(websocket)
    await websocket.accept()
    device = await _authenticate(svc, websocket)
    if device is None:
        with contextlib.suppress(Exception):
            await websocket.close(CLOSE_UNAUTHORIZED, "authenticate first with a device token")
        return
    connection = DeviceConnection(svc, websocket, device)
    await svc.presence.join(device.user_id, device.id)
    await _touch(svc, device)
    close_code: int | None = None
    try:
        async with svc.events.listen(svc.keys.user_channel(device.user_id)) as queue:
            await connection.send({"type": "ready", "device_id": device.id})
            await connection.offer_pending()
            relay = asyncio.create_task(connection.relay(queue))
            frames = asyncio.create_task(connection.serve_frames())
            done, pending = await asyncio.wait({relay, frames}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            if frames in done and not frames.cancelled() and frames.exception() is None:
                close_code = frames.result()
            elif frames in done and frames.exception() is not None:
                exc = frames.exception()
                if not isinstance(exc, WebSocketDisconnect):
                    log.warning("device socket failed: %r", exc)
    except WebSocketDisconnect:
        pass
    finally:
        with contextlib.suppress(Exception):
            await svc.presence.leave(device.user_id, device.id)
        if close_code is not None:
            with contextlib.suppress(Exception):
                await websocket.close(close_code)


async def _touch(svc: Services, device: Device) -> None:
    async with svc.db() as db:
        current = await db.get(Device, device.id)
        if current is not None:
            current.last_seen_at = to_datetime(svc.clock.now())
            db.add(current)
            await db.commit()


routes: list[BaseRoute] = [
    Route("/api/devices/enrollments", create_enrollment, methods=["POST"]),
    Route("/api/devices", enroll_device, methods=["POST"]),
    Route("/api/devices", list_devices, methods=["GET"]),
    Route("/api/devices/me", update_me, methods=["PATCH"]),
    Route("/api/devices/me", delete_me, methods=["DELETE"]),
    Route("/api/devices/me/approvals", my_pending, methods=["GET"]),
    Route("/api/devices/{device_id}", revoke_device, methods=["DELETE"]),
    Route("/api/approvals/{approval_id}", get_approval, methods=["GET"]),
    Route("/api/approvals/{approval_id}/decision", post_decision, methods=["POST"]),
    WebSocketRoute("/ws/device", device_socket),
]
