"""Routes a phone calls (bearer device token), and enrollment; the device WebSocket itself is
app.web.device_socket."""

from __future__ import annotations

import io
import logging
from typing import Annotated, Any, Literal
from urllib.parse import quote

import orjson
import segno
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from app import passcodes
from app.approval.answer import decide
from app.approval.errors import NotFound
from app.approval.model import PendingApproval
from app.approval.waiting import as_of_now
from app.core.clock import rfc3339, to_datetime
from app.core.enrollment import EnrollmentRefused, enrollment_kind, enrollment_uri
from app.core.errors import ApiError
from app.core.signatures import parse_device_jwk
from app.core.tokens import hash_token, new_id, new_token
from app.db import audit
from app.db.accounts import (
    active_devices,
    consume_enrollment_code,
    create_enrollment_code,
    list_active_devices,
)
from app.db.models import Device as DeviceRow
from app.db.models import OutboxMessage, User
from app.delivery import notices, outbox
from app.delivery.push_endpoints import EndpointPolicy, EndpointRefused
from app.delivery.webpush import (
    InvalidSubscription,
    Subscription,
    stored_prefix,
    subscription_box,
)
from app.server_keys import vapid_private_key, vapid_public_key
from app.services import Services
from app.store.presence import account_changed
from app.web.common import (
    authenticated_device,
    client_ip,
    current_session,
    plausible_id,
    request_context,
    services,
)
from app.web.contract import (
    DEVICE,
    SESSION,
    Answer,
    ApprovalStatus,
    Decision,
    Done,
    Match,
    Reply,
    Time,
    answer,
    answers,
    omitted_if_none,
)
from app.web.device_socket import PATH as DEVICE_SOCKET_PATH
from app.web.device_socket import device_socket
from app.web.errors import StrictBody, read_body
from app.web.security import check_csrf

log = logging.getLogger(__name__)


class PushRegistration(StrictBody):
    provider: Literal["fcm", "apns"]
    token: str = Field(min_length=1, max_length=4096)


class WebPushKeys(StrictBody):
    # base64url of a 65-byte P-256 point and of 16 bytes (padding allowed, checked further).
    p256dh: str = Field(min_length=87, max_length=88)
    auth: str = Field(min_length=22, max_length=24)


class WebPushSubscription(StrictBody):
    """A browser's PushSubscription.toJSON() (`expirationTime` and any other member ignored)."""

    endpoint: str = Field(min_length=1, max_length=2048)
    keys: WebPushKeys


class WebPushRegistration(StrictBody):
    provider: Literal["webpush"]
    subscription: WebPushSubscription


AnyPushRegistration = Annotated[
    PushRegistration | WebPushRegistration, Field(discriminator="provider")
]


class EnrollBody(StrictBody):
    code: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=100)
    platform: Literal["android", "ios", "web"]
    public_key: dict[str, Any]
    push: AnyPushRegistration | None = None


class DeviceUpdate(StrictBody):
    name: str | None = Field(default=None, min_length=1, max_length=100)
    # Absent: unchanged; null: the device's push registration is removed.
    push: AnyPushRegistration | None = None


class DecisionBody(StrictBody):
    jws: str = Field(min_length=1, max_length=8192)


class Device(Answer):
    """A device as the account owner sees it (`id` and `device_id` are the same value)."""

    id: str
    device_id: str
    name: str
    platform: Literal["android", "ios", "web"]
    push: Literal["fcm", "apns", "webpush"] | None
    created_at: Time
    last_seen_at: Time | None

    @classmethod
    def of(cls, device: DeviceRow) -> Device:
        return cls(
            id=device.id,
            device_id=device.id,
            name=device.name,
            platform=device.platform,
            push=device.push_provider if device.push_token else None,
            created_at=rfc3339(device.created_at),
            last_seen_at=rfc3339(device.last_seen_at) if device.last_seen_at else None,
        )


class DeviceList(Answer):
    devices: list[Device]


class Enrollment(Answer):
    code: str
    uri: str = Field(description="tapprove://enroll?url=<PUBLIC_URL>&code=<code>")
    qr_svg: str
    phone_url: str = Field(
        description="<PUBLIC_URL>/phone#enroll=<code>: opens the /phone app with the code "
        "(an addition to PROTOCOL.md v1)"
    )
    phone_qr_svg: str = Field(description="phone_url as a QR code (SVG)")
    expires_at: Time


class PasscodeSeed(Answer):
    """The device's offline-passcode (TOTP, RFC 6238) seed; keep it secret."""

    secret: str = Field(description="RFC 4648 base32 of a 160-bit seed")
    digits: Literal[6]
    period: Literal[30]
    algorithm: Literal["SHA1"]


