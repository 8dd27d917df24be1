"""APNs adapter on aioapns (token auth, HTTP/2): one alert per approval request, classified."""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

from aioapns import APNs, NotificationRequest, PushType
from aioapns.common import NotificationResult
from aioapns.connection import APNsProductionClientProtocol
from aioapns.exceptions import ConnectionClosed, ConnectionError, MaxAttemptsExceeded
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from app.delivery.push import PushMessage, PushResult
from app.delivery.retry import parse_retry_after
from app.settings import Settings

CATEGORY = "TAPPROVE_APPROVAL"
DEFAULT_ENDPOINT = "https://api.push.apple.com:443"
DEFAULT_TIMEOUT = 10.0
# APNs reasons that mean "this device token is no good here": forget it.
INVALID_TOKEN_REASONS = frozenset({"BadDeviceToken", "Unregistered", "DeviceTokenNotForTopic"})
RETRY_STATUSES = frozenset({"429", "500", "503"})


class _ExpiringRequest(NotificationRequest):
    """A NotificationRequest whose apns-expiration is a fixed instant, not now + TTL.

    aioapns writes `int(time.time()) + request.time_to_live` when it builds the headers,
    which may be seconds after we built the request (connecting, TLS). Reading the TTL at
    that moment makes the header exactly the approval's end (or a second earlier).
    """

    __slots__ = ("expires_at",)

    def __init__(self, *, expires_at: int, **kwargs: Any) -> None:
        self.expires_at = expires_at
        super().__init__(**kwargs)

    @property
    def time_to_live(self) -> int:
        return self.expires_at - int(time.time())

    @time_to_live.setter
    def time_to_live(self, value: int | None) -> None:
        """Ignored: aioapns's constructor assigns it; the expiry is fixed instead."""


def _protocol_for(
    host: str, port: int, retry_after: dict[str, str]
) -> type[APNsProductionClientProtocol]:
    """aioapns's HTTP/2 protocol, aimed at `host:port`, keeping Retry-After, safe on timeouts."""

    class EndpointProtocol(APNsProductionClientProtocol):
        APNS_SERVER = host
        APNS_PORT = port

        def on_response_received(self, headers: dict[bytes, bytes]) -> None:
            value = headers.get(b"retry-after")
            if value is not None:
                retry_after[headers.get(b"apns-id", b"").decode()] = value.decode()
            # A send we gave up on (timeout) has a cancelled future; a late answer is dropped.
            with contextlib.suppress(asyncio.InvalidStateError):
                super().on_response_received(headers)

        def on_data_received(self, raw_data: bytes, stream_id: int) -> None:
            with contextlib.suppress(asyncio.InvalidStateError):
                super().on_data_received(raw_data, stream_id)

        def connection_lost(self, exc: Exception | None) -> None:
            self.requests = {k: f for k, f in self.requests.items() if not f.done()}
            super().connection_lost(exc)

    return EndpointProtocol


async def _quiet(request: NotificationRequest, result: NotificationResult) -> None:
    """Replaces aioapns's error log: every outcome is classified and recorded by the caller."""


