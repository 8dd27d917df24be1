"""SMS senders: Twilio's Messages REST API (httpx), or the log when Twilio is not set up.

Both answer like a push sender (`PushResult`), so delivery code treats SMS as one more channel.
"""

from __future__ import annotations

import logging
import time

import httpx

from app.core.clock import Clock, SystemClock
from app.delivery.push import PushResult
from app.delivery.retry import parse_retry_after
from app.settings import Settings

DEFAULT_ENDPOINT = "https://api.twilio.com"
DEFAULT_TIMEOUT = 10.0
# Twilio error codes for a number that can never receive our SMS: forget it.
# 21211 invalid 'To' number, 21614 not a mobile number, 21610 recipient opted out (STOP).
INVALID_NUMBER_CODES = frozenset({21211, 21614, 21610})

log = logging.getLogger(__name__)


class LogSms:
    """The embedded default without Twilio: each SMS is written to the log for the operator.

    Like mail without TAPPROVE_SMTP_URL, this keeps a fresh install's phone verification and
    SMS fallback usable for a demo or a single operator who reads the log; nothing reaches a
    phone. Set TAPPROVE_TWILIO_* to send real messages.
    """

    async def send(self, to: str, body: str) -> PushResult:
        """Log the message and report it accepted."""
        log.info("sms (no TAPPROVE_TWILIO_* set) to %s: %s", to, body, extra={"sms_to": to})
        return PushResult("accepted", detail="logged")


class TwilioSms:
    """Sends one SMS per call with Twilio's `Messages.json` endpoint (HTTP basic auth)."""

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        sender: str,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.account_sid = account_sid
        self.sender = sender
        self.url = f"{endpoint.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self._clock = clock or SystemClock()
        self._client = httpx.AsyncClient(
            auth=httpx.BasicAuth(account_sid, auth_token), timeout=timeout, transport=transport
        )

    @staticmethod
    def configured(settings: Settings) -> bool:
        """SMS is wanted when any of the Twilio account sid, auth token or sender is set.

        `from_settings` then insists on all three (a half-done setup fails at startup).
        """
        return any((settings.twilio_account_sid, settings.twilio_auth_token, settings.twilio_from))

    @classmethod
    def from_settings(
        cls, settings: Settings, *, timeout: float = DEFAULT_TIMEOUT, clock: Clock | None = None
    ) -> TwilioSms:
        """Build from TAPPROVE_TWILIO_ACCOUNT_SID / _AUTH_TOKEN / _FROM / _ENDPOINT."""
        required = {
            "TAPPROVE_TWILIO_ACCOUNT_SID": settings.twilio_account_sid,
            "TAPPROVE_TWILIO_AUTH_TOKEN": settings.twilio_auth_token,
            "TAPPROVE_TWILIO_FROM": settings.twilio_from,
        }
        missing = [name for name, value in required.items() if not value]
        if missing:
            raise ValueError(f"SMS is partly configured; missing {', '.join(missing)}")
        assert settings.twilio_account_sid and settings.twilio_auth_token  # narrowed for mypy
        assert settings.twilio_from
        return cls(
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token,
            sender=settings.twilio_from,
            endpoint=settings.twilio_endpoint,
            timeout=timeout,
            clock=clock,
        )

    async def send(self, to: str, body: str) -> PushResult:
        """Queue one SMS to `to` (E.164); `accepted` means Twilio took it (201)."""
        started = time.perf_counter()
        try:
            response = await self._client.post(
                self.url, data={"To": to, "From": self.sender, "Body": body}
            )
        except httpx.TimeoutException:
            return PushResult("retry", detail="timeout", latency=time.perf_counter() - started)
        except httpx.TransportError as exc:
            return PushResult(
                "retry",
                detail=f"connection: {type(exc).__name__}",
                latency=time.perf_counter() - started,
            )
        latency = time.perf_counter() - started
        return self._classify(response, latency)

    def _classify(self, response: httpx.Response, latency: float) -> PushResult:
        status = response.status_code
        if status in (200, 201):
            return PushResult("accepted", detail=str(_json_field(response, "sid")), latency=latency)
        code = _json_field(response, "code")
        detail = f"{status} {code}" if code is not None else str(status)
        if status == 400 and code in INVALID_NUMBER_CODES:
            return PushResult("invalid_token", detail=detail, latency=latency)
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(
                response.headers.get("Retry-After"), now=self._clock.now()
            )
            return PushResult("retry", retry_after=retry_after, detail=detail, latency=latency)
        return PushResult("failed", detail=detail, latency=latency)

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.aclose()


def _json_field(response: httpx.Response, name: str) -> object:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get(name) if isinstance(body, dict) else None
