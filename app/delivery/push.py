"""The provider seam: what a push or SMS sender takes and answers, and the configured set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from app.core.clock import rfc3339

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
