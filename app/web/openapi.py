"""The OpenAPI 3.1 document, built from the app's own route table so it cannot drift.

Paths, methods and path parameters come from the routes; what the route table cannot know
(request body model, answers per PROTOCOL.md, who may call) is in `OPERATIONS`, one entry
per route. Request bodies are the same pydantic models the handlers parse with. A route
without an entry is still listed, and tests/integration/test_openapi.py fails until it has one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.routing import BaseRoute, Route, WebSocketRoute

from app.approval.model import END_REASONS
from app.web.account import AccountUpdate, PhoneBody, PhoneCode
from app.web.browser import CodeBody, LoginBody, RecoveryLoginBody
from app.web.devices import DecisionBody, DeviceUpdate, EnrollBody
from app.web.passkeys import AddPasskeyBody, PasskeyRename, PasskeySignInBody
from app.web.registration import EmailBody, RegisterBody, TokenBody
from app.web.relying_party import CreateApproval, PasscodeBody

_PARAM = re.compile(r"{(\w+)(?::\w+)?}")
_REF = "#/components/schemas/{model}"

JSON = "application/json"
HTML = "text/html"
PROMETHEUS = "text/plain; version=0.0.4"
MANIFEST = "application/manifest+json"
JAVASCRIPT = "text/javascript"

Schema = dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """One documented answer: its description and body (a component name or a schema)."""

    description: str
    schema: str | Schema | None = None
    media: str = JSON
    headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Query:
    """A query-string parameter."""

    name: str
    description: str
    schema: Schema
    required: bool = False


@dataclass(frozen=True)
class Operation:
    """What one route takes and answers, beyond what the route table says."""

    replies: dict[int, Reply | str]  # a plain string is an error answer with the Error body
    body: type[BaseModel] | None = None
    auth: tuple[str, ...] = ()  # security scheme names (any one of them)
    query: tuple[Query, ...] = ()
    description: str = ""
    store: bool = True  # touches Redis or the database, so may answer 503
    extra: dict[str, Any] = field(default_factory=dict)


SESSION = ("session",)
DEVICE = ("deviceToken",)
RP_KEY = ("apiKey",)
LOGIN = ("loginCookie",)

_RATE = "rate_limited (with Retry-After)"


def _obj(required: list[str], **properties: Schema) -> Schema:
    return {"type": "object", "required": required, "properties": properties}


def _ref(name: str) -> Schema:
    return {"$ref": _REF.format(model=name)}


def _list(item: Schema) -> Schema:
    return {"type": "array", "items": item}


_STR: Schema = {"type": "string"}
_TIME: Schema = {"type": "string", "format": "date-time"}
_NULLABLE_TIME: Schema = {"type": ["string", "null"], "format": "date-time"}
_STATUS: Schema = {"type": "string", "enum": ["pending", "approved", "denied", "expired"]}
_CHANNELS: Schema = _list(
    {"type": "string", "enum": ["websocket", "fcm", "apns", "webpush", "sms", "email"]}
)
_REASON: Schema = {
    "type": ["string", "null"],
    "enum": [*END_REASONS, None],
    "description": "Why the approval ended; null while pending. approved: device, sms_code, "
    "passcode; "
    "denied: denied, fraud, wrong_number, too_many_codes; expired: timeout (nobody answered "
    "in time), superseded (a newer approval for the same user replaced it). "
    "See docs/protocol-additions.md.",
}

# Answers that are not pydantic models; written from PROTOCOL.md.
RESPONSE_SCHEMAS: dict[str, Schema] = {
    "Error": _obj(["error", "message"], error=_STR, message=_STR),
    "Status": _obj(["status"], status=_STR),
    "Ready": _obj(["status"], status={"const": "ready"}),
    "NotReady": _obj(
        ["error", "message", "failing"],
        error={"const": "unavailable"},
        message=_STR,
        failing=_list({"type": "string", "enum": ["redis", "database"]}),
    ),
    "Match": _obj(
        ["mode", "digits"],
        # confirm: the phone-only confirmation of a Duo integration (docs/duo-compat.md).
        mode={"type": "string", "enum": ["typed", "choices", "nist", "confirm"]},
        digits={"type": "integer", "enum": [2, 6]},
    ),
    "LoginResult": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {
                "type": "string",
                "enum": ["authenticated", "enrollment_required", "approval_required"],
            },
            "approval_id": _STR,
            "number": _STR,
            "match": _ref("Match"),
            "expires_at": _TIME,
            "channels": _CHANNELS,
            "stream": {"type": "string", "description": "WebSocket path /ws/login/<id>"},
        },
    },
    "LoginStatus": _obj(
        ["approval_id", "status", "channels", "delivered", "expires_at"],
        approval_id=_STR,
        status=_STATUS,
        channels=_CHANNELS,
        delivered=_CHANNELS,
        expires_at=_TIME,
        reason=_REASON,
    ),
    "ApprovalContext": _obj(
        ["ip", "user_agent", "browser", "os"],
        ip=_STR,
        user_agent=_STR,
        browser=_STR,
        os=_STR,
        # Only when a relying party described its request (a Duo client's pushinfo).
        details=_list(_obj(["label", "value"], label=_STR, value=_STR)),
    ),
    "Approval": _obj(
        ["id", "status", "created_at", "expires_at", "context", "match", "challenge"],
        id=_STR,
        status=_STATUS,
        created_at=_TIME,
        expires_at=_TIME,
        context=_ref("ApprovalContext"),
        match=_ref("Match"),
        number_choices=_list(_STR),
        challenge={"type": "string", "description": "base64url of 32 random bytes"},
        requester=_obj(
            ["kind", "name"],
            kind={"type": "string", "enum": ["login", "rp"]},
            name={
                "type": ["string", "null"],
                "description": "The relying party's API key name (kind rp); null for a login",
            },
        ),
    ),
    "ApprovalList": _obj(["approvals"], approvals=_list(_ref("Approval"))),
    "Decision": _obj(["status"], status={"type": "string", "enum": ["approved", "denied"]}),
    "Device": _obj(
        ["id", "name", "platform", "created_at"],
        id=_STR,
        device_id=_STR,
        name=_STR,
        platform={"type": "string", "enum": ["android", "ios", "web"]},
        push={"type": ["string", "null"], "enum": ["fcm", "apns", "webpush", None]},
        created_at=_TIME,
        last_seen_at=_NULLABLE_TIME,
    ),
    "DeviceList": _obj(["devices"], devices=_list(_ref("Device"))),
    "Enrollment": _obj(
        ["code", "uri", "qr_svg", "expires_at"],
        code=_STR,
        uri={"type": "string", "description": "tapprove://enroll?url=<PUBLIC_URL>&code=<code>"},
        qr_svg=_STR,
        phone_url={
            "type": "string",
            "description": "<PUBLIC_URL>/phone#enroll=<code>: opens the /phone app with the code "
            "(an addition, docs/protocol-additions.md)",
        },
        phone_qr_svg={"type": "string", "description": "phone_url as a QR code (SVG)"},
        expires_at=_TIME,
    ),
    "WebPushKey": _obj(["public_key"], public_key=_STR),
    "EnrolledDevice": _obj(
        ["device_id", "device_token", "user"],
        device_id=_STR,
        device_token=_STR,
        user=_obj(["email"], email=_STR),
        passcode=_ref("PasscodeSeed"),
    ),
    "PasscodeSeed": {
        **_obj(
            ["secret", "digits", "period", "algorithm"],
            secret={"type": "string", "description": "RFC 4648 base32 of a 160-bit seed"},
            digits={"const": 6},
            period={"const": 30},
            algorithm={"const": "SHA1"},
        ),
        "description": "The device's offline-passcode (TOTP, RFC 6238) seed; keep it secret",
    },
    "TrustedBrowser": _obj(
        ["id", "browser", "os", "ip", "created_at", "expires_at"],
        id=_STR,
        browser=_STR,
        os=_STR,
        ip=_STR,
        created_at=_TIME,
        last_used_at=_NULLABLE_TIME,
        expires_at=_TIME,
        current={"type": "boolean"},
    ),
    "Account": _obj(
        ["email", "phone", "phone_verified", "sms_fallback", "devices", "trusted_browsers"],
        email=_STR,
        phone={"type": ["string", "null"]},
        phone_verified={"type": "boolean"},
        sms_fallback={"type": "boolean"},
        locked={"type": "boolean"},
        restricted={"type": "boolean"},
        devices=_list(_ref("Device")),
        trusted_browsers=_list(_ref("TrustedBrowser")),
        recovery_codes_left={"type": "integer", "minimum": 0, "maximum": 10},
        passkeys=_list(_ref("Passkey")),
        passkeys_enabled={"type": "boolean"},
        signed_in_with={
            "type": "string",
            "enum": [
                "password",
                "device",
                "sms_code",
                "recovery_code",
                "passkey",
                "trusted_browser",
            ],
            "description": "How this session was proven (GET only)",
        },
    ),
    "Passkey": _obj(
        ["id", "name", "created_at", "last_used_at"],
        id=_STR,
        name=_STR,
        created_at=_TIME,
        last_used_at=_NULLABLE_TIME,
    ),
    "PasskeyOptions": _obj(
        ["publicKey"],
        publicKey={
            "type": "object",
            "description": "PublicKeyCredentialCreationOptions or ...RequestOptions in "
            "WebAuthn's JSON form (binary members base64url), for navigator.credentials",
        },
    ),
    "RecoveryCodes": _obj(
        ["codes", "created_at"],
        codes={**_list({"type": "string", "pattern": "^[0-9a-z]{5}-[0-9a-z]{5}$"}), "minItems": 10},
        created_at=_TIME,
    ),
    "RecoverySignIn": _obj(
        ["status", "recovery_codes_left"],
        status={"const": "authenticated"},
        recovery_codes_left={"type": "integer", "minimum": 0},
    ),
    "AuditEvent": _obj(
        ["at", "kind"],
        at=_TIME,
        kind=_STR,
        ip={"type": ["string", "null"]},
        device_id={"type": ["string", "null"]},
        approval_id={"type": ["string", "null"]},
        detail={"type": "object"},
    ),
    "Activity": _obj(["events"], events=_list(_ref("AuditEvent"))),
    "RpApprovalCreated": _obj(
        ["approval_id", "number", "expires_at"],
        approval_id=_STR,
        number=_STR,
        expires_at=_TIME,
        match=_ref("Match"),
        channels=_CHANNELS,
    ),
    "RpApprovalStatus": _obj(
        ["approval_id", "status", "expires_at", "created_at"],
        approval_id=_STR,
        status=_STATUS,
        created_at=_TIME,
        expires_at=_TIME,
        decided_at=_TIME,
        reason=_REASON,
    ),
}

_SENT = Reply("Accepted (the same answer for known and unknown addresses)", "Status")
_PAGE = Operation({200: Reply("The page", {"type": "string"}, HTML)}, store=False)

OPERATIONS: dict[tuple[str, str], Operation] = {
    # --- operations
    ("GET", "/healthz"): Operation(
        {200: Reply("The process is alive (Redis and the database are not asked)", "Status")},
        store=False,
    ),
    ("GET", "/readyz"): Operation(
        {
            200: Reply("Redis and the database answer", "Ready"),
            503: Reply("Not ready; `failing` names the unreachable dependency", "NotReady"),
        },
        store=False,
    ),
    ("GET", "/metrics"): Operation(
        {200: Reply("Prometheus text exposition of this process", {"type": "string"}, PROMETHEUS)},
        store=False,
    ),
    ("GET", "/openapi.json"): Operation(
        {200: Reply("This document", {"type": "object"})}, store=False
    ),
    # --- accounts and email verification (PROTOCOL §1)
    ("POST", "/api/register"): Operation(
        {
            202: _SENT,
            422: "invalid_request: malformed email or a password under 8 characters",
            429: "rate_limited (with Retry-After): too many for this address or this IP",
        },
        body=RegisterBody,
    ),
    ("GET", "/verify-email"): Operation(
        {200: Reply("A page whose button confirms; opening it changes nothing", _STR, HTML)},
        query=(Query("token", "The token from the mailed link", _STR),),
        store=False,
    ),
    ("POST", "/api/verify-email"): Operation(
        {
            200: Reply("Verified", "Status"),
            400: "invalid_or_expired_token (unknown, expired and used alike)",
        },
        body=TokenBody,
    ),
    ("POST", "/api/verify-email/resend"): Operation({202: _SENT}, body=EmailBody),
    # --- sign-in from a browser (PROTOCOL §2)
    ("POST", "/api/login"): Operation(
        {
            200: Reply(
                "Signed in (trusted browser), or a restricted session to enroll a first device",
                "LoginResult",
                headers=("Set-Cookie",),
            ),
            202: Reply(
                "Approval required; stream the result from `stream`",
                "LoginResult",
                headers=("Set-Cookie",),
            ),
            401: "invalid_credentials (unknown email and wrong password alike)",
            403: "email_not_verified; recovery_required (every device is gone and no SMS code "
            "can be sent: the password alone cannot add one; a recovery code can, through "
            "POST /api/login/recovery); passkey_required (the account has a passkey and "
            "TAPPROVE_PASSKEY_ALLOWS_PUSH=false); or csrf",
            423: "locked after a fraud report",
            429: _RATE,
        },
        body=LoginBody,
    ),
    ("POST", "/api/login/recovery"): Operation(
        {
            200: Reply(
                "Signed in with the password and a recovery code (used up now); the session "
                "may add a phone once every phone is gone",
                "RecoverySignIn",
                headers=("Set-Cookie",),
            ),
            400: "invalid_code (wrong, used or malformed recovery code)",
            401: "invalid_credentials (unknown email and wrong password alike)",
            403: "email_not_verified, or csrf",
            423: "locked after a fraud report",
            429: "rate_limited: the sign-in budgets, or 10 wrong codes per account an hour",
        },
        body=RecoveryLoginBody,
    ),
    ("POST", "/api/login/passkey/options"): Operation(
        {
            200: Reply(
                "Options for a usernameless navigator.credentials.get() (a single-use "
                "challenge, 5 minutes, user verification required)",
                "PasskeyOptions",
            ),
            403: "passkeys_disabled (TAPPROVE_PASSKEY_LOGIN=false), or csrf",
            429: "rate_limited: 100 per IP in 5 minutes (with Retry-After)",
        },
    ),
    ("POST", "/api/login/passkey"): Operation(
        {
            200: Reply(
                "Signed in with the passkey: no password, no phone (session cookie)",
                "Status",
                headers=("Set-Cookie",),
            ),
            400: "passkey_refused (expired, replayed or foreign challenge; another origin; "
            "unknown or removed passkey; a user handle not the owner's; a bad signature; a "
            "signature counter that went backwards, which is audited)",
            403: "passkeys_disabled, or csrf",
            423: "locked after a fraud report",
        },
        body=PasskeySignInBody,
    ),
    ("GET", "/api/login/{approval_id}"): Operation(
        {
            200: Reply("The approval's status, for clients without sockets", "LoginStatus"),
            403: "not_allowed: this browser did not start that sign-in",
            404: "not_found",
        },
        auth=LOGIN,
    ),
    ("POST", "/api/login/{approval_id}/complete"): Operation(
        {
            200: Reply("Signed in (session cookie)", "Status", headers=("Set-Cookie",)),
            403: "not_allowed",
            404: "not_found",
            409: "not_approved or already_completed",
        },
        auth=LOGIN,
    ),
    ("POST", "/api/login/{approval_id}/resend"): Operation(
        {
            202: Reply("Sent to the devices again", "Status"),
            403: "not_allowed",
            404: "not_found",
            409: "already_decided",
            410: "expired",
            429: "rate_limited: at most 3 resends",
        },
        auth=LOGIN,
    ),
    ("POST", "/api/login/{approval_id}/sms"): Operation(
        {
            202: Reply("An SMS code is on its way", "Status"),
            403: "not_allowed",
            404: "not_found",
            409: "already_decided or sms_unavailable",
            410: "expired",
            429: _RATE,
        },
        auth=LOGIN,
    ),
    ("POST", "/api/login/{approval_id}/code"): Operation(
        {
            200: Reply("Approved with the SMS code", "Decision"),
            400: "invalid_code (after 5 the approval is denied)",
            403: "not_allowed",
            404: "not_found",
            409: "already_decided",
            410: "expired",
        },
        body=CodeBody,
        auth=LOGIN,
    ),
    ("POST", "/api/login/{approval_id}/passcode"): Operation(
        {
            200: Reply("Approved with an offline passcode from the phone", "Decision"),
            400: "invalid_code (the same for every wrong code, and for a user without a "
            "device; after 5 on one approval it is denied, with status denied)",
            403: "not_allowed",
            404: "not_found",
            409: "already_decided",
            410: "expired",
            429: "rate_limited: 10 wrong passcodes per user in 15 minutes (with Retry-After)",
        },
        body=CodeBody,
        auth=LOGIN,
    ),
    ("POST", "/api/logout"): Operation({200: Reply("The session has ended", "Status")}),
    # --- account (session)
    ("GET", "/api/account"): Operation(
        {200: Reply("The account", "Account"), 401: "unauthorized"}, auth=SESSION
    ),
    ("PATCH", "/api/account"): Operation(
        {200: Reply("The updated account", "Account"), 401: "unauthorized", 403: "not_allowed"},
        body=AccountUpdate,
        auth=SESSION,
    ),
    ("DELETE", "/api/account/trusted-browsers/{browser_id}"): Operation(
        {200: Reply("Revoked", "Status"), 401: "unauthorized", 404: "not_found"}, auth=SESSION
    ),
    ("GET", "/api/account/activity"): Operation(
        {
            200: Reply("The user's recent audit events, newest first", "Activity"),
            401: "unauthorized",
        },
        auth=SESSION,
    ),
    ("POST", "/api/account/recovery-codes"): Operation(
        {
            201: Reply("A new set of codes, shown only in this answer", "RecoveryCodes"),
            401: "unauthorized",
            403: "not_allowed: needs a sign-in approved on a phone, or with a passkey",
        },
        auth=SESSION,
    ),
    ("POST", "/api/account/passkeys/options"): Operation(
        {
            200: Reply(
                "Options for navigator.credentials.create(): discoverable credential, user "
                "verification required, ES256 or RS256, the user's passkeys excluded",
                "PasskeyOptions",
            ),
            401: "unauthorized",
            403: "not_allowed (needs a sign-in approved on a phone, or with a passkey), "
            "passkeys_disabled, or csrf",
        },
        auth=SESSION,
    ),
    ("POST", "/api/account/passkeys"): Operation(
        {
            201: Reply("The passkey was added (the owner is mailed)", "Passkey"),
            400: "passkey_refused (expired or replayed challenge, another origin, no user "
            "verification, an algorithm other than ES256/RS256, a malformed answer)",
            401: "unauthorized",
            403: "not_allowed, passkeys_disabled, or csrf",
            409: "passkey_exists: this credential is already registered",
        },
        body=AddPasskeyBody,
        auth=SESSION,
    ),
    ("PATCH", "/api/account/passkeys/{passkey_id}"): Operation(
        {200: Reply("Renamed", "Passkey"), 401: "unauthorized", 404: "not_found"},
        body=PasskeyRename,
        auth=SESSION,
    ),
    ("DELETE", "/api/account/passkeys/{passkey_id}"): Operation(
        {
            200: Reply("Removed: it no longer signs in", "Status"),
            401: "unauthorized",
            404: "not_found",
        },
        auth=SESSION,
    ),
    ("POST", "/api/account/phone"): Operation(
        {
            202: Reply("A code was texted to the number", "Status"),
            401: "unauthorized",
            409: "sms_unavailable",
            429: _RATE,
            502: "sms_failed",
        },
        body=PhoneBody,
        auth=SESSION,
    ),
    ("POST", "/api/account/phone/verify"): Operation(
        {200: Reply("The phone is verified", "Status"), 400: "invalid_code", 401: "unauthorized"},
        body=PhoneCode,
        auth=SESSION,
    ),
    # --- devices (PROTOCOL §3)
    ("POST", "/api/devices/enrollments"): Operation(
        {
            201: Reply("A single-use enrollment code, link and QR code", "Enrollment"),
            401: "unauthorized",
            403: "not_allowed: a further device needs a sign-in approved with a device; once "
            "every device is gone, a sign-in with an SMS code",
        },
        auth=SESSION,
    ),
    ("POST", "/api/devices"): Operation(
        {
            201: Reply("Enrolled; keep the device token", "EnrolledDevice"),
            400: "invalid_or_expired_code",
            422: "invalid_request (also a public key that is not a P-256 point)",
        },
        body=EnrollBody,
    ),
    ("GET", "/api/devices"): Operation(
        {200: Reply("The user's devices", "DeviceList"), 401: "unauthorized"}, auth=SESSION
    ),
    ("PATCH", "/api/devices/me"): Operation(
        {
            200: Reply("The device", "Device"),
            401: "unauthorized",
            409: "push_in_use: another device holds this Web Push subscription",
            422: "invalid_request (also a Web Push endpoint outside the allowed push services)",
        },
        body=DeviceUpdate,
        auth=DEVICE,
        description='`push` absent leaves the registration, `null` removes it; '
        '`{"provider":"webpush","subscription":PushSubscription.toJSON()}` registers a Web '
        "Push subscription (docs/protocol-additions.md).",
    ),
    ("DELETE", "/api/devices/me"): Operation(
        {200: Reply("Unenrolled", "Status"), 401: "unauthorized"}, auth=DEVICE
    ),
    ("GET", "/api/devices/me/approvals"): Operation(
        {200: Reply("Pending approvals of the user", "ApprovalList"), 401: "unauthorized"},
        auth=DEVICE,
    ),
    ("DELETE", "/api/devices/{device_id}"): Operation(
        {200: Reply("Revoked", "Status"), 401: "unauthorized", 404: "not_found"}, auth=SESSION
    ),
    ("GET", "/api/approvals/{approval_id}"): Operation(
        {
            200: Reply("The approval", "Approval"),
            401: "unauthorized",
            404: "not_found (also another user's)",
        },
        auth=DEVICE,
    ),
    ("POST", "/api/approvals/{approval_id}/decision"): Operation(
        {
            200: Reply("The decision won", "Decision"),
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
    ),
    # --- relying parties (PROTOCOL §5)
    ("POST", "/api/v1/approvals"): Operation(
        {
            201: Reply("The approval was sent to the user's devices", "RpApprovalCreated"),
            401: "unauthorized",
            404: "unknown_user",
            423: "locked",
            429: _RATE,
        },
        body=CreateApproval,
        auth=RP_KEY,
    ),
    ("GET", "/api/v1/approvals/{approval_id}"): Operation(
        {200: Reply("The status", "RpApprovalStatus"), 401: "unauthorized", 404: "not_found"},
        auth=RP_KEY,
        query=(
            Query(
                "wait",
                "Hold the request until the approval ends or this many seconds pass",
                {"type": "number", "minimum": 0, "maximum": 30},
            ),
        ),
    ),
    ("POST", "/api/v1/approvals/{approval_id}/passcode"): Operation(
        {
            200: Reply("Approved with an offline passcode the person typed", "Decision"),
            400: "invalid_code (after 5 on one approval it is denied, with status denied)",
            401: "unauthorized",
            404: "not_found (also another key's approval)",
            409: "already_decided",
            410: "expired",
            429: "rate_limited: 10 wrong passcodes per user in 15 minutes (with Retry-After)",
        },
        body=PasscodeBody,
        auth=RP_KEY,
    ),
    # --- pages
    ("GET", "/"): _PAGE,
    ("GET", "/register"): _PAGE,
    ("GET", "/account"): _PAGE,
    ("GET", "/phone"): _PAGE,
    ("GET", "/phone/manifest.webmanifest"): Operation(
        {200: Reply("The /phone app's web app manifest", {"type": "object"}, MANIFEST)},
        store=False,
    ),
    ("GET", "/phone/sw.js"): Operation(
        {200: Reply("The /phone app's service worker", _STR, JAVASCRIPT)},
        description="Sent with `Service-Worker-Allowed: /phone`, so it controls /phone.",
        store=False,
    ),
    ("GET", "/api/webpush/key"): Operation(
        {200: Reply("The VAPID public key", "WebPushKey")},
        description="The browser's `applicationServerKey` for `pushManager.subscribe()`: "
        "base64url of the uncompressed P-256 point (docs/protocol-additions.md).",
    ),
    ("GET", "/favicon.ico"): Operation(
        {200: Reply("The icon", {"type": "string"}, "image/x-icon")}, store=False
    ),
}

SECURITY_SCHEMES: dict[str, Schema] = {
    "session": {"type": "apiKey", "in": "cookie", "name": "tapprove_session"},
    "loginCookie": {
        "type": "apiKey",
        "in": "cookie",
        "name": "tapprove_login",
        "description": "Binds a browser to the approval its sign-in started",
    },
    "deviceToken": {"type": "http", "scheme": "bearer", "description": "The device token"},
    "apiKey": {"type": "http", "scheme": "bearer", "description": "A relying-party API key"},
}


@dataclass(frozen=True)
class HttpRoute:
    """One method of one HTTP route, as the route table has it."""

    method: str
    path: str  # OpenAPI form: /api/login/{approval_id}
    summary: str
    tag: str


def http_routes(routes: Sequence[BaseRoute]) -> list[HttpRoute]:
    """Every HTTP method of every route (HEAD and static mounts left out)."""
    found: list[HttpRoute] = []
    for route in routes:
        if not isinstance(route, Route):
            continue  # WebSocket routes and the /static mount
        doc = (route.endpoint.__doc__ or "").strip().splitlines()
        summary = doc[0].strip() if doc else route.name
        tag = route.endpoint.__module__.rsplit(".", 1)[-1]
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                found.append(HttpRoute(method, _PARAM.sub(r"{\1}", route.path), summary, tag))
    return found


def websocket_paths(routes: Sequence[BaseRoute]) -> list[str]:
    return [_PARAM.sub(r"{\1}", r.path) for r in routes if isinstance(r, WebSocketRoute)]


def _content(reply: Reply) -> dict[str, Any]:
    schema = _ref(reply.schema) if isinstance(reply.schema, str) else reply.schema
    return {reply.media: {"schema": schema}} if schema is not None else {}


def _responses(operation: Operation) -> dict[str, Any]:
    replies: dict[int, Reply | str] = dict(operation.replies)
    if operation.body is not None:
        replies.setdefault(413, "too_large: the body exceeds 64 KiB")
        replies.setdefault(422, "invalid_request: malformed JSON or a missing or invalid field")
    if operation.store:
        replies.setdefault(503, "unavailable: Redis or the database is down; retry shortly")
    out: dict[str, Any] = {}
    for status in sorted(replies):
        reply = replies[status]
        if isinstance(reply, str):
            reply = Reply(reply, "Error")
        entry: dict[str, Any] = {"description": reply.description}
        content = _content(reply)
        if content:
            entry["content"] = content
        headers: dict[str, Any] = {name: {"schema": _STR} for name in reply.headers}
        if status in (429, 503):
            headers["Retry-After"] = {"schema": {"type": "integer"}, "description": "Seconds"}
        if headers:
            entry["headers"] = headers
        out[str(status)] = entry
    out["default"] = {
        "description": "Any other error, in the one error shape",
        "content": {JSON: {"schema": _ref("Error")}},
    }
    return out


def _operation(route: HttpRoute, spec: Operation | None) -> dict[str, Any]:
    words = re.sub(r"[^A-Za-z0-9]+", "_", route.path).strip("_") or "root"
    operation: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.method.lower()}_{words}",
        "tags": [route.tag],
    }
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _STR}
        for name in _PARAM.findall(route.path)
    ]
    if spec is None:
        operation["responses"] = _responses(Operation({}))
        if parameters:
            operation["parameters"] = parameters
        return operation
    parameters += [
        {
            "name": q.name,
            "in": "query",
            "required": q.required,
            "description": q.description,
            "schema": q.schema,
        }
        for q in spec.query
    ]
    if parameters:
        operation["parameters"] = parameters
    if spec.description:
        operation["description"] = spec.description
    if spec.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {JSON: {"schema": _ref(spec.body.__name__)}},
        }
    if spec.auth:
        operation["security"] = [{name: []} for name in spec.auth]
    operation["responses"] = _responses(spec)
    operation.update(spec.extra)
    return operation


def _body_schemas() -> dict[str, Schema]:
    models = sorted(
        {spec.body for spec in OPERATIONS.values() if spec.body is not None},
        key=lambda model: model.__name__,
    )
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    found: dict[str, Schema] = defs.get("$defs", {})
    return found


def document(public_url: str, routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """OpenAPI 3.1: every HTTP route of `routes` (the app's table, passed in by whoever
    serves the document) with its parameters, request body and answers."""
    paths: dict[str, dict[str, Any]] = {}
    for route in http_routes(routes):
        spec = OPERATIONS.get((route.method, route.path))
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, spec)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tapprove",
            "version": "1",
            "description": "Self-hosted push login approval. WebSockets (not describable in "
            "OpenAPI) are listed under `x-websockets`; see PROTOCOL.md §2 and §3. The browser "
            "stream's `result` frame carries the same `reason` as the status answers.",
        },
        "servers": [{"url": public_url}],
        "paths": paths,
        "components": {
            "schemas": {**_body_schemas(), **RESPONSE_SCHEMAS},
            "securitySchemes": SECURITY_SCHEMES,
        },
        "x-websockets": websocket_paths(routes),
    }
