"""The server-to-server API for relying parties (VPN, SSH, other apps): `/api/v1/approvals`."""

from __future__ import annotations

import unicodedata

from pydantic import Field
from pydantic.json_schema import SkipJsonSchema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from app import passcodes
from app.approval.errors import NotFound, UnknownUser
from app.approval.model import PendingApproval
from app.approval.rules import require_pending
from app.approval.start import start_approval
from app.approval.waiting import as_of_now, wait_for_end
from app.core.clock import rfc3339
from app.core.errors import ApiError
from app.core.tokens import hash_token
from app.db.accounts import get_api_key_by_plaintext
from app.db.models import ApiKey
from app.web.common import bearer, client_ip, plausible_id, request_context, services
from app.web.contract import (
    RATE_LIMITED,
    RP_KEY,
    Answer,
    ApprovalStatus,
    Channel,
    Decision,
    Match,
    Query,
    Reason,
    Reply,
    Time,
    answer,
    answers,
    omitted_if_none,
)
from app.web.errors import StrictBody, read_body

MAX_WAIT = 30

# Characters that are not shown as themselves: C0/C1 controls (newlines, ESC sequences that
# steer a terminal), format characters (bidi overrides that reorder a line), line separators.
UNSHOWN = frozenset({"Cc", "Cf", "Zl", "Zp"})


class RpContext(StrictBody):
    ip: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=512)
    browser: str | None = Field(default=None, max_length=100)
    os: str | None = Field(default=None, max_length=100)


class PasscodeBody(StrictBody):
    passcode: str = Field(min_length=1, max_length=32)


class CreateApproval(StrictBody):
    user: str = Field(min_length=1, max_length=320)
    context: RpContext | None = None
    ttl: int | None = Field(default=None, ge=10, le=600)


class RpApprovalCreated(Answer):
    approval_id: str
    number: str
    expires_at: Time
    match: Match
    channels: list[Channel]


class RpApprovalStatus(Answer):
    approval_id: str
    status: ApprovalStatus
    expires_at: Time
    created_at: Time
    # Only once it ended.
    decided_at: Time | SkipJsonSchema[None] = omitted_if_none()
    reason: Reason

    @classmethod
    def of(cls, approval: PendingApproval) -> RpApprovalStatus:
        return cls(
            approval_id=approval.id,
            status=approval.status.value,
            expires_at=rfc3339(approval.expires_at),
            created_at=rfc3339(approval.created_at),
            decided_at=rfc3339(approval.decided_at) if approval.decided_at is not None else None,
            # Why it ended (e.g. `superseded` vs `timeout` for an expiry); null while pending.
            reason=approval.final_reason,
        )


async def _api_key(request: Request) -> ApiKey:
    token = bearer(request)
    if token is None or len(token) > 256:
        raise ApiError(401, "unauthorized", "missing or invalid API key")
    svc = services(request)
    cache_key = hash_token(token)
    key = svc.api_keys.get(cache_key)
    if key is not None:
        return key
    async with svc.db() as db:
        key = await get_api_key_by_plaintext(db, token)
    if key is None:
        raise ApiError(401, "unauthorized", "missing or invalid API key")
    svc.api_keys.put(cache_key, key)
    return key


def _shown_context(context: RpContext | None) -> dict[str, str]:
    """The fields the phone will show, or 422 naming one that holds a control character:
    the person deciding reads them, and a field must not forge or hide another line."""
    given = context.model_dump(exclude_none=True) if context else {}
    for name, value in given.items():
        if any(unicodedata.category(char) in UNSHOWN for char in value):
            raise ApiError(
                422, "invalid_request", f"context.{name}: must not contain control characters"
            )
    return given


