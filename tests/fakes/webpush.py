"""A fake Web Push service (RFC 8030) on 127.0.0.1, holding browser-side subscriptions.

`fake.subscribe()` makes what a browser's `pushManager.subscribe()` would: a P-256 key pair
and a 16-byte auth secret of its own, and an endpoint at this service. Every push it gets is
checked the way a real push service and browser would: the VAPID token (RFC 8292: `vapid
t=…,k=…`, ES256 over the claims, `aud` = this origin, `exp` in the future and within 24 h,
a mailto:/https: `sub`, `k` = the application server key the subscription was made for),
then the body decrypted (RFC 8291, aes128gcm) with the subscription's private key and auth
secret through `http_ece`. A push that fails a check gets the status a push service gives
(401/403/400) and is recorded with the reason.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import http_ece
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes import AiohttpFake, Reply


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def gone() -> Reply:
    """410 Gone: the subscription expired or the browser unsubscribed (RFC 8030 §7.3)."""
    return Reply(410, body=b"push subscription has unsubscribed or expired.")


def not_found() -> Reply:
    return Reply(404, body=b"no such subscription")


def too_many(retry_after: int | None = 1) -> Reply:
    """429 with Retry-After (RFC 8030 §8.4)."""
    return Reply(429, headers={} if retry_after is None else {"Retry-After": str(retry_after)})


def unavailable() -> Reply:
    return Reply(503)


def redirect(location: str) -> Reply:
    """307 to `location`: a sender that follows it sends the push there."""
    return Reply(307, headers={"Location": location})


@dataclass
class BrowserSubscription:
    """A subscription as the browser keeps it (private key and auth secret) and shares it."""

    id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes
    server_key: str  # the applicationServerKey it was made for (base64url)

    @property
    def p256dh(self) -> str:
        point = self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return b64url(point)

    def to_json(self) -> dict[str, Any]:
        """What PushSubscription.toJSON() gives the page."""
        return {
            "endpoint": self.endpoint,
            "expirationTime": None,
            "keys": {"p256dh": self.p256dh, "auth": b64url(self.auth)},
        }


@dataclass(frozen=True)
class PushRequest:
    """One POST to a subscription's endpoint, with what the checks found."""

    path: str
    subscription_id: str
    headers: dict[str, str]
    body: bytes
    arrived: float
    claims: dict[str, Any] | None = None
    payload: dict[str, Any] | None = None  # decrypted JSON, None if it did not decrypt
    plaintext: bytes | None = None
    refused: str | None = None  # why the checks failed, None when they passed

    @property
    def ttl(self) -> int:
        return int(self.headers.get("TTL", "-1"))


class FakePushService(AiohttpFake):
    """Endpoints at `/push/<id>`; anything else under `/elsewhere/...` is recorded too (to
    show that a redirect was or was not followed)."""

    def __init__(self) -> None:
        super().__init__()
        self.subscriptions: dict[str, BrowserSubscription] = {}
        self.requests: list[PushRequest] = []
        self.elsewhere: list[str] = []

    @property
    def origin(self) -> str:
        return self.url

    @property
    def test_endpoint(self) -> str:
        """The value for TAPPROVE_WEBPUSH_TEST_ENDPOINTS."""
        return f"127.0.0.1:{self.port}"

    def subscribe(self, server_key: str) -> BrowserSubscription:
        """A new subscription for the application server key `server_key` (base64url)."""
        sub_id = secrets.token_urlsafe(24)
        subscription = BrowserSubscription(
            sub_id,
            f"{self.url}/push/{sub_id}",
            ec.generate_private_key(ec.SECP256R1()),
            secrets.token_bytes(16),
            server_key,
        )
        self.subscriptions[sub_id] = subscription
        return subscription

    def delivered(self) -> list[PushRequest]:
        """The pushes that passed every check and were accepted."""
        return [r for r in self.requests if r.refused is None and r.payload is not None]

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/push/{sub_id}", self._push)
        app.router.add_route("*", "/elsewhere/{tail:.*}", self._elsewhere)

    async def _elsewhere(self, request: web.Request) -> web.StreamResponse:
        self.elsewhere.append(request.path)
        return web.Response(status=201)

    async def _push(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = dict(request.headers)
        sub_id = request.match_info["sub_id"]
        subscription = self.subscriptions.get(sub_id)
        base = {
            "path": request.path,
            "subscription_id": sub_id,
            "headers": headers,
            "body": body,
            "arrived": time.time(),
        }
        if subscription is None:
            self.requests.append(PushRequest(**base, refused="unknown subscription"))
            return web.Response(status=404)
        try:
            claims = self.check_vapid(headers.get("Authorization", ""), subscription)
        except ValueError as exc:
            self.requests.append(PushRequest(**base, refused=f"vapid: {exc}"))
            return web.Response(status=403 if "key" in str(exc) else 401, text=str(exc))
        if headers.get("Content-Encoding") != "aes128gcm" or "TTL" not in headers:
            self.requests.append(PushRequest(**base, claims=claims, refused="headers"))
            return web.Response(status=400, text="Content-Encoding aes128gcm and TTL required")
        try:
            plaintext = http_ece.decrypt(
                body,
                private_key=subscription.private_key,
                auth_secret=subscription.auth,
                version="aes128gcm",
            )
            payload = json.loads(plaintext)
        except Exception as exc:  # anything the browser could not decrypt is dropped
            self.requests.append(PushRequest(**base, claims=claims, refused=f"decrypt: {exc}"))
            return web.Response(status=400, text="could not decrypt")
        record = PushRequest(**base, claims=claims, payload=payload, plaintext=plaintext)
        scripted = self.replies.next()
        if scripted is not None:
            # A scripted failure is what the service answered, not a message it took.
            self.requests.append(
                record if scripted.status == 201 else _refused(record, scripted.status)
            )
            await self.pause(scripted.delay)
            return self.respond(scripted)
        self.requests.append(record)
        return web.Response(
            status=201, headers={"Location": f"{self.url}/message/{secrets.token_urlsafe(8)}"}
        )

    def check_vapid(self, authorization: str, subscription: BrowserSubscription) -> dict[str, Any]:
        """The VAPID claims, if the header is RFC 8292's and everything checks out."""
        scheme, _, params = authorization.partition(" ")
        if scheme.lower() != "vapid":
            raise ValueError(f"scheme {scheme!r} is not vapid")
        fields = dict(part.strip().split("=", 1) for part in params.split(",") if "=" in part)
        token, key = fields.get("t", ""), fields.get("k", "")
        if key != subscription.server_key:
            raise ValueError("k is not the key the subscription was made for")
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(key))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                public,
                algorithms=["ES256"],
                audience=self.origin,
                options={"require": ["aud", "exp", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise ValueError(f"token: {exc}") from None
        if claims["exp"] > time.time() + 24 * 3600:
            raise ValueError("exp more than 24 hours ahead")
        if not str(claims["sub"]).startswith(("mailto:", "https:")):
            raise ValueError("sub is not a mailto: or https: contact")
        return claims


def _refused(record: PushRequest, status: int) -> PushRequest:
    return PushRequest(
        record.path,
        record.subscription_id,
        record.headers,
        record.body,
        record.arrived,
        record.claims,
        record.payload,
        record.plaintext,
        refused=f"scripted {status}",
    )
