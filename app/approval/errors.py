"""Why an approval use case refuses, in the domain's words.

Each error carries the protocol's stable `code` and a message for people; it knows no HTTP
status and no frame. The HTTP layer maps each class to a status in one table
(app.web.errors.APPROVAL_STATUS) and the phone's socket turns them into `error` frames in
one place (app.web.device_socket).
"""

from __future__ import annotations

from typing import ClassVar

from app.approval.model import Status


class ApprovalError(Exception):
    """A use case's refusal: a stable protocol `code` and a human `message`."""

    code: ClassVar[str]
    default_message: ClassVar[str]

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    def details(self) -> dict[str, object]:
        """Members the answer carries besides `error` and `message` (e.g. a final status)."""
        return {}


class NotFound(ApprovalError):
    """No such approval, or not one the caller may see."""

    code = "not_found"
    default_message = "no such approval"


class NotAllowed(ApprovalError):
    """A browser asks about a sign-in it did not start."""

    code = "not_allowed"
    default_message = "this browser did not start that sign-in"


class UnknownUser(ApprovalError):
    """No user to ask."""

    code = "unknown_user"
    default_message = "no user with that email"


class Locked(ApprovalError):
    """New approvals are locked for the user after a fraud report."""

    code = "locked"
    default_message = "sign-in is locked after a fraud report; contact support"


class RateLimited(ApprovalError):
    """Too many of something: try again in `retry_after` seconds."""

    code = "rate_limited"

    def __init__(self, retry_after: int, message: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackedOff(RateLimited):
    """Push-fatigue backoff: the user's last approvals were denied or unanswered."""

    default_message = "too many unanswered or denied requests; wait before trying again"


class TooManyResends(RateLimited):
    """A sign-in's request was sent again as often as it may be."""

    default_message = "too many resends for this request"


class TooManySmsCodes(RateLimited):
    """A sign-in had as many SMS codes as it may have."""

    default_message = "too many SMS codes for this sign-in"


class BadSignature(ApprovalError):
    """A device's signed answer does not check out (the message says how)."""

    code = "bad_signature"
    default_message = "the signature does not check out"


class Ended(ApprovalError):
    """The approval already has its final `status`."""

    def __init__(self, status: Status, message: str | None = None) -> None:
        super().__init__(message)
        self.status = status

    def details(self) -> dict[str, object]:
        return {"status": self.status.value}


class AlreadyDecided(Ended):
    """Someone answered first."""

    code = "already_decided"
    default_message = "this request was already answered"


class Expired(Ended):
    """Nobody answered in time (or a newer approval replaced it)."""

    code = "expired"
    default_message = "this request has expired"


class WrongNumber(ApprovalError):
    """The phone approved with a number that is not the browser's: the approval is denied."""

    code = "wrong_number"
    default_message = "the number does not match; the request was denied"

    def details(self) -> dict[str, object]:
        return {"status": Status.DENIED.value}


class NotApproved(ApprovalError):
    """Completing a sign-in that was not approved (it is `status`)."""

    code = "not_approved"
    default_message = "the sign-in was not approved"

    def __init__(self, status: Status) -> None:
        super().__init__()
        self.status = status

    def details(self) -> dict[str, object]:
        return {"status": self.status.value}


class AlreadyCompleted(ApprovalError):
    """An approved sign-in turns into a session once."""

    code = "already_completed"
    default_message = "this sign-in was already completed"


class InvalidCode(ApprovalError):
    """A wrong SMS code; with `denied`, it was one too many and the sign-in is denied."""

    code = "invalid_code"
    default_message = "that code is not right"

    def __init__(self, *, denied: bool = False) -> None:
        super().__init__(
            "that code is not right; too many wrong codes, so the sign-in was denied"
            if denied
            else None
        )
        self.denied = denied

    def details(self) -> dict[str, object]:
        return {"status": Status.DENIED.value} if self.denied else {}


class SmsUnavailable(ApprovalError):
    """No code can be texted: no verified phone, SMS turned off, or no SMS sender."""

    code = "sms_unavailable"
    default_message = "no verified phone number, SMS turned off, or not set up"