@answers(
    {
        201: Reply("The approval was sent to the user's devices", RpApprovalCreated),
        401: "unauthorized",
        404: "unknown_user",
        423: "locked",
        429: RATE_LIMITED,
    },
    body=CreateApproval,
    auth=RP_KEY,
)
async def create(request: Request) -> Response:
    """POST /api/v1/approvals: ask a user to approve something on their phone."""
    svc = services(request)
    key = await _api_key(request)
    body = await read_body(request, CreateApproval)
    given = _shown_context(body.context)
    email = body.user.strip().lower()
    recipient = svc.accounts.cached(email) or await svc.accounts.by_email(email)
    if recipient is None:
        raise UnknownUser()
    approval = await start_approval(
        svc,
        recipient,
        kind="rp",
        context=request_context(request, given),
        ttl=body.ttl,
        api_key_id=key.id,
        requester_name=key.name,
    )
    created = RpApprovalCreated(
        approval_id=approval.id,
        number=approval.number,
        expires_at=rfc3339(approval.expires_at),
        match=Match.model_validate(approval.match.to_json()),
        channels=approval.channels,
    )
    return answer(created, 201)


def _wait_seconds(request: Request) -> float:
    raw = request.query_params.get("wait")
    if raw is None or raw == "":
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        raise ApiError(422, "invalid_request", "wait: must be a number from 0 to 30") from None
    if not 0 <= wait <= MAX_WAIT:
        raise ApiError(422, "invalid_request", "wait: must be a number from 0 to 30")
    return wait


@answers(
    {
        200: Reply("The status", RpApprovalStatus),
        401: "unauthorized",
        404: "not_found (also another key's approval)",
        422: "invalid_request: wait is not a number from 0 to 30",
    },
    auth=RP_KEY,
    query=(
        Query(
            "wait",
            "Hold the request until the approval ends or this many seconds pass",
            {"type": "number", "minimum": 0, "maximum": 30},
        ),
    ),
)
async def status(request: Request) -> Response:
    """GET /api/v1/approvals/<id>?wait=N: the status, optionally held until it ends."""
    svc = services(request)
    key = await _api_key(request)
    wait = _wait_seconds(request)
    approval_id = request.path_params["approval_id"]
    if not plausible_id(approval_id):
        raise NotFound()
    approval = await wait_for_end(
        svc, approval_id, wait, visible=lambda found: found.api_key_id == key.id
    )
    if approval is None or approval.api_key_id != key.id:
        raise NotFound()
    return answer(RpApprovalStatus.of(approval))


@answers(
    {
        200: Reply("Approved with an offline passcode the person typed", Decision),
        400: "invalid_code (after 5 on one approval it is denied, with status denied)",
        401: "unauthorized",
        404: "not_found (also another key's approval)",
        409: "already_decided",
        410: "expired",
        429: "rate_limited: 10 wrong passcodes per user in 15 minutes (with Retry-After)",
    },
    body=PasscodeBody,
    auth=RP_KEY,
    description="An addition to PROTOCOL.md v1 (docs/protocol.md §3.6).",
)
async def passcode(request: Request) -> Response:
    """POST /api/v1/approvals/<id>/passcode: approve with a passcode the person read off
    their phone (offline) and typed into the relying party."""
    svc = services(request)
    key = await _api_key(request)
    body = await read_body(request, PasscodeBody)
    approval_id = request.path_params["approval_id"]
    approval = await svc.approvals.get(approval_id) if plausible_id(approval_id) else None
    if approval is None or approval.api_key_id != key.id:
        raise NotFound()
    # One past its deadline ends as expired now (and its backoff counts) rather than later.
    approval = await as_of_now(svc, approval)
    if approval is None:
        raise NotFound()
    require_pending(approval.status)
    await passcodes.approve_with_passcode(svc, approval, body.passcode, ip=client_ip(request))
    return answer(Decision(status="approved"))


routes: list[BaseRoute] = [
    Route("/api/v1/approvals", create, methods=["POST"]),
    Route("/api/v1/approvals/{approval_id}", status, methods=["GET"]),
    Route("/api/v1/approvals/{approval_id}/passcode", passcode, methods=["POST"]),
]
