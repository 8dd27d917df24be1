"""The Duo face's one door to tapprove's approvals (app.approval): start one for an
integration, wait for it, and say how it stands in Duo's words.

Everything else in app/duo goes through here, so when the approval use cases change shape
only this module follows; their refusals (domain errors) become Duo answers here. An approval
made here is an ordinary relying-party approval: the same one-pending rule, push-fatigue
backoff and fraud lock, pushed to every device at once; `api_key_id` holds the
integration's id, so only that integration can read it back.
"""

from __future__ import annotations

import logging

from app.account_cache import Recipient
from app.approval.errors import BackedOff, Locked, UnknownUser
from app.approval.model import ApprovalContext, PendingApproval, Status
from app.approval.start import start_approval
from app.approval.waiting import wait_for_end
from app.db.accounts import get_user
from app.duo import answers
from app.duo.answers import Answer
from app.duo.integrations import LiveIntegration
from app.services import Services
from app.web.common import plausible_id

log = logging.getLogger(__name__)

# A synchronous auth waits this much past the approval's deadline for its end to arrive.
_END_SLACK = 5.0


async def email_of(svc: Services, name: str) -> str | None:
    """The email of the user whose tapprove id `name` is, if it is one."""
    if len(name) != 32 or not plausible_id(name):
        return None
    async with svc.db() as db:
        user = await get_user(db, name)
    return user.email if user is not None else None


async def recipient(svc: Services, email: str, *, fresh: bool) -> Recipient | None:
    """The user an approval would go to, with their devices; `fresh` reads the user's
    current state (preauth), otherwise this process's view may do (the create step checks
    it)."""
    if not fresh:
        cached = svc.accounts.cached(email)
        if cached is not None:
            return cached
    return await svc.accounts.by_email(email)


async def start(
    svc: Services, user: Recipient, integration: LiveIntegration, context: ApprovalContext
) -> PendingApproval | Answer:
    """A new approval for `user` asked by `integration`, or the answer refusing it
    (locked after a fraud report, or push-fatigue backoff)."""
    try:
        return await start_approval(
            svc,
            user,
            kind="rp",
            context=context,
            ttl=answers.duo_ttl(svc.settings.approval_ttl),
            api_key_id=integration.id,
            requester_name=integration.name,
            match=integration.match,
        )
    except (BackedOff, Locked, UnknownUser) as exc:
        refusal = answers.backed_off(exc.retry_after) if isinstance(exc, BackedOff) else None
        refusal = refusal or (answers.LOCKED if isinstance(exc, Locked) else answers.DENIED)
        log.info(
            "duo auth for integration %s refused: %s",
            integration.name,
            exc.code,
            extra={"integration": integration.name, "user_id": user.user.id, "result": exc.code},
        )
        return refusal


async def until_end(svc: Services, approval: PendingApproval) -> Answer:
    """Hold until `approval` ends (it lives at most answers.MAX_TTL), then answer."""
    seconds = approval.expires_at - svc.clock.now() + _END_SLACK
    final = await wait_for_end(svc, approval.id, seconds, visible=lambda _: True)
    if final is None or final.status is Status.PENDING:
        # Never open-ended: an approval that somehow outlived its deadline is a timeout.
        return answers.TIMED_OUT
    return await _answer(svc, final)


async def status(
    svc: Services, integration: LiveIntegration, txid: str, version: answers.Version
) -> Answer | None:
    """How the integration's approval `txid` stands, held until it ends or the next point
    of the face's status schedule (app.duo.answers); None when the integration has no such
    approval (unknown, gone, or another integration's)."""
    if not plausible_id(txid):
        return None
    approval = await svc.approvals.get(txid)
    if approval is None or approval.api_key_id != integration.id:
        return None
    if approval.status is Status.PENDING:
        now = svc.clock.now()
        plan = answers.schedule(version, approval.match)
        seconds = plan.hold_until(approval.created_at, now) - now
        held = await wait_for_end(
            svc, txid, seconds, visible=lambda found: found.api_key_id == integration.id
        )
        if held is None or held.api_key_id != integration.id:
            return None
        approval = held
    return await _answer(svc, approval)


async def _answer(svc: Services, approval: PendingApproval) -> Answer:
    if approval.status is Status.PENDING:
        return answers.pushed(approval.match, approval.number)
    reason = approval.reason
    if approval.status is Status.DENIED and reason is None:
        # An end heard as an event says the status only; the reason (fraud?) is stored.
        stored = await svc.approvals.get(approval.id)
        reason = stored.reason if stored is not None else None
    return answers.ended(approval.status.value, reason)
