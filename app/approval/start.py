"""Starting an approval: a new pending approval for a user, planned with what this process
knows of them, created in one atomic step (superseding their pending one), then sent."""

from __future__ import annotations

import logging

import orjson

from app.account_cache import Recipient
from app.approval.errors import BackedOff, Locked, UnknownUser
from app.approval.model import ApprovalContext, ApprovalKind, PendingApproval, new_approval
from app.approval.store import Backoff, Changed, Created, Delivery, StillPending
from app.core.matching import MatchPolicy
from app.db import audit
from app.db.models import User
from app.delivery import dispatch
from app.logs import current_request_id
from app.services import Services
from app.store.presence import Snapshot

log = logging.getLogger(__name__)

# How many times a new approval is planned when the user's reachability keeps changing
# under it (a phone connecting at that very moment); the last plan is not checked.
MAX_PLANS = 3
# Creates that find the user's pending approval is another than expected, then supersede
# that one: each such miss means another create won meanwhile.
MAX_CREATES = MAX_PLANS + 3


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
    Raises Locked after a fraud report and BackedOff during push-fatigue backoff.
    """
    user_id = recipient.user.id
    approval = new_approval(
        user_id=user_id,
        kind=kind,
        ttl=ttl or svc.settings.approval_ttl,
        policy=match or MatchPolicy.for_mode(svc.settings.match_mode),
        context=context,
        now=svc.clock.now(),
        browser_binding=browser_binding,
        remember_browser=remember_browser,
        api_key_id=api_key_id,
        request_id=current_request_id(),
        requester_name=requester_name,
        shard=svc.approvals.shard_for(user_id),
    )
    if recipient.user.locked:
        # A cached "locked" may be an unlock ago: only a fresh read refuses.
        recipient = await _refreshed(svc, recipient, await svc.presence.snapshot(user_id))
    delivery, outcome = await _create(svc, approval, recipient)
    if isinstance(outcome, Backoff):
        raise BackedOff(outcome.retry_after)
    _log_created(approval, outcome)
    await dispatch.after_create(svc, approval, delivery)
    return approval


async def _create(
    svc: Services, approval: PendingApproval, recipient: Recipient
) -> tuple[Delivery, Created | Backoff]:
    """Plan and create until the create step takes it (or backs it off)."""
    event = orjson.dumps({"type": "approval_request", "approval": approval.device_json()})
    plans = 1
    superseding: str | None = None
    for _ in range(MAX_CREATES):
        delivery = dispatch.plan(svc, approval, recipient)  # sets approval.channels
        line = _line("approval.created", approval, approval.id)
        # The last plan is not checked: a user whose phones keep coming and going still
        # gets the approval, planned with what was just read.
        check = recipient.snapshot if plans < MAX_PLANS else None
        replacing = None
        if superseding is not None:
            replacing = (superseding, _line("approval.superseded", approval, superseding, {}))
        outcome = await svc.approvals.create(approval, event, line, delivery, check, replacing)
        if isinstance(outcome, Changed):
            recipient = await _refreshed(svc, recipient, outcome.snapshot)
            plans += 1
        elif isinstance(outcome, StillPending):
            superseding = outcome.approval_id
        else:
            return delivery, outcome
    raise RuntimeError("approval not created: the user's pending approval kept changing")


def _line(
    kind: str,
    approval: PendingApproval,
    approval_id: str | None,
    detail: dict[str, object] | None = None,
) -> bytes:
    """An audit line about `approval_id`, caused by creating `approval`."""
    if detail is None:
        detail = {
            "kind": approval.kind,
            "channels": approval.channels,
            "browser": approval.context.browser,
            # Who asked, for a relying party (an API key's or a Duo integration's name).
            **({"requester": approval.requester_name} if approval.requester_name else {}),
        }
    return audit.line(
        kind,
        user_id=approval.user_id,
        approval_id=approval_id,
        ip=approval.context.ip,
        detail=detail,
        now=approval.created_at,
    )


async def _refreshed(svc: Services, recipient: Recipient, snapshot: Snapshot) -> Recipient:
    """The recipient as of `snapshot`; refuses when the user is gone or locked."""
    fresh = await svc.accounts.refreshed(recipient, snapshot)
    if fresh is None:
        raise UnknownUser()
    refuse_if_locked(fresh.user)
    return fresh


def refuse_if_locked(user: User) -> None:
    """A fraud report locks new approvals until an operator unlocks them."""
    if user.locked:
        raise Locked()


def _log_created(approval: PendingApproval, outcome: Created) -> None:
    log.info(
        "approval %s created (%s) for user %s via %s",
        approval.id,
        approval.kind,
        approval.user_id,
        ",".join(approval.channels) or "no channel",
        extra={
            "approval_id": approval.id,
            "request_id": approval.request_id,
            "user_id": approval.user_id,
            "kind": approval.kind,
            "channels": approval.channels,
            "superseded": outcome.superseded,
        },
    )
