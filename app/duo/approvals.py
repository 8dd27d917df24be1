"""The Duo face's one door to tapprove's approvals (app.approval): start one for an
integration, wait for it, and say how it stands in Duo's words.

Everything else in app/duo goes through here, so when the approval use cases change shape
only this module follows; their refusals (domain errors) become Duo answers here. An approval
made here is an ordinary relying-party approval: the same one-pending rule, push-fatigue
backoff and fraud lock, pushed to every device at once; `api_key_id` holds the
integration's id, so only that integration can read it back.

Passcodes (`factor=passcode`) and SMS passcodes (`factor=sms`) start no approval: the
passcode is checked by app.passcodes in the user's budget of wrong codes, the texted one
kept in the one-time code store; their answer is final at once, and an asynchronous
caller reads it back under a txid of its own (app.store.transactions).
"""

from __future__ import annotations

import logging

from app.account_cache import Recipient
from app.approval.errors import BackedOff, Locked, TooManyPasscodes, UnknownUser
from app.approval.model import ApprovalContext, PendingApproval, Status
from app.approval.start import start_approval
from app.approval.waiting import wait_for_end
from app.core.tokens import new_id, new_numeric_code
from app.db import audit
from app.db import passcodes as stored_passcodes
from app.db.accounts import get_user
from app.delivery.sms_codes import sms_phone
from app.duo import answers
from app.duo.answers import Answer, Result
from app.duo.integrations import LiveIntegration
from app.passcodes import check_passcode
from app.services import Services
from app.store.transactions import EndedTransactions
from app.web.common import plausible_id

log = logging.getLogger(__name__)

# A synchronous auth waits this much past the approval's deadline for its end to arrive.
_END_SLACK = 5.0

# SMS passcodes: one-time codes in app.store.codes, one live per user (a new one replaces
# it), each with its own attempts; at most SMS_PER_USER texts per SMS_WINDOW.
SMS_PURPOSE = "duo-sms"
SMS_DIGITS = 6
SMS_LIFE = 600
SMS_ATTEMPTS = 5
SMS_PER_USER = 3
SMS_WINDOW = 900


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
    if approval is None:
        ended = await _ended(svc).read(txid, integration.id)
        return _answer_of(ended) if ended is not None else None
    if approval.api_key_id != integration.id:
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


# --- passcodes and SMS passcodes ----------------------------------------------------------


async def capabilities(svc: Services, user_id: str) -> tuple[set[str], str]:
    """Which of the user's devices hold a passcode seed, and the user's SMS number masked
    ("" when no SMS can go: no verified number, SMS off, or no sender)."""
    async with svc.db() as db:
        seeded = {device_id for device_id, _, _ in await stored_passcodes.live_seeds(db, user_id)}
    number = await sms_phone(svc, user_id)
    return seeded, answers.masked(number) if number else ""


async def passcode(
    svc: Services, user: Recipient, integration: LiveIntegration, typed: str, *, ip: str
) -> Answer:
    """`factor=passcode`: allow for a passcode of one of the user's devices or the SMS
    passcode last texted to them, deny otherwise; wrong codes spend the user's budget
    (app.passcodes), shared with the browser's and the relying parties' passcode paths."""
    if user.user.locked:
        return answers.LOCKED
    user_id = user.user.id

    async def texted() -> bool:
        checked = await svc.codes.check(
            SMS_PURPOSE, user_id, "".join(typed.split()), max_attempts=SMS_ATTEMPTS,
            keep=SMS_LIFE,
        )  # fmt: skip
        if checked.right:
            await svc.codes.forget(SMS_PURPOSE, user_id)  # a texted code works once
        return checked.right

    try:
        checked = await check_passcode(svc, user_id, typed, also=texted)
    except TooManyPasscodes as exc:
        answer = answers.too_many_passcodes(exc.retry_after)
        await _record(svc, "duo.passcode", user, integration, ip, answer, device_id=None)
        return answer
    answer = answers.ALLOWED if checked.right else answers.PASSCODE_WRONG
    via = "passcode" if checked.device_id else "sms_code" if checked.right else None
    await _record(
        svc, "duo.passcode", user, integration, ip, answer, device_id=checked.device_id,
        via=via,
    )  # fmt: skip
    return answer


async def send_sms(
    svc: Services, user: Recipient, integration: LiveIntegration, *, ip: str
) -> Answer:
    """`factor=sms`: text a new passcode to the user's verified number and answer `deny`
    with status `sent`, as Duo does; the next `factor=passcode` takes it."""
    if user.user.locked:
        return answers.LOCKED
    user_id = user.user.id
    number = await sms_phone(svc, user_id)
    sender = svc.providers.sms
    if number is None or sender is None:
        return answers.SMS_UNAVAILABLE
    verdict = await svc.limits.hit(
        svc.limits.user_key(user_id, "duo-sms", user_id), limit=SMS_PER_USER, window=SMS_WINDOW
    )
    if not verdict.allowed:
        return answers.too_many_texts(verdict.retry_after)
    code = new_numeric_code(SMS_DIGITS)
    await svc.codes.issue(SMS_PURPOSE, user_id, code, life=SMS_LIFE, keep=SMS_LIFE)
    sent = await sender.send(number, f"Your tapprove passcode is {code}. Never share it.")
    answer = answers.SMS_SENT if sent.outcome == "accepted" else answers.SMS_FAILED
    if answer is answers.SMS_FAILED:
        await svc.codes.forget(SMS_PURPOSE, user_id)
    await _record(svc, "duo.sms", user, integration, ip, answer, device_id=None)
    return answer


async def keep_ended(svc: Services, integration: LiveIntegration, answer: Answer) -> str:
    """A txid under which `integration` reads this final answer back (an async auth)."""
    txid = new_id()
    record = {"result": answer.result.value, "status": answer.status, "message": answer.message}
    await _ended(svc).keep(txid, integration.id, record)
    return txid


def _ended(svc: Services) -> EndedTransactions:
    return EndedTransactions(svc.redis, svc.keys)


def _answer_of(record: dict[str, str]) -> Answer:
    return Answer(Result(record["result"]), record["status"], record["message"])


async def _record(
    svc: Services,
    kind: str,
    user: Recipient,
    integration: LiveIntegration,
    ip: str,
    answer: Answer,
    *,
    device_id: str | None,
    via: str | None = None,
) -> None:
    detail: dict[str, object] = {
        "requester": integration.name,
        "result": answer.result.value,
        "status": answer.status,
    }
    if via:
        detail["via"] = via
    async with svc.db() as db:
        await audit.record(
            db, kind, user_id=user.user.id, device_id=device_id, ip=ip, detail=detail,
            now=svc.clock.now(),
        )  # fmt: skip
        await db.commit()
    log.info(
        "%s for integration %s: %s",
        kind,
        integration.name,
        answer.status,
        extra={"integration": integration.name, "user_id": user.user.id, "result": answer.status},
    )
