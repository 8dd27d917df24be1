"""FCM (HTTP v1) adapter on pyfcm: one data message per approval request, result classified."""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from google.auth import exceptions as google_auth_errors
from google.auth.credentials import Credentials
from google.oauth2 import service_account
from pyfcm import FCMNotification
from pyfcm.errors import (
    AuthenticationError,
    FCMError,
    FCMNotRegisteredError,
    FCMSenderIdMismatchError,
    FCMServerError,
    InvalidDataError,
)
from requests.adapters import HTTPAdapter

from app.delivery.push import Outcome, PushMessage, PushResult
from app.delivery.retry import parse_retry_after
from app.settings import Settings

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
DEFAULT_TIMEOUT = 10.0


@dataclass
class _Tap:
    """What the transport saw of the last FCM answer that pyfcm does not pass on."""

    status: int | None = None
    retry_after: str | None = None


# Set around each send; asyncio.to_thread copies the context into the worker thread.
_TAP: contextvars.ContextVar[_Tap | None] = contextvars.ContextVar("fcm_tap", default=None)


class _PyfcmTransport(HTTPAdapter):
    """The requests transport handed to pyfcm (its `adapter=` argument).

    pyfcm's default transport retries 502/503 up to 10 times inside the call, and pyfcm
    itself sleeps for any Retry-After and re-sends, unbounded, in the worker thread. Our
    retry policy (until the approval expires) owns retries, so this transport never retries
    and lifts Retry-After out of pyfcm's sight into the per-send tap.
    """

    def __init__(self) -> None:
        super().__init__(max_retries=0)

    def send(
        self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        response = super().send(request, *args, **kwargs)
        tap = _TAP.get()
        retry_after = response.headers.pop("Retry-After", None)
        if tap is not None:
            tap.status = response.status_code
            tap.retry_after = retry_after
        return response


def load_service_account(path: Path, *, project_id: str | None = None) -> Credentials:
    """Service-account credentials from a JSON file; its `token_uri` is where tokens come from.

    `project_id`, when given, replaces the file's (pyfcm prefers the credentials' project).
    """
    info = json.loads(path.read_text(encoding="utf-8"))
    if project_id:
        info["project_id"] = project_id
    # google-auth ships py.typed but leaves this constructor unannotated.
    credentials: Credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
        info, scopes=[FCM_SCOPE]
    )
    return credentials


def _token_problem(body: str) -> bool:
    """Whether a 400 INVALID_ARGUMENT body blames the registration token (not our payload)."""
    try:
        error = json.loads(body).get("error", {})
    except (ValueError, AttributeError):
        return "registration token" in body.lower()
    if not isinstance(error, dict):
        return False
    for detail in error.get("details") or []:
        if not isinstance(detail, dict):
            continue
        for violation in detail.get("fieldViolations") or []:
            if isinstance(violation, dict) and violation.get("field") == "message.token":
                return True
    return "registration token" in str(error.get("message", "")).lower()


class FcmSender:
    """Sends approval requests through FCM HTTP v1 with pyfcm (run in a worker thread)."""

    channel = "fcm"

    def __init__(
        self,
        credentials: Credentials,
        *,
        project_id: str,
        endpoint: str = "https://fcm.googleapis.com/v1/projects",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.project_id = project_id
        self.timeout = timeout
        self._fcm = FCMNotification(
            credentials=credentials, project_id=project_id, adapter=_PyfcmTransport()
        )
        self._fcm.FCM_END_POINT_BASE = endpoint.rstrip("/")

    @staticmethod
    def configured(settings: Settings) -> bool:
        """FCM is on when a service-account file is configured."""
        return settings.fcm_credentials is not None

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout: float = DEFAULT_TIMEOUT) -> FcmSender:
        """Build from TAPPROVE_FCM_CREDENTIALS / _PROJECT_ID / _ENDPOINT (reads the file now)."""
        if settings.fcm_credentials is None:
            raise ValueError("TAPPROVE_FCM_CREDENTIALS is not set")
        credentials = load_service_account(
            settings.fcm_credentials, project_id=settings.fcm_project_id
        )
        project_id = settings.fcm_project_id or getattr(credentials, "project_id", None)
        if not project_id:
            raise ValueError("no FCM project id: set TAPPROVE_FCM_PROJECT_ID")
        return cls(
            credentials, project_id=project_id, endpoint=settings.fcm_endpoint, timeout=timeout
        )

    async def send(self, token: str, message: PushMessage, *, now: float) -> PushResult:
        """Send one data message; its Android TTL ends with the approval, never after."""
        ttl = math.floor(message.expires_at - now)
        if ttl < 1:
            return PushResult("failed", detail="expired")
        timeout = min(self.timeout, float(ttl))
        tap = _Tap()
        reset = _TAP.set(tap)
        started = time.perf_counter()
        try:
            answer = await asyncio.to_thread(
                self._fcm.notify,
                fcm_token=token,
                notification_title=message.title,
                notification_body=message.body,
                data_payload=message.data(),
                android_config={"priority": "HIGH", "ttl": f"{ttl}s"},
                timeout=timeout,
            )
        except Exception as exc:  # classified below; anything unknown is re-raised
            return self._classify(exc, tap, now, time.perf_counter() - started)
        finally:
            _TAP.reset(reset)
        latency = time.perf_counter() - started
        name = answer.get("name", "") if isinstance(answer, dict) else ""
        return PushResult("accepted", detail=str(name), latency=latency)

    def _classify(self, exc: Exception, tap: _Tap, now: float, latency: float) -> PushResult:
        if isinstance(exc, FCMNotRegisteredError):
            return PushResult("invalid_token", detail="UNREGISTERED", latency=latency)
        if isinstance(exc, InvalidDataError):
            cause = exc.args[0] if exc.args else None
            if isinstance(cause, google_auth_errors.TransportError):
                return PushResult("retry", detail=f"oauth: {cause}", latency=latency)
            if isinstance(cause, google_auth_errors.GoogleAuthError):
                outcome: Outcome = "retry" if cause.retryable else "failed"
                return PushResult(outcome, detail=f"oauth: {cause}", latency=latency)
            body = str(cause or "")
            if _token_problem(body):
                return PushResult("invalid_token", detail="INVALID_ARGUMENT", latency=latency)
            return PushResult("failed", detail=f"400: {body[:200]}", latency=latency)
        if isinstance(exc, AuthenticationError):
            return PushResult("failed", detail="401: sender authentication", latency=latency)
        if isinstance(exc, FCMSenderIdMismatchError):
            return PushResult("failed", detail="403: sender id mismatch", latency=latency)
        if isinstance(exc, FCMServerError):
            status = tap.status
            if status is not None and 400 <= status < 500 and status != 429:
                return PushResult("failed", detail=f"{status}", latency=latency)
            return PushResult(
                "retry",
                retry_after=parse_retry_after(tap.retry_after, now=now),
                detail=f"{status or 'empty answer'}",
                latency=latency,
            )
        if isinstance(exc, requests.Timeout):
            return PushResult("retry", detail="timeout", latency=latency)
        if isinstance(exc, requests.RequestException):
            return PushResult("retry", detail=f"connection: {type(exc).__name__}", latency=latency)
        if isinstance(exc, FCMError):
            return PushResult("failed", detail=f"{type(exc).__name__}: {exc}", latency=latency)
        raise exc

    async def close(self) -> None:
        """Nothing to release: pyfcm's sessions live in its worker threads."""
