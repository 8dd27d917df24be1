"""The approval use cases shared by browsers, phones and relying parties: start one,
decide it with a signed answer, wait for its end. Routes stay thin; the rules live in
app.core and the atomic steps in app.store.approvals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson
from sqlmodel.ext.asyncio.session import AsyncSession

from app.account_cache import Recipient
from app.core.approvals import ApprovalContext, ApprovalKind, PendingApproval, Status, new_approval
from app.core.clock import to_datetime
from app.core.errors import ApiError
from app.core.matching import MatchPolicy, canonical_number, number_matches
from app.core.signatures import (
    DecisionClaims,
    DecisionRejected,
    device_key,
    read_kid,
    verify_decision,
)
from app.db import audit
from app.db.accounts import list_active_devices
from app.db.models import Device, User
from app.logs import current_request_id
from app.services import Services
from app.store.approvals import Backoff, Changed, Created
from app.store.events import RECONNECTED, Event
from app.store.presence import Snapshot, account_changed

log = logging.getLogger(__name__)

# How many times a new approval is planned when the user's reachability keeps changing
# under it (a phone connecting at that very moment); the last plan is not checked.
MAX_PLANS = 3


class AnsweringDevice(Protocol):
    """What deciding needs of the device that answers (a Device row, or a socket's copy)."""

    @property
    def id(self) -> str: ...

    @property
    def user_id(self) -> str: ...

    @property
    def public_jwk(self) -> str: ...


async def active_devices(svc: Services, user_id: str) -> list[Device]:
    """The user's enrolled, unrevoked devices, read from the database."""
    async with svc.db() as db:
        return await list_active_devices(db, user_id)


async def start_approval(
    svc: Services,
    recipient: Recipient,
    *,
    kind: ApprovalKind,
    context: ApprovalContext,
    ttl: int | None = None,
    browser_binding: str | None = None,
    remember_browser: bool = False,
    api_key_id: str | None = None,
    requester_name: str | None = None,
    match: MatchPolicy | None = None,
) -> PendingApproval:
    """Create a pending approval for the recipient and send it to every device at once.

    `match` is the number-matching policy; by default the deployment's (TAPPROVE_MATCH_MODE).

    The recipient may be this process's cached view (AccountCache.cached): the create step
    checks it, and when it is out of date the view is refreshed and the plan made again.
    Raises 423 `locked` after a fraud report and 429 `rate_limited` during push-fatigue backoff.
    """
    from app.delivery import dispatch

    user_id = recipient.user.id
    now = svc.clock.now()
    approval = new_approval(
        user_id=user_id,
        kind=kind,
        ttl=ttl or svc.settings.approval_ttl,
        policy=match or MatchPolicy.for_mode(svc.settings.match_mode),
        context=context,
        now=now,
        browser_binding=browser_binding,
        remember_browser=remember_browser,
        api_key_id=api_key_id,
        request_id=current_request_id(),
        requester_name=requester_name,
    )
    event = orjson.dumps({"type": "approval_request", "approval": approval.device_json()})
    if recipient.user.locked:
        # A cached "locked" may be an unlock ago: only a fresh read refuses.
        recipient = await _refreshed(svc, recipient, await svc.presence.snapshot(user_id))
        _refuse_if_locked(recipient.user)
    outcome: Created | Backoff | Changed | None = None
    for attempt in range(MAX_PLANS):
        delivery = dispatch.plan(svc, approval, recipient)  # sets approval.channels
        audit_line = audit.line(
            "approval.created",
            user_id=user_id,
            approval_id=approval.id,
            ip=context.ip,
            detail={
                "kind": kind,
                "channels": approval.channels,
                "browser": context.browser,
                # Who asked, for a relying party (an API key's or a Duo integration's name).
                **({"requester": requester_name} if requester_name else {}),
            },
            now=now,
        )
        # The last attempt does not check: a user whose phones keep coming and going still
        # gets the approval, planned with what was just read.
        check = recipient.snapshot if attempt < MAX_PLANS - 1 else None
        outcome = await svc.approvals.create(approval, event, audit_line, delivery, check)
        if not isinstance(outcome, Changed):
            break
        recipient = await _refreshed(svc, recipient, outcome.snapshot)
        _refuse_if_locked(recipient.user)
    user = recipient.user
    if outcome is None or isinstance(outcome, Changed):  # the last attempt does not check
        raise RuntimeError("approval not created")
    if isinstance(outcome, Backoff):
        raise ApiError(
            429,
            "rate_limited",
            "too many unanswered or denied requests; wait before trying again",
            {"Retry-After": str(outcome.retry_after)},
        )
    log.info(
        "approval %s created (%s) for user %s via %s",
        approval.id,
        kind,
        user.id,
        ",".join(approval.channels) or "no channel",
        extra={
            "approval_id": approval.id,
            "request_id": approval.request_id,
            "user_id": user.id,
            "kind": kind,
            "channels": approval.channels,
            "superseded": outcome.superseded,
        },
    )
    await dispatch.after_create(svc, approval, delivery)
    return approval


async def _refreshed(svc: Services, recipient: Recipient, snapshot: Snapshot) -> Recipient:
    fresh = await svc.accounts.refreshed(recipient, snapshot)
    if fresh is None:
        raise ApiError(404, "unknown_user", "no user with that email")
    return fresh


def _refuse_if_locked(user: User) -> None:
    if user.locked:
        raise ApiError(423, "locked", "sign-in is locked after a fraud report; contact support")


@dataclass(frozen=True, slots=True)
class KnownApproval:
    """What a phone's socket relayed of an approval (its `approval_request`): enough to check
    the phone's answer without reading the approval first."""

    challenge: str
    match: MatchPolicy


async def decide_with_jws(
    svc: Services,
    device: AnsweringDevice,
    approval_id: str,
    jws: object,
    *,
    ip: str,
    known: KnownApproval | None = None,
) -> Status:
    """Check a device's signed answer and, if it wins the race, end the approval with it.

    With `known` (the socket relayed this approval) the signature is checked against the
    relayed challenge and the decide step itself compares challenge, owner and number with
    the stored ones: one round trip. Without, the approval is read first.
    """
    if not isinstance(jws, str) or not jws:
        raise ApiError(422, "invalid_request", "jws: expected a compact JWS string")
    try:
        kid = read_kid(jws)
    except DecisionRejected as exc:
        raise ApiError(400, "bad_signature", exc.message) from None
    if kid != device.id:
        raise ApiError(400, "bad_signature", "kid does not name this device")
    if known is not None:
        decided = await _decide_known(svc, device, approval_id, jws, known, ip=ip)
        if decided is not None:
            return decided
    approval = await svc.approvals.get(approval_id)
    if approval is None or approval.user_id != device.user_id:
        raise ApiError(404, "not_found", "no such approval")
    now = svc.clock.now()
    claims = _verified(jws, device, approval.id, approval.challenge, now)
    raise_if_final(approval.status)

    if claims.decision == "approve":
        right = number_matches(approval.match, approval.number, claims.number)
        status, reason = (Status.APPROVED, "") if right else (Status.DENIED, "wrong_number")
    else:
        status, reason = Status.DENIED, (claims.reason or "")
    result = await svc.approvals.decide(
        approval.id,
        status,
        audit_line=_decided_line(device, approval.id, ip, status, reason, now),
        device_id=device.id,
        reason=reason,
    )
    if result.kind == "not_found":
        raise ApiError(404, "not_found", "no such approval")
    if result.kind == "final":
        raise_if_final(result.status or Status.EXPIRED)
    return await _decided(svc, device, approval.id, status, reason, approval.request_id, ip, now)


async def _decide_known(
    svc: Services,
    device: AnsweringDevice,
    approval_id: str,
    jws: str,
    known: KnownApproval,
    *,
    ip: str,
) -> Status | None:
    """The one-round-trip decision; None when the relayed copy is not the stored approval."""
    now = svc.clock.now()
    claims = _verified(jws, device, approval_id, known.challenge, now)
    approve = claims.decision == "approve"
    reason = "" if approve else (claims.reason or "")
    result = await svc.approvals.decide_known(
        approval_id,
        user_id=device.user_id,
        device_id=device.id,
        challenge=known.challenge,
        # The core's reading of the phone's number ("07", 7); None never matches.
        number=(canonical_number(known.match, claims.number) or "") if approve else None,
        reason=reason,
        lines={
            status: _decided_line(device, approval_id, ip, status, why, now)
            for status, why in (
                [(Status.APPROVED, ""), (Status.DENIED, "wrong_number")]
                if approve
                else [(Status.DENIED, reason)]
            )
        },
    )
    if result.kind == "stale":
        return None
    if result.kind == "not_found":
        raise ApiError(404, "not_found", "no such approval")
    if result.kind == "final" or result.status is None:
        raise_if_final(result.status or Status.EXPIRED)
        raise AssertionError("unreachable: a final status always raises")
    return await _decided(
        svc, device, approval_id, result.status, result.reason, result.request_id, ip, now
    )


def _verified(
    jws: str, device: AnsweringDevice, approval_id: str, challenge: str, now: float
) -> DecisionClaims:
    try:
        key = device_key(device.public_jwk)
        return verify_decision(jws, key, approval_id=approval_id, challenge=challenge, now=now)
    except DecisionRejected as exc:
        raise ApiError(400, "bad_signature", exc.message) from None


def _decided_line(
    device: AnsweringDevice, approval_id: str, ip: str, status: Status, reason: str, now: float
) -> bytes:
    return audit.line(
        "approval.decided",
        user_id=device.user_id,
        device_id=device.id,
        approval_id=approval_id,
        ip=ip,
        detail={"status": status.value, "reason": reason},
        now=now,
    )


async def _decided(
    svc: Services,
    device: AnsweringDevice,
    approval_id: str,
    status: Status,
    reason: str,
    request_id: str | None,
    ip: str,
    now: float,
) -> Status:
    """After this device's answer ended the approval: log it, lock on fraud, and answer."""
    log.info(
        "approval %s %s by device %s%s",
        approval_id,
        status.value,
        device.id,
        f" ({reason})" if reason else "",
        extra={
            "approval_id": approval_id,
            "request_id": request_id,
            "user_id": device.user_id,
            "device_id": device.id,
            "status": status.value,
            "reason": reason or None,
        },
    )
    if reason == "fraud":
        approval = await svc.approvals.get(approval_id)
        if approval is not None:
            async with svc.db() as db:
                await _lock_after_fraud(svc, db, device.user_id, approval, ip, now)
                await db.commit()
            await account_changed(svc.redis, svc.keys, device.user_id)
    if reason == "wrong_number":
        raise ApiError(
            422,
            "wrong_number",
            "the number does not match; the request was denied",
            extra={"status": Status.DENIED.value},
        )
    return status


def raise_if_final(status: Status) -> None:
    """409 `already_decided` or 410 `expired` (with the final status) unless still pending."""
    if status is Status.EXPIRED:
        raise ApiError(410, "expired", "this request has expired", extra={"status": status.value})
    if status is not Status.PENDING:
        raise ApiError(
            409,
            "already_decided",
            "this request was already answered",
            extra={"status": status.value},
        )


async def _lock_after_fraud(
    svc: Services, db: AsyncSession, user_id: str, approval: PendingApproval, ip: str, now: float
) -> None:
    """A fraud report locks new approvals for the user until an operator unlocks them."""
    from app.delivery import notices

    user = await db.get(User, user_id)
    if user is None:
        return
    user.locked = True
    user.locked_at = to_datetime(now)
    db.add(user)
    await audit.record(
        db,
        "user.locked",
        user_id=user_id,
        approval_id=approval.id,
        ip=ip,
        detail={
            "reason": "fraud_reported",
            "browser": approval.context.browser,
            "login_ip": approval.context.ip,
        },
        now=now,
    )
    notices.fraud_reported(svc.settings, db, user, approval, now)
    await svc.sessions.revoke_user(user_id)


async def wait_for_end(
    svc: Services,
    approval_id: str,
    seconds: float,
    *,
    visible: Callable[[PendingApproval], bool],
) -> PendingApproval | None:
    """The approval once it has ended, or as it is when `seconds` have passed; None when
    unknown. One that `visible` rejects comes back at once (the caller answers 404).

    The read that starts the wait also registers it (app.store.waiters), so an end after
    the read is not missed, and the result event carries the final status and time, so
    the approval is not read again.
    """
    if seconds <= 0:
        return await svc.approvals.get(approval_id)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + seconds
    queue: asyncio.Queue[Event] = asyncio.Queue()
    async with svc.waiters.watch(approval_id, queue.put_nowait) as approval:
        while approval is not None and approval.status is Status.PENDING and visible(approval):
            until_deadline = approval.expires_at - svc.clock.now()
            if until_deadline <= 0:
                await svc.approvals.expire_if_due(approval_id)
                approval = await svc.approvals.get(approval_id)
                continue
            remaining = give_up - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(min(remaining, until_deadline + 0.05)):
                    event = await queue.get()
            except TimeoutError:
                continue
            if event is RECONNECTED:
                approval = await svc.approvals.get(approval_id)  # events may have been missed
            else:
                approval = approval.ended(event) or await svc.approvals.get(approval_id)
        return approval
