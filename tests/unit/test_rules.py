"""The approval's rules (app.approval.rules), driven without Redis: the functions the use
cases call, whose results the store's scripts apply."""

from __future__ import annotations

import random

import pytest

from app.approval.errors import (
    AlreadyDecided,
    ApprovalError,
    Ended,
    Expired,
    InvalidCode,
    RateLimited,
    WrongNumber,
)
from app.approval.model import ApprovalContext, PendingApproval, Status, new_approval
from app.approval.rules import (
    FINAL_STATE_KEEP,
    Outcome,
    answer_outcome,
    bound_to_browser,
    browser_binding,
    ended_error,
    keep_seconds,
    past_deadline,
    require_pending,
    status_at,
)
from app.core.matching import MatchPolicy
from app.core.signatures import DecisionClaims
from app.web.errors import APPROVAL_STATUS, approval_api_error

NOW = 1_700_000_000.0
CONTEXT = ApprovalContext(ip="10.0.0.1", user_agent="ua", browser="Firefox 1", os="Linux")


def approval(mode: str = "typed", **changes: object) -> PendingApproval:
    found = new_approval(
        user_id="u" * 32,
        kind="login",
        ttl=60,
        policy=MatchPolicy.for_mode(mode),
        context=CONTEXT,
        now=NOW,
        rng=random.Random(7),
    )
    for name, value in changes.items():
        setattr(found, name, value)
    return found


def claims(
    pending: PendingApproval, decision: str, number: object, reason: str | None = None
) -> DecisionClaims:
    return DecisionClaims(
        aid=pending.id,
        chl=pending.challenge,
        decision=decision,  # type: ignore[arg-type]
        number=number,
        reason=reason,
        iat=int(NOW),
    )


def test_the_browsers_number_approves() -> None:
    pending = approval()
    assert answer_outcome(pending, claims(pending, "approve", pending.number)) == Outcome(
        Status.APPROVED
    )
    # A JSON number loses its leading zero; it still stands for the number.
    assert answer_outcome(pending, claims(pending, "approve", int(pending.number))).status is (
        Status.APPROVED
    )


@pytest.mark.parametrize("wrong", [None, True, "", "1", "123", 1.0, ["07"], "\u0660\u0667"])
def test_any_other_number_denies_as_wrong_number(wrong: object) -> None:
    pending = approval(number="07")
    assert answer_outcome(pending, claims(pending, "approve", wrong)) == Outcome(
        Status.DENIED, "wrong_number"
    )


def test_a_neighbouring_number_denies() -> None:
    pending = approval(number="42")
    outcome = answer_outcome(pending, claims(pending, "approve", "43"))
    assert outcome == Outcome(Status.DENIED, "wrong_number")


def test_a_denial_keeps_the_phones_reason_and_needs_no_number() -> None:
    pending = approval()
    assert answer_outcome(pending, claims(pending, "deny", None)) == Outcome(Status.DENIED, "")
    assert answer_outcome(pending, claims(pending, "deny", "xx", "fraud")) == Outcome(
        Status.DENIED, "fraud"
    )


def test_an_ended_approval_refuses_with_its_final_status() -> None:
    require_pending(Status.PENDING)
    for status, kind in [
        (Status.APPROVED, AlreadyDecided),
        (Status.DENIED, AlreadyDecided),
        (Status.EXPIRED, Expired),
    ]:
        with pytest.raises(kind) as raised:
            require_pending(status)
        assert raised.value.details() == {"status": status.value}
        assert isinstance(ended_error(status), kind)


def test_the_deadline_itself_is_too_late() -> None:
    pending = approval()
    assert not past_deadline(pending, pending.expires_at - 0.001)
    assert past_deadline(pending, pending.expires_at)
    assert status_at(pending, pending.expires_at) is Status.EXPIRED
    assert status_at(pending, pending.expires_at - 1) is Status.PENDING
    decided = approval(status=Status.APPROVED)
    assert not past_deadline(decided, decided.expires_at + 10)
    assert status_at(decided, decided.expires_at + 10) is Status.APPROVED


def test_an_end_stays_readable_for_five_minutes_after_the_life_left() -> None:
    pending = approval()
    assert keep_seconds(pending, NOW) == 60 + FINAL_STATE_KEEP
    assert keep_seconds(pending, pending.expires_at + 5) == 1 + FINAL_STATE_KEEP
    assert FINAL_STATE_KEEP == 300


def test_only_the_browser_holding_the_login_cookie_is_bound() -> None:
    pending = approval(browser_binding=browser_binding("cookie-1"))
    assert bound_to_browser(pending, "cookie-1")
    assert not bound_to_browser(pending, "cookie-2")
    assert not bound_to_browser(pending, None)
    assert not bound_to_browser(pending, "c" * 129)
    assert not bound_to_browser(approval(browser_binding=None), "cookie-1")


def leaf_errors() -> list[type[ApprovalError]]:
    found: list[type[ApprovalError]] = []
    pending = [ApprovalError]
    while pending:
        kind = pending.pop()
        pending.extend(kind.__subclasses__())
        if not kind.__subclasses__():
            found.append(kind)
    return found


@pytest.mark.parametrize("kind", leaf_errors(), ids=lambda kind: kind.__name__)
def test_every_refusal_has_an_http_answer(kind: type[ApprovalError]) -> None:
    """A new domain error without a status in the HTTP table fails here, not in production."""
    error: ApprovalError
    if issubclass(kind, RateLimited):
        error = kind(7)
    elif issubclass(kind, Ended):
        error = kind(Status.DENIED)
    elif kind.__name__ == "NotApproved":
        error = kind(Status.DENIED)  # type: ignore[call-arg]
    else:
        error = kind()
    answer = approval_api_error(error)
    assert any(issubclass(kind, listed) for listed in APPROVAL_STATUS)
    assert answer.body()["error"] == kind.code and answer.body()["message"]
    if isinstance(error, RateLimited):
        assert answer.status == 429 and answer.headers == {"Retry-After": "7"}


def test_the_answers_carry_the_final_status_as_before() -> None:
    assert approval_api_error(WrongNumber()).body() == {
        "error": "wrong_number",
        "message": "the number does not match; the request was denied",
        "status": "denied",
    }
    assert approval_api_error(Expired(Status.EXPIRED)).status == 410
    assert approval_api_error(InvalidCode(denied=True)).body()["status"] == "denied"
    assert "status" not in approval_api_error(InvalidCode()).body()