class ApnsSender:
    """Sends approval requests as APNs alerts with aioapns, JWT (.p8 key) authentication.

    The aioapns client binds to the running loop, so it is built on the first send.
    """

    channel = "apns"

    def __init__(
        self,
        *,
        key: str,
        key_id: str,
        team_id: str,
        topic: str,
        endpoint: str = DEFAULT_ENDPOINT,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = 4,
        max_connection_attempts: int = 2,
    ) -> None:
        private_key = load_pem_private_key(key.encode("utf-8"), password=None)
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            private_key.curve, ec.SECP256R1
        ):
            raise ValueError("the APNs key must be a P-256 (ES256) private key")
        parts = urlsplit(endpoint)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(
                f"APNs endpoint must be https://host:port or http://host:port: {endpoint}"
            )
        self.key = key
        self.key_id = key_id
        self.team_id = team_id
        self.topic = topic
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_connection_attempts = max_connection_attempts
        self._ssl_context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl_context = ssl.create_default_context()
            if ca_file is not None:
                self._ssl_context.load_verify_locations(cafile=str(ca_file))
            self._ssl_context.set_alpn_protocols(["h2"])
        self._retry_after: dict[str, str] = {}
        self._apns: APNs | None = None

    @staticmethod
    def configured(settings: Settings) -> bool:
        """APNs is wanted when any of key file, key id, team id or topic is set.

        `from_settings` then insists on all four, so a half-done setup fails at startup
        instead of silently sending no iOS pushes.
        """
        return any(
            (
                settings.apns_key_file,
                settings.apns_key_id,
                settings.apns_team_id,
                settings.apns_topic,
            )
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout: float = DEFAULT_TIMEOUT) -> ApnsSender:
        """Build from TAPPROVE_APNS_* (reads the key file now; connects on the first send)."""
        required = {
            "TAPPROVE_APNS_KEY_FILE": settings.apns_key_file,
            "TAPPROVE_APNS_KEY_ID": settings.apns_key_id,
            "TAPPROVE_APNS_TEAM_ID": settings.apns_team_id,
            "TAPPROVE_APNS_TOPIC": settings.apns_topic,
        }
        missing = [name for name, value in required.items() if not value]
        if missing:
            raise ValueError(f"APNs is partly configured; missing {', '.join(missing)}")
        assert settings.apns_key_file and settings.apns_key_id  # narrowed for mypy
        assert settings.apns_team_id and settings.apns_topic
        return cls(
            key=settings.apns_key_file.read_text(encoding="utf-8"),
            key_id=settings.apns_key_id,
            team_id=settings.apns_team_id,
            topic=settings.apns_topic,
            endpoint=settings.apns_endpoint,
            ca_file=settings.apns_ca_file,
            timeout=timeout,
        )

    def _client(self) -> APNs:
        if self._apns is None:
            apns = APNs(
                key=self.key,
                key_id=self.key_id,
                team_id=self.team_id,
                topic=self.topic,
                max_connections=self.max_connections,
                max_connection_attempts=self.max_connection_attempts,
                ssl_context=self._ssl_context,
                err_func=_quiet,
            )
            apns.pool.protocol_class = _protocol_for(self.host, self.port, self._retry_after)
            apns.pool.ssl_context = self._ssl_context  # None: HTTP/2 without TLS
            self._apns = apns
        return self._apns

    @staticmethod
    def payload(message: PushMessage) -> dict[str, Any]:
        """The APNs JSON: an alert in the approval category plus the three protocol keys."""
        return {
            "aps": {
                "alert": {"title": message.title, "body": message.body},
                "category": CATEGORY,
                "sound": "default",
                # Lets a notification service extension enrich the alert (it fetches the approval).
                "mutable-content": 1,
            },
            **message.data(),
        }

    async def send(self, token: str, message: PushMessage, *, now: float) -> PushResult:
        """Send one alert that APNs drops at the approval's end (apns-expiration)."""
        if math.floor(message.expires_at - now) < 1:
            return PushResult("failed", detail="expired")
        request = _ExpiringRequest(
            expires_at=math.floor(message.expires_at),
            device_token=token,
            message=self.payload(message),
            notification_id=str(uuid4()),
            priority=10,
            collapse_key=message.approval_id,
            push_type=PushType.ALERT,
        )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                result = await self._client().send_notification(request)
        except TimeoutError:
            return PushResult("retry", detail="timeout", latency=time.perf_counter() - started)
        except (MaxAttemptsExceeded, ConnectionError, ConnectionClosed, OSError) as exc:
            return PushResult(
                "retry",
                detail=f"connection: {type(exc).__name__}",
                latency=time.perf_counter() - started,
            )
        finally:
            retry_after = self._retry_after.pop(request.notification_id, None)
        latency = time.perf_counter() - started
        return self._classify(result, retry_after, now, latency)

    @staticmethod
    def _classify(
        result: NotificationResult, retry_after: str | None, now: float, latency: float
    ) -> PushResult:
        status, reason = result.status, result.description or ""
        if result.is_successful:
            return PushResult("accepted", detail=result.notification_id, latency=latency)
        if reason in INVALID_TOKEN_REASONS or status == "410":
            return PushResult("invalid_token", detail=f"{status} {reason}", latency=latency)
        if status in RETRY_STATUSES:
            return PushResult(
                "retry",
                retry_after=parse_retry_after(retry_after, now=now),
                detail=f"{status} {reason}".strip(),
                latency=latency,
            )
        return PushResult("failed", detail=f"{status} {reason}".strip(), latency=latency)

    async def close(self) -> None:
        """Close the pooled HTTP/2 connections (a later send reconnects)."""
        if self._apns is not None:
            self._apns.pool.close()
            self._apns = None
