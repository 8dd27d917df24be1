"""What a typed answer costs against the plain dict it replaced (issue 14, item 7).

`python -m bench.answer_rendering`: the three hot JSON answers rendered the way the code did
before (a dict, then orjson) and the way it does now (the route's answer model, then
`app.web.contract.answer`), interleaved in one process; the minimum of 7 repeats of 20,000,
in process CPU time. The bytes and status of both are checked equal first.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable

from starlette.responses import Response

from app.web.browser import LoginResult
from app.web.contract import Match, answer
from app.web.errors import FastJSON
from app.web.relying_party import RpApprovalCreated, RpApprovalStatus

ID = "0f" + "a" * 30
AT = "2026-12-06T08:00:00Z"
MATCH = {"mode": "typed", "digits": 2}
REPEATS = 7
CALLS = 20_000


def dict_created() -> Response:
    body = {
        "approval_id": ID,
        "number": "42",
        "expires_at": AT,
        "match": dict(MATCH),
        "channels": ["websocket"],
    }
    return FastJSON(body, status_code=201)


def typed_created() -> Response:
    created = RpApprovalCreated(
        approval_id=ID,
        number="42",
        expires_at=AT,
        match=Match.model_validate(dict(MATCH)),
        channels=["websocket"],
    )
    return answer(created, 201)


def dict_status() -> Response:
    body = {"approval_id": ID, "status": "approved", "expires_at": AT, "created_at": AT}
    body["decided_at"] = AT
    body["reason"] = "device"
    return FastJSON(body)


def typed_status() -> Response:
    status = RpApprovalStatus(
        approval_id=ID,
        status="approved",
        expires_at=AT,
        created_at=AT,
        decided_at=AT,
        reason="device",
    )
    return answer(status)


def dict_login() -> Response:
    body = {
        "status": "approval_required",
        "approval_id": ID,
        "number": "42",
        "match": dict(MATCH),
        "expires_at": AT,
        "channels": ["websocket"],
        "stream": f"/ws/login/{ID}",
        "sms_available": False,
    }
    return FastJSON(body, status_code=202)


def typed_login() -> Response:
    required = LoginResult(
        status="approval_required",
        approval_id=ID,
        number="42",
        match=Match.model_validate(dict(MATCH)),
        expires_at=AT,
        channels=["websocket"],
        stream=f"/ws/login/{ID}",
        sms_available=False,
    )
    return answer(required, 202)


PAIRS: list[tuple[str, Callable[[], Response], Callable[[], Response]]] = [
    ("POST /api/v1/approvals 201", dict_created, typed_created),
    ("GET /api/v1/approvals/<id> 200", dict_status, typed_status),
    ("POST /api/login 202", dict_login, typed_login),
]


def _microseconds(render: Callable[[], Response]) -> float:
    return timeit.timeit(render, number=CALLS, timer=time.process_time) / CALLS * 1e6


def main() -> None:
    for name, plain, typed in PAIRS:
        before, after = plain(), typed()
        assert (before.body, before.status_code) == (after.body, after.status_code), name
    for name, plain, typed in PAIRS:
        plain_times: list[float] = []
        typed_times: list[float] = []
        for _ in range(REPEATS):
            plain_times.append(_microseconds(plain))
            typed_times.append(_microseconds(typed))
        added = min(typed_times) - min(plain_times)
        print(
            f"{name}: dict {min(plain_times):.1f} us, typed {min(typed_times):.1f} us, "
            f"+{added:.1f} us"
        )


if __name__ == "__main__":
    main()