class EnrolledUser(Answer):
    email: str


class EnrolledDevice(Answer):
    device_id: str
    device_token: str
    user: EnrolledUser
    passcode: PasscodeSeed


class ContextDetail(Answer):
    label: str
    value: str


class ApprovalContext(Answer):
    ip: str
    user_agent: str
    browser: str
    os: str
    # Only when a relying party described its request (a Duo client's pushinfo).
    details: list[ContextDetail] | SkipJsonSchema[None] = omitted_if_none()


class Requester(Answer):
    kind: Literal["login", "rp"]
    name: str | None = Field(
        description="The relying party's API key name (kind rp); null for a login"
    )


class Approval(Answer):
    """The protocol's Approval object (PROTOCOL §3; `requester` and `context.details` are
    additions). Its one serializer is PendingApproval.device_json, which the device socket
    and the push jobs send as well; this model checks and documents that shape."""

    id: str
    status: ApprovalStatus
    created_at: Time
    expires_at: Time
    context: ApprovalContext
    match: Match
    requester: Requester
    # Only in choices (and confirm) mode.
    number_choices: list[str] | SkipJsonSchema[None] = omitted_if_none()
    challenge: str = Field(description="base64url of 32 random bytes")

    @classmethod
    def of(cls, approval: PendingApproval) -> Approval:
        return cls.model_validate(approval.device_json())


class ApprovalList(Answer):
    approvals: list[Approval]


class WebPushKey(Answer):
    public_key: str = Field(description="base64url of the 65-byte uncompressed P-256 point")


async def _push_token(
    svc: Services,
    db: AsyncSession,
    push: PushRegistration | WebPushRegistration,
    *,
    device_id: str,
) -> tuple[str, str]:
    """The provider and stored token of a push registration; a Web Push subscription is
    checked (keys, the endpoint against the SSRF policy, no other device holding it) and
    stored with its auth secret sealed."""
    if isinstance(push, PushRegistration):
        return push.provider, push.token
    given = push.subscription
    try:
        EndpointPolicy.from_settings(svc.settings).check(given.endpoint)
    except EndpointRefused as refused:
        raise ApiError(422, "invalid_request", f"push.subscription.endpoint: {refused}") from None
    try:
        subscription = Subscription.parse(given.endpoint, given.keys.p256dh, given.keys.auth)
    except InvalidSubscription as exc:
        raise ApiError(422, "invalid_request", f"push.subscription.{exc}") from None
    holder = await db.exec(
        select(DeviceRow.id).where(
            DeviceRow.push_provider == "webpush",
            DeviceRow.revoked_at == None,  # noqa: E711
            DeviceRow.id != device_id,
            col(DeviceRow.push_token).startswith(stored_prefix(given.endpoint), autoescape=True),
        )
    )
    if holder.first() is not None:
        raise ApiError(409, "push_in_use", "this push subscription belongs to another device")
    return "webpush", subscription.stored(subscription_box(svc.settings))


def _qr_svg(uri: str) -> str:
    """The enrollment link as a standalone SVG (with its namespace, so it works as an image)."""
    buffer = io.BytesIO()
    segno.make(uri, error="m").save(
        buffer, kind="svg", xmldecl=False, nl=False, scale=4, dark="#111", light="#fff"
    )
    return buffer.getvalue().decode()


@answers(
    {
        201: Reply("A single-use enrollment code, link and QR code", Enrollment),
        401: "unauthorized",
        403: "not_allowed: a further device needs a sign-in approved with a device; once "
        "every device is gone, a sign-in with an SMS code, a recovery code or a passkey",
    },
    auth=SESSION,
)
async def create_enrollment(request: Request) -> Response:
    """POST /api/devices/enrollments: a one-time code (and QR) to add a phone.

    Which sessions may make one is app.core.enrollment's rule; the code records the kind, and
    using it checks the rule again, atomically (app.db.accounts.consume_enrollment_code).
    """
    svc = services(request)
    check_csrf(request, svc.settings)
    session = await current_session(request)
    now = svc.clock.now()
    ip = client_ip(request)
    notice: OutboxMessage | None = None
    async with svc.db() as db:
        user = await db.get(User, session.user_id)
        if user is None:
            raise ApiError(401, "unauthorized", "sign in first")
        try:
            kind = enrollment_kind(
                has_device=bool(await list_active_devices(db, user.id)),
                had_second_factor=user.second_factor_at is not None,
                restricted=session.restricted,
                approved_with_device=session.approved_with_device,
                approved_with_sms=session.approved_with_sms,
                approved_with_recovery_code=session.approved_with_recovery_code,
                signed_in_with_passkey=session.signed_in_with_passkey,
            )
        except EnrollmentRefused as refused:
            raise ApiError(403, "not_allowed", refused.message) from None
        code, expires_at = await create_enrollment_code(
            db, user.id, now=now, kind=kind, enrollments_seen=user.device_enrollments
        )
        await audit.record(
            db,
            "device.enrollment_started",
            user_id=user.id,
            ip=ip,
            detail={"kind": kind},
            now=now,
        )
        # A recovery code was mailed about when it was used; an SMS code is mailed about here.
        if kind == "recovery" and session.approved_with_sms:
            notice = notices.account_recovery(
                svc.settings, db, user, method="sms", context=request_context(request), now=now
            )
        await db.commit()
    if notice is not None:
        await outbox.kick(svc, notice.id)
    uri = enrollment_uri(svc.settings.public_url, code)
    # For a phone's camera: opens the /phone page with the code (a fragment never reaches
    # the server's logs), where the person enrolls and installs it.
    phone_url = f"{svc.settings.public_url}/phone#enroll={quote(code, safe='')}"
    enrollment = Enrollment(
        code=code,
        uri=uri,
        qr_svg=_qr_svg(uri),
        phone_url=phone_url,
        phone_qr_svg=_qr_svg(phone_url),
        expires_at=rfc3339(expires_at),
    )
    return answer(enrollment, 201)


