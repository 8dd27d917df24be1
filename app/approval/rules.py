"""The approval's rules, as pure functions: what an answer decides, when an approval is
over, what a browser may see, how long push-fatigue backoff lasts, how long an end stays
readable. No I/O: the use cases apply these, and the store's scripts receive their results
as arguments (the backoff schedule, the keep time), so no rule has a twin in Lua.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.approval.errors import AlreadyDecided, Ended, Expired
from app.approval.model import DEFAULT_REASONS, PendingApproval, Status
from app.core.matching import number_matches
from app.core.signatures import DecisionClaims
from app.core.tokens import hash_token, same_secret

# How long a final state stays readable, so late callers get 409/410 rather than 404.
FINAL_STATE_KEEP = 300

BACKOFF_BASE = 10
BACKOFF_CAP = 3600
# 10 * 2**9 already passes the cap; stopping here keeps huge counters from building huge ints.
_DOUBLINGS_TO_CAP = 9


def backoff_seconds(failures: int) -> int:
    """Seconds the next approval waits after `failures` denied or unanswered ones in a row.

    0 -> 0, 1 -> 10, 2 -> 20, doubling each time, capped at one hour (PROTOCOL §3).
    """
    if failures <= 0:
        return 0
    doublings = min(failures - 1, _DOUBLINGS_TO_CAP)
    return min(BACKOFF_CAP, BACKOFF_BASE << doublings)


def backoff_schedule() -> tuple[int, ...]:
    """The waits after 1, 2, 3 … failures, up to the first that reaches the cap; any more
    failures wait as long as the last. The store's scripts that count a failure get this
    list and only look up the wait for the count they reach."""
    waits = [backoff_seconds(1)]
    while waits[-1] < BACKOFF_CAP:
        waits.append(backoff_seconds(len(waits) + 1))
    return tuple(waits)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an answer ends an approval: its final status, and why (`""`: no reason given)."""

    status: Status
    reason: str = ""


def answer_outcome(approval: PendingApproval, claims: DecisionClaims) -> Outcome:
    """What a device's verified answer decides: approve only with the browser's number
    (compared in constant time; any other number denies it as `wrong_number`)."""
    if claims.decision != "approve":
        return Outcome(Status.DENIED, claims.reason or "")
    if number_matches(approval.match, approval.number, claims.number):
        return Outcome(Status.APPROVED)
    return Outcome(Status.DENIED, "wrong_number")


CODE_APPROVES = Outcome(Status.APPROVED, "sms_code")
TOO_MANY_CODES = Outcome(Status.DENIED, "too_many_codes")
TIMED_OUT = Outcome(Status.EXPIRED)  # nobody answered before the deadline
SUPERSEDED = Outcome(Status.EXPIRED, "superseded")  # a newer approval for the user replaced it


def end_reason(outcome: Outcome) -> str:
    """The reason an end is stored and announced with: the outcome's own, else its
    status's default (`device`, `denied`, `timeout`): every final status says why."""
    return outcome.reason or DEFAULT_REASONS[outcome.status]


def ended_error(status: Status) -> Ended:
    """The refusal for acting on an approval that has ended with `status`."""
    return Expired(status) if status is Status.EXPIRED else AlreadyDecided(status)


def require_pending(status: Status) -> None:
    """Raise Expired / AlreadyDecided (with the final status) unless still pending."""
    if status is not Status.PENDING:
        raise ended_error(status)


def past_deadline(approval: PendingApproval, now: float) -> bool:
    """Whether a still-pending approval is due to end as expired (at its deadline, too)."""
    return approval.status is Status.PENDING and approval.expires_at <= now


def status_at(approval: PendingApproval, now: float) -> Status:
    """Its status as callers must see it: expired from its deadline on, swept or not."""
    return Status.EXPIRED if past_deadline(approval, now) else approval.status


def keep_seconds(approval: PendingApproval, now: float) -> int:
    """How long the store keeps the approval's keys: its life left, then the final state."""
    return max(1, int(approval.expires_at - now)) + FINAL_STATE_KEEP


def browser_binding(login_cookie: str) -> str:
    """What an approval stores of the `tapprove_login` cookie that binds it to a browser."""
    return hash_token(login_cookie)


def bound_to_browser(approval: PendingApproval, login_cookie: str | None) -> bool:
    """Whether the browser holding `login_cookie` started this sign-in (constant time)."""
    return (
        approval.browser_binding is not None
        and login_cookie is not None
        and len(login_cookie) <= 128
        and same_secret(browser_binding(login_cookie), approval.browser_binding)
    )
