"""Web Push adapter (RFC 8030 transport, RFC 8291 encryption, RFC 8292 VAPID): reaches the
installed /phone web app through the browser's own push service, no app store involved.

A device's Web Push registration is its browser's PushSubscription: the endpoint (a URL
at the push service), `p256dh` (the browser's public key) and `auth` (a 16-byte secret the
browser shares only with us). It is stored as the device's push token, a small JSON object
whose `auth` is sealed (app.server_keys.SecretBox): the auth secret is what lets the
browser tell our messages from anyone else's, the push service included (RFC 8291 §1), so
a database copy alone must not let anyone forge one.

pywebpush encrypts (`WebPusher.encode`, aes128gcm via http_ece) and py-vapid signs the
VAPID token; the request itself goes out on our own aiohttp session, because pywebpush's
senders follow redirects and resolve names themselves: ours follows none and connects only
to the addresses app.delivery.push_endpoints checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02
from pywebpush import WebPusher
from yarl import URL

from app.delivery.push import PushMessage, PushResult
from app.delivery.push_endpoints import (
    Endpoint,
    EndpointPolicy,
    EndpointRefused,
    GuardedResolver,
)
from app.delivery.retry import parse_retry_after
from app.server_keys import SealError, SecretBox, secret_key, vapid_private_key
from app.settings import Settings

DEFAULT_TIMEOUT = 10.0
# A VAPID token is valid this long (RFC 8292 allows 24 h; Apple's service wants less).
VAPID_TOKEN_LIFE = 3600
P256DH_BYTES = 65  # an uncompressed P-256 point
AUTH_BYTES = 16  # RFC 8291 §3.2
SEAL_PURPOSE = "webpush-auth"
ACCEPTED = frozenset({200, 201, 202})
GONE = frozenset({404, 410})  # RFC 8030 §7.3: the subscription expired or was removed


class InvalidSubscription(ValueError):
    """A subscription that is not well formed (the message names the member)."""


def _b64url_bytes(value: str, member: str) -> bytes:
    if not value or any(c not in _B64URL for c in value.rstrip("=")):
        raise InvalidSubscription(f"{member}: not base64url")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, binascii.Error):
        raise InvalidSubscription(f"{member}: not base64url") from None


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class Subscription:
    """A browser's PushSubscription: where to send, and the keys to encrypt for."""

    endpoint: str
    p256dh: bytes
    auth: bytes

    @classmethod
    def parse(cls, endpoint: str, p256dh: str, auth: str) -> Subscription:
        """Check the keys as RFC 8291 defines them (the endpoint is the policy's business)."""
        point = _b64url_bytes(p256dh, "keys.p256dh")
        if len(point) != P256DH_BYTES or point[0] != 4:
            raise InvalidSubscription("keys.p256dh: not an uncompressed P-256 public key")
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        except ValueError:
            raise InvalidSubscription("keys.p256dh: not a point on P-256") from None
        secret = _b64url_bytes(auth, "keys.auth")
        if len(secret) != AUTH_BYTES:
            raise InvalidSubscription(f"keys.auth: must be {AUTH_BYTES} bytes, not {len(secret)}")
        return cls(endpoint, point, secret)

    def stored(self, box: SecretBox) -> str:
        """The device's push token: the endpoint first (see `stored_prefix`), `auth` sealed
        and bound to the endpoint."""
        return orjson.dumps(
            {
                "endpoint": self.endpoint,
                "p256dh": _b64url(self.p256dh),
                "auth": box.seal(self.auth, record=self.endpoint),
            }
        ).decode()

    @classmethod
    def from_stored(cls, token: str, box: SecretBox) -> Subscription:
        """The subscription a push token holds; InvalidSubscription if it does not open."""
        try:
            data = orjson.loads(token)
            endpoint, p256dh, sealed = data["endpoint"], data["p256dh"], data["auth"]
            auth = box.open(sealed, record=endpoint)
        except (orjson.JSONDecodeError, KeyError, TypeError, SealError) as exc:
            raise InvalidSubscription(f"stored subscription: {type(exc).__name__}") from None
        return cls.parse(endpoint, p256dh, _b64url(auth))

    def info(self) -> dict[str, Any]:
        """The subscription as pywebpush takes it (PushSubscription.toJSON()'s shape)."""
        return {
            "endpoint": self.endpoint,
            "keys": {"p256dh": _b64url(self.p256dh), "auth": _b64url(self.auth)},
        }

    @property
    def topic(self) -> str:
        """The Topic header (RFC 8030 §5.4): a newer request replaces an undelivered older one.

        Topics are scoped to one subscription, so anything stable for it will do; derived
        from the endpoint, it tells the push service nothing it does not know (a user id
        would link a person's subscriptions on several browsers). 32 base64url characters.
        """
        return _b64url(hashlib.sha256(b"tapprove topic " + self.endpoint.encode()).digest())[:32]


def stored_prefix(endpoint: str) -> str:
    """How every push token holding `endpoint` begins (to find it on another device)."""
    return orjson.dumps({"endpoint": endpoint}).decode()[:-1] + ","


