"""A fake Google OAuth token endpoint + FCM HTTP v1 `messages:send`, on aiohttp.

Real pyfcm talks to it when its `FCM_END_POINT_BASE` is `fake.endpoint` and its service
account's `token_uri` is `fake.token_uri` (see `write_service_account`).
"""

from __future__ import annotations

import functools
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes import AiohttpFake, Reply, ReplyScript

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
# google-auth puts Google's endpoint in the assertion's `aud`, whatever the token_uri.
ASSERTION_AUDIENCE = "https://oauth2.googleapis.com/token"
_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"


# Answers, shaped like Google's (https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode)


def _google_error(
    code: int, status: str, message: str, fcm_code: str | None, extra: list[Any] | None = None
) -> dict[str, Any]:
    details: list[Any] = [{"@type": _FCM_ERROR, "errorCode": fcm_code}] if fcm_code else []
    return {
        "error": {
            "code": code,
            "message": message,
            "status": status,
            "details": details + (extra or []),
        }
    }


def _retry_headers(retry_after: int | None) -> dict[str, str]:
    return {} if retry_after is None else {"Retry-After": str(retry_after)}


def ok(name: str | None = None, *, delay: float = 0.0) -> Reply:
    """200 with the message name (the default answer)."""
    return Reply(200, {"name": name or f"projects/p/messages/{secrets.token_hex(8)}"}, delay=delay)


def unregistered() -> Reply:
    """404 NOT_FOUND / UNREGISTERED: the app was uninstalled or the token expired."""
    return Reply(
        404, _google_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
    )


def invalid_registration() -> Reply:
    """400 INVALID_ARGUMENT naming `message.token`: not a valid registration token."""
    text = "The registration token is not a valid FCM registration token"
    violation = {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [{"field": "message.token", "description": text}],
    }
    return Reply(400, _google_error(400, "INVALID_ARGUMENT", text, "INVALID_ARGUMENT", [violation]))


def invalid_argument(message: str = "Invalid value at 'message.data[0].value'") -> Reply:
    """400 INVALID_ARGUMENT about the payload, not the token."""
    return Reply(400, _google_error(400, "INVALID_ARGUMENT", message, "INVALID_ARGUMENT"))


def unauthenticated() -> Reply:
    """401: the OAuth token was not accepted."""
    text = "Request had invalid authentication credentials."
    return Reply(401, _google_error(401, "UNAUTHENTICATED", text, "THIRD_PARTY_AUTH_ERROR"))


def sender_id_mismatch() -> Reply:
    """403 PERMISSION_DENIED / SENDER_ID_MISMATCH."""
    text = "SenderId mismatch"
    return Reply(403, _google_error(403, "PERMISSION_DENIED", text, "SENDER_ID_MISMATCH"))


def quota_exceeded(retry_after: int | None = 10) -> Reply:
    """429 RESOURCE_EXHAUSTED / QUOTA_EXCEEDED, with Retry-After."""
    body = _google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED")
    return Reply(429, body, headers=_retry_headers(retry_after))


def unavailable(retry_after: int | None = 30) -> Reply:
    """503 UNAVAILABLE, with Retry-After."""
    body = _google_error(503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE")
    return Reply(503, body, headers=_retry_headers(retry_after))


def internal() -> Reply:
    """500 INTERNAL."""
    return Reply(500, _google_error(500, "INTERNAL", "Internal error encountered.", "INTERNAL"))


def slow(delay: float) -> Reply:
    """A success that comes only after `delay` seconds (to make the client time out)."""
    return ok(delay=delay)


@dataclass(frozen=True)
class TokenRequest:
    """One POST to the token endpoint (an OAuth 2.0 JWT-bearer grant)."""

    form: dict[str, str]
    headers: dict[str, str]

    @property
    def assertion(self) -> str:
        return self.form.get("assertion", "")

    def claims(
        self, public_key_pem: bytes, *, audience: str = ASSERTION_AUDIENCE
    ) -> dict[str, Any]:
        """The assertion's claims, checking its RS256 signature and audience."""
        claims: dict[str, Any] = jwt.decode(
            self.assertion, public_key_pem, algorithms=["RS256"], audience=audience
        )
        return claims


@dataclass(frozen=True)
class FcmRequest:
    """One POST to `/v1/projects/{project}/messages:send`."""

    path: str
    project: str
    headers: dict[str, str]
    json: Any

    @property
    def authorization(self) -> str | None:
        return self.headers.get("Authorization")

    @property
    def message(self) -> dict[str, Any]:
        """The `message` object pyfcm sent (token, data, notification, android...)."""
        message: dict[str, Any] = self.json["message"]
        return message


class FakeFcm(AiohttpFake):
    """Token endpoint at `/token`, FCM at `/v1/projects/{project}/messages:send`.

    Without a scripted reply, a send with a Bearer token this fake issued gets 200
    `{"name": ...}` and any other gets 401, as Google would answer.
    """

    def __init__(self, project_id: str = "tapprove-test") -> None:
        super().__init__()
        self.project_id = project_id
        self.requests: list[FcmRequest] = []
        self.token_requests: list[TokenRequest] = []
        self.token_replies = ReplyScript()
        self.issued_tokens: list[str] = []

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    @property
    def endpoint(self) -> str:
        """The value for TAPPROVE_FCM_ENDPOINT / pyfcm's FCM_END_POINT_BASE."""
        return f"{self.url}/v1/projects"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/token", self._token)
        app.router.add_post("/v1/projects/{project}/messages:send", self._send)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        self.token_requests.append(
            TokenRequest({k: str(v) for k, v in form.items()}, dict(request.headers))
        )
        scripted = self.token_replies.next()
        if scripted is not None:
            await self.pause(scripted.delay)
            return self.respond(scripted)
        token = f"ya29.fake-{secrets.token_urlsafe(16)}"
        self.issued_tokens.append(token)
        return web.json_response(
            {"access_token": token, "expires_in": 3600, "token_type": "Bearer"}
        )

    async def _send(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        project = request.match_info["project"]
        record = FcmRequest(request.path, project, dict(request.headers), body)
        self.requests.append(record)
        if record.authorization not in {f"Bearer {t}" for t in self.issued_tokens}:
            return self.respond(unauthenticated())
        reply = self.replies.next() or ok(f"projects/{project}/messages/{secrets.token_hex(8)}")
        await self.pause(reply.delay)
        return self.respond(reply)


@dataclass(frozen=True)
class ServiceAccount:
    """A service-account JSON written for a test, and what checks its token requests."""

    path: Path
    project_id: str
    client_email: str
    token_uri: str
    public_key_pem: bytes


@functools.cache
def _rsa_key() -> rsa.RSAPrivateKey:
    # 2048-bit generation takes ~0.1 s; one key serves every test of the session.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_service_account(path: Path, *, token_uri: str, project_id: str) -> ServiceAccount:
    """Write a Google service-account JSON whose `token_uri` points at a fake."""
    key = _rsa_key()
    client_email = f"tapprove-push@{project_id}.iam.gserviceaccount.com"
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii"),
        "client_email": client_email,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info, indent=2), encoding="utf-8")
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ServiceAccount(path, project_id, client_email, token_uri, public_pem)
