"""The provider seam: what a push or SMS sender takes and answers, and the configured set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from app.core.clock import rfc3339

if TYPE_CHECKING:
    from app.settings import Settings

Outcome = Literal["accepted", "invalid_token", "retry", "failed"]


@dataclass(frozen=True)
class PushMessage:
    """One approval request to announce; carries no secret (the app fetches the approval)."""

    approval_id: str
    expires_at: float
    title: str
    body: str

    def data(self) -> dict[str, str]:
        """The only custom keys a push carries (PROTOCOL §4), all strings as FCM requires."""
        return {
            "type": "approval_request",
            "approval_id": self.approval_id,
            "expires_at": rfc3339(self.expires_at),
        }


@dataclass(frozen=True)
class PushResult:
    """How one delivery attempt ended.

    `accepted`: the provider took it; `invalid_token`: forget this device's push token (or
    this phone number); `retry`: transient, try again (not before `retry_after` seconds if
    set); `failed`: permanent for this attempt, do not retry. `latency` is in seconds.
    """

    outcome: Outcome
    retry_after: float | None = None
    detail: str = ""
    latency: float = 0.0


def observe_attempt(
    channel: str, result: PushResult, *, attempt: int, latency: float
) -> dict[str, object]:
    """Count one delivery attempt (any channel) in the metrics and return its audit detail."""
    from app import metrics

    metrics.DELIVERY_ATTEMPTS.labels(channel, result.outcome).inc()
    metrics.DELIVERY_LATENCY.labels(channel).observe(latency)
    return {
        "channel": channel,
        "outcome": result.outcome,
        "attempt": attempt + 1,
        "latency_ms": round(latency * 1000, 1),
        "detail": result.detail[:200],
    }


class PushSender(Protocol):
    """A push provider adapter (FCM, APNs or Web Push)."""

    channel: str  # "fcm" | "apns" | "webpush"

    async def send(self, token: str, message: PushMessage, *, now: float) -> PushResult: ...


class SmsSender(Protocol):
    """An SMS provider adapter."""

    async def send(self, to: str, body: str) -> PushResult: ...


@runtime_checkable
class _Closeable(Protocol):
    async def close(self) -> None: ...


@dataclass
class Providers:
    """The provider adapters this deployment has configured; None where not configured."""

    fcm: PushSender | None = None
    apns: PushSender | None = None
    sms: SmsSender | None = None
    webpush: PushSender | None = None

    def push(self, provider: str) -> PushSender | None:
        """The sender for a device's push provider name ("fcm" / "apns" / "webpush")."""
        if provider == "fcm":
            return self.fcm
        if provider == "apns":
            return self.apns
        if provider == "webpush":
            return self.webpush
        return None

    async def close(self) -> None:
        """Release the connections and pools of every adapter that holds any."""
        for sender in (self.fcm, self.apns, self.sms, self.webpush):
            if isinstance(sender, _Closeable):
                await sender.close()


async def build_providers(settings: Settings) -> Providers:
    """Build the adapters whose settings are present; the rest stay None.

    FCM needs TAPPROVE_FCM_CREDENTIALS (project id from the setting or the file); APNs the
    key file, key id, team id and topic; SMS the Twilio account sid, auth token and sender.
    A provider with only some of its settings raises ValueError (fail at startup).

    SMS is never None here: without Twilio settings it goes to the log (`LogSms`), as mail
    does without SMTP, so the embedded default can still verify phones and show the SMS
    fallback; the operator reads the codes from the log. Web Push is never None either: it
    needs no account anywhere, only the VAPID key, which is generated when not configured.
    """
    # Imported here: the adapters import this module for PushMessage / PushResult.
    from app.delivery.apns import ApnsSender
    from app.delivery.fcm import FcmSender
    from app.delivery.sms import LogSms, TwilioSms
    from app.delivery.webpush import WebPushSender

    sms: SmsSender = (
        TwilioSms.from_settings(settings) if TwilioSms.configured(settings) else LogSms()
    )
    return Providers(
        fcm=FcmSender.from_settings(settings) if FcmSender.configured(settings) else None,
        apns=ApnsSender.from_settings(settings) if ApnsSender.configured(settings) else None,
        sms=sms,
        webpush=WebPushSender.from_settings(settings),
    )