def subscription_box(settings: Settings) -> SecretBox:
    """The box that seals subscriptions' auth secrets."""
    return SecretBox(secret_key(settings), SEAL_PURPOSE)


def payload(message: PushMessage) -> bytes:
    """What the service worker gets: the approval id and a short title, nothing else (it
    fetches the approval itself, with the device's credential)."""
    return orjson.dumps({**message.data(), "title": message.title})


class WebPushSender:
    """Sends approval requests to browsers' push services, VAPID-signed and encrypted.

    The aiohttp session binds to the running loop, so it is built on the first send.
    """

    channel = "webpush"

    def __init__(
        self,
        *,
        vapid_key: ec.EllipticCurvePrivateKey,
        subject: str,
        policy: EndpointPolicy,
        box: SecretBox,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._vapid = Vapid02(private_key=vapid_key)
        self.subject = subject
        self.policy = policy
        self.box = box
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @staticmethod
    def configured(settings: Settings) -> bool:
        """Always: the VAPID key is generated when not configured, and nothing else is needed."""
        return True

    @classmethod
    def from_settings(
        cls, settings: Settings, *, timeout: float = DEFAULT_TIMEOUT
    ) -> WebPushSender:
        """Build from TAPPROVE_VAPID_* and TAPPROVE_WEBPUSH_* (reads or makes the key now)."""
        return cls(
            vapid_key=vapid_private_key(settings),
            subject=settings.webpush_contact,
            policy=EndpointPolicy.from_settings(settings),
            box=subscription_box(settings),
            timeout=timeout,
        )

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(), limit=100)
            # trust_env=False (the default): no proxy from the environment either.
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    def headers(
        self, endpoint: Endpoint, subscription: Subscription, ttl: int, now: float
    ) -> dict[str, str]:
        """The RFC 8030 / 8292 headers of one push (before the encryption headers)."""
        claims = {"aud": endpoint.origin, "exp": int(now) + VAPID_TOKEN_LIFE, "sub": self.subject}
        vapid: dict[str, str] = self._vapid.sign(claims)
        return {
            "Authorization": vapid["Authorization"],
            "TTL": str(ttl),
            "Urgency": "high",
            "Topic": subscription.topic,
        }

    async def send(self, token: str, message: PushMessage, *, now: float) -> PushResult:
        """Send one encrypted push that the push service drops at the approval's end (TTL)."""
        ttl = math.floor(message.expires_at - now)
        if ttl < 1:
            return PushResult("failed", detail="expired")
        try:
            subscription = Subscription.from_stored(token, self.box)
        except InvalidSubscription as exc:
            return PushResult("invalid_token", detail=str(exc))
        try:
            endpoint = self.policy.check(subscription.endpoint)
        except EndpointRefused as exc:
            return PushResult("failed", detail=f"refused: {exc}")
        encrypted: dict[str, Any] = WebPusher(subscription.info()).encode(
            payload(message), "aes128gcm"
        )
        headers = {
            **self.headers(endpoint, subscription, ttl, now),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
        }
        url = URL.build(
            scheme=endpoint.scheme,
            host=endpoint.host,
            port=endpoint.port,
            path=endpoint.path,
            query_string=endpoint.query,
            encoded=True,
        )
        started = time.perf_counter()
        try:
            async with self._client().post(
                url,
                data=encrypted["body"],
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=min(self.timeout, float(ttl))),
            ) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                await response.read()
        except TimeoutError:
            return PushResult("retry", detail="timeout", latency=time.perf_counter() - started)
        except aiohttp.ClientConnectorDNSError as exc:
            latency = time.perf_counter() - started
            if isinstance(exc.os_error, EndpointRefused):
                return PushResult("failed", detail=f"refused: {exc.os_error}", latency=latency)
            return PushResult("retry", detail="dns", latency=latency)
        except (aiohttp.ClientError, OSError) as exc:
            return PushResult(
                "retry",
                detail=f"connection: {type(exc).__name__}",
                latency=time.perf_counter() - started,
            )
        latency = time.perf_counter() - started
        return self._classify(status, retry_after, now, latency)

    @staticmethod
    def _classify(status: int, retry_after: str | None, now: float, latency: float) -> PushResult:
        if status in ACCEPTED:
            return PushResult("accepted", detail=f"{status}", latency=latency)
        if status in GONE:
            return PushResult("invalid_token", detail=f"{status}", latency=latency)
        if status == 429 or status >= 500:
            return PushResult(
                "retry",
                retry_after=parse_retry_after(retry_after, now=now),
                detail=f"{status}",
                latency=latency,
            )
        if 300 <= status < 400:
            return PushResult(
                "failed", detail=f"{status}: redirect not followed", latency=latency
            )
        # 400 malformed, 401/403 VAPID not accepted (e.g. the key changed), 413 too large.
        return PushResult("failed", detail=f"{status}", latency=latency)

    async def close(self) -> None:
        """Close the pooled connections (a later send opens new ones)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