@answers(
    {
        201: Reply("Enrolled; keep the device token and the passcode seed", EnrolledDevice),
        400: "invalid_or_expired_code",
        409: "push_in_use: another device holds this Web Push subscription",
        422: "invalid_request (also a public key that is not a P-256 point, or a Web Push "
        "endpoint outside the allowed push services)",
    },
    body=EnrollBody,
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
        device_id = new_id()
        push_provider, push_token = (
            await _push_token(svc, db, body.push, device_id=device_id)
            if body.push
            else (None, None)
        )
        # The offline-passcode seed travels in this answer: the device confirms it by having it.
        sealed_seed, passcode = passcodes.new_device_seed(svc, device_id)
        device = DeviceRow(
            id=device_id,
            user_id=user_id,
            name=body.name.strip() or "Phone",
            platform=body.platform,
            public_jwk=orjson.dumps(jwk).decode(),
            token_hash=hash_token(token),
            push_provider=push_provider,
            push_token=push_token,
            created_at=to_datetime(now),
            passcode_seed=sealed_seed,
            passcode_confirmed_at=to_datetime(now),
        )
        db.add(device)
        context = request_context(request)
        await audit.record(
            db,
            "device.added",
            user_id=user_id,
            device_id=device.id,
            ip=context.ip,
            detail={"name": device.name, "platform": device.platform},
            now=now,
        )
        notice = notices.device_added(svc.settings, db, user, device, context=context, now=now)
        await db.commit()
    await account_changed(svc.redis, svc.keys, user_id)
    await outbox.kick(svc, notice.id)
    enrolled = EnrolledDevice(
        device_id=device.id,
        device_token=token,
        user=EnrolledUser(email=user.email),
        passcode=PasscodeSeed.model_validate(passcode),
    )
    return answer(enrolled, 201)


@answers(
    {
        200: Reply("The device", Device),
        401: "unauthorized",
        409: "push_in_use: another device holds this Web Push subscription",
        422: "invalid_request (also a Web Push endpoint outside the allowed push services)",
    },
    body=DeviceUpdate,
    auth=DEVICE,
    description="`push` absent leaves the registration, `null` removes it; "
    '`{"provider":"webpush","subscription":PushSubscription.toJSON()}` registers a Web '
    "Push subscription (additions to PROTOCOL.md v1: docs/protocol.md §4.3).",
)
async def update_me(request: Request) -> Response:
    """PATCH /api/devices/me: rename, refresh or remove the push registration."""
    svc = services(request)
    device = await authenticated_device(request)
    body = await read_body(request, DeviceUpdate)
    now = svc.clock.now()
    push_given = "push" in body.model_fields_set
    async with svc.db() as db:
        current = await db.get(DeviceRow, device.id)
        assert current is not None
        if body.name is not None:
            current.name = body.name.strip() or current.name
        if body.push is not None:
            current.push_provider, current.push_token = await _push_token(
                svc, db, body.push, device_id=device.id
            )
        elif push_given:
            current.push_provider = current.push_token = None
        db.add(current)
        await audit.record(
            db,
            "device.updated",
            user_id=device.user_id,
            device_id=device.id,
            ip=client_ip(request),
            detail={
                "name": body.name is not None,
                "push": push_given,
                **({"push_provider": current.push_provider} if push_given else {}),
            },
            now=now,
        )
        await db.commit()
    await account_changed(svc.redis, svc.keys, device.user_id)
    return answer(Device.of(current))


async def _revoke(svc: Services, device: DeviceRow, *, ip: str, by: str) -> None:
    now = svc.clock.now()
    async with svc.db() as db:
        current = await db.get(DeviceRow, device.id)
        if current is None or current.revoked_at is not None:
            return
        current.revoked_at = to_datetime(now)
        current.push_token = None  # a Web Push subscription too: nothing is sent to it again
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


@answers({200: Reply("Unenrolled (`revoked`)", Done), 401: "unauthorized"}, auth=DEVICE)
async def delete_me(request: Request) -> Response:
    """DELETE /api/devices/me: a phone unenrolls itself."""
    svc = services(request)
    device = await authenticated_device(request)
    await _revoke(svc, device, ip=client_ip(request), by="device")
    return answer(Done(status="revoked"))


@answers(
    {200: Reply("Pending approvals of the user", ApprovalList), 401: "unauthorized"},
    auth=DEVICE,
)
async def my_pending(request: Request) -> Response:
    """GET /api/devices/me/approvals: pending approvals, for an app that just opened."""
    svc = services(request)
    device = await authenticated_device(request)
    approval = await svc.approvals.pending_for_user(device.user_id)
    return answer(ApprovalList(approvals=[Approval.of(approval)] if approval else []))


@answers(
    {
        200: Reply("The approval", Approval),
        401: "unauthorized",
        404: "not_found (also another user's)",
    },
    auth=DEVICE,
)
async def get_approval(request: Request) -> Response:
    """GET /api/approvals/<id>: one approval of the device's user (404 for anyone else's)."""
    svc = services(request)
    device = await authenticated_device(request)
    found = await svc.approvals.get(request.path_params["approval_id"])
    if found is None or found.user_id != device.user_id:
        raise NotFound()
    approval = await as_of_now(svc, found) or found
    return answer(Approval.of(approval))


@answers(
    {
        200: Reply("The decision won", Decision),
        400: "bad_signature",
        401: "unauthorized",
        404: "not_found",
        409: "already_decided",
        410: "expired",
        422: "wrong_number (the approval is then denied), or invalid_request",
    },
    body=DecisionBody,
    auth=DEVICE,
    description="`jws` is a compact ES256 JWS with header {alg, kid=device_id} and claims "
    "{aid, chl, decision, number, reason?, iat}.",
)
async def post_decision(request: Request) -> Response:
    """POST /api/approvals/<id>/decision: a signed answer over HTTP (e.g. after a push)."""
    svc = services(request)
    device = await authenticated_device(request)
    body = await read_body(request, DecisionBody)
    status = await decide(
        svc, device, request.path_params["approval_id"], body.jws, ip=client_ip(request)
    )
    return answer(Decision(status=status.value))


@answers(
    {200: Reply("The VAPID public key", WebPushKey)},
    description="The browser's `applicationServerKey` for `pushManager.subscribe()`: "
    "base64url of the uncompressed P-256 point (an addition to PROTOCOL.md v1).",
)
async def webpush_key(request: Request) -> Response:
    """GET /api/webpush/key: the VAPID public key, the browser's `applicationServerKey`."""
    key = vapid_public_key(vapid_private_key(services(request).settings))
    return answer(WebPushKey(public_key=key))


@answers({200: Reply("The user's devices", DeviceList), 401: "unauthorized"}, auth=SESSION)
async def list_devices(request: Request) -> Response:
    """GET /api/devices: the signed-in user's devices."""
    svc = services(request)
    session = await current_session(request)
    devices = await active_devices(svc.db, session.user_id)
    return answer(DeviceList(devices=[Device.of(d) for d in devices]))


@answers(
    {
        200: Reply("Revoked (`revoked`)", Done),
        401: "unauthorized",
        403: "not_allowed (a restricted session)",
        404: "not_found",
    },
    auth=SESSION,
)
async def revoke_device(request: Request) -> Response:
    """DELETE /api/devices/<id>: the owner revokes one of their devices."""
    svc = services(request)
    check_csrf(request, svc.settings)
    session = await current_session(request, allow_restricted=False)
    device_id = request.path_params["device_id"]
    async with svc.db() as db:
        device = await db.get(DeviceRow, device_id) if plausible_id(device_id) else None
    if device is None or device.user_id != session.user_id or device.revoked_at is not None:
        raise ApiError(404, "not_found", "no such device")
    await _revoke(svc, device, ip=client_ip(request), by="owner")
    return answer(Done(status="revoked"))


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
    Route("/api/webpush/key", webpush_key, methods=["GET"]),
    WebSocketRoute(DEVICE_SOCKET_PATH, device_socket),
]
