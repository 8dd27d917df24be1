"""The browser's side of a sign-in approval: only the browser that started it (holding its
`tapprove_login` cookie) may see it, send it again, ask for an SMS code, approve it with
that code, and turn it, once approved, into a session. Ending an approval by offline
passcode lives here too, next to the SMS code (a relying party's approvals use it as well)."""

from __future__ import annotations

from app.approval.errors import (
    AlreadyCompleted,
    InvalidCode,
    NotAllowed,
    NotApproved,
    NotFound,
    SmsUnavailable,
    TooManyResends,
    TooManySmsCodes,
)
from app.approval.model import PendingApproval, Status
from app.approval.rules import (
    CODE_APPROVES,
    PASSCODE_APPROVES,
    TOO_MANY_CODES,
    Outcome,
    bound_to_browser,
    ended_error,
    keep_seconds,
    require_pending,
    status_at,
)
from app.approval.waiting import as_of_now
from app.db import audit
from app.delivery import dispatch, sms_codes
from app.services import Services

MAX_RESENDS = 3
MAX_SMS_CODES = 3
MAX_CODE_ATTEMPTS = 5


async def browser_approval(
    svc: Services, approval_id: str, login_cookie: str | None
) -> PendingApproval:
    """The approval, if this browser holds its `tapprove_login` cookie (else NotAllowed)."""
    approval = await svc.approvals.get(approval_id)
    if approval is None:
        raise NotFound()
    if not bound_to_browser(approval, login_cookie):
        raise NotAllowed()
    return approval


async def pending_browser_approval(
    svc: Services, approval_id: str, login_cookie: str | None
) -> PendingApproval:
    """`browser_approval`, refusing with Expired / AlreadyDecided unless still pending."""
    approval = await browser_approval(svc, approval_id, login_cookie)
    require_pending(status_at(approval, svc.clock.now()))
    return approval


async def current_state(
    svc: Services, approval_id: str, login_cookie: str | None
) -> tuple[PendingApproval, list[str]]:
    """The approval as it is now (ended as expired once past its deadline), and the
    channels that reached the person: `GET /api/login/<id>`."""
    approval = await as_of_now(svc, await browser_approval(svc, approval_id, login_cookie))
    if approval is None:
        raise NotFound()
    return approval, await svc.approvals.delivered(approval.id)


async def resend(svc: Services, approval: PendingApproval) -> int:
    """Send the pending request again (MAX_RESENDS times at most); the resends left."""
    count = await svc.approvals.count_resend(approval.id)
    if count > MAX_RESENDS:
        retry_after = max(1, int(approval.expires_at - svc.clock.now()))
        raise TooManyResends(retry_after, f"at most {MAX_RESENDS} resends per request")
    await dispatch.resend(svc, approval)
    return MAX_RESENDS - count


async def send_sms_code(svc: Services, approval: PendingApproval) -> None:
    """Text a code to the user's verified phone (MAX_SMS_CODES per sign-in)."""
    verdict = await svc.limits.hit(
        svc.limits.user_key(approval.user_id, "login-sms", approval.id),
        limit=MAX_SMS_CODES,
        window=svc.settings.approval_ttl + 60,
    )
    if not verdict.allowed:
        raise TooManySmsCodes(
            verdict.retry_after, f"at most {MAX_SMS_CODES} SMS codes per sign-in"
        )
    if not await sms_codes.request_code(svc, approval, automatic=False):
        raise SmsUnavailable()


async def approve_with_code(svc: Services, approval: PendingApproval, code: str, ip: str) -> None:
    """Approve the sign-in with its SMS code; the MAX_CODE_ATTEMPTS-th wrong code denies it.

    Attempts are counted per approval, not per code: a new code buys no new guesses.
    """
    now = svc.clock.now()
    checked = await svc.codes.check(
        sms_codes.CODE_PURPOSE,
        approval.id,
        "".join(code.split()),  # as a person may type it: "123 456"
        max_attempts=MAX_CODE_ATTEMPTS,
        keep=keep_seconds(approval, now),
    )
    if checked.right:
        await _decide_by_code(svc, approval, CODE_APPROVES, ip, now)
        return
    if checked.exhausted:
        await _decide_by_code(svc, approval, TOO_MANY_CODES, None, now)
        raise InvalidCode(denied=True)
    raise InvalidCode()


async def _decide_by_code(
    svc: Services, approval: PendingApproval, outcome: Outcome, ip: str | None, now: float
) -> None:
    detail: dict[str, object] = {"status": outcome.status.value, "via": "sms_code"}
    if outcome.status is Status.DENIED:
        detail["reason"] = outcome.reason
    line = audit.line(
        "approval.decided",
        user_id=approval.user_id,
        approval_id=approval.id,
        ip=ip,
        detail=detail,
        now=now,
    )
    result = await svc.approvals.decide(approval, outcome, audit_line=line)
    # A denial by too many codes is answered as a wrong code whatever raced it.
    if outcome.status is Status.APPROVED and result.kind != "decided":
        raise ended_error(result.status or Status.EXPIRED)


async def end_by_passcode(
    svc: Services, approval: PendingApproval, *, device_id: str | None, ip: str
) -> None:
    """End a pending approval by offline passcode (app.passcodes checks the code; a sign-in's
    or a relying party's): approved by `device_id`'s code (reason `passcode`, decided by that
    device), or with None denied after too many wrong ones (`too_many_codes`, which counts
    toward the backoff like a wrong number). An approval that had already ended is Expired /
    AlreadyDecided; a denial that loses the race is the wrong code's own answer anyway."""
    outcome = PASSCODE_APPROVES if device_id is not None else TOO_MANY_CODES
    line = audit.line(
        "approval.decided",
        user_id=approval.user_id,
        device_id=device_id,
        approval_id=approval.id,
        ip=ip,
        detail={"status": outcome.status.value, "reason": outcome.reason, "via": "passcode"},
        now=svc.clock.now(),
    )
    result = await svc.approvals.decide(
        approval, outcome, audit_line=line, decided_by=device_id or ""
    )
    if outcome.status is Status.APPROVED and result.kind != "decided":
        raise ended_error(result.status or Status.EXPIRED)


async def complete(svc: Services, approval_id: str, login_cookie: str | None) -> PendingApproval:
    """Mark an approved sign-in used, once; the approval, for the session it becomes."""
    approval = await svc.approvals.get(approval_id)
    if approval is None or approval.kind != "login":
        raise NotFound()
    if not bound_to_browser(approval, login_cookie):
        raise NotAllowed()
    outcome = await svc.approvals.complete(approval.id)
    if outcome == "not_approved":
        raise NotApproved(approval.status)
    if outcome == "already_completed":
        raise AlreadyCompleted()
    if outcome == "not_found":
        raise NotFound()
    return approval
