"""Schema-driven fuzzing (schemathesis): every operation of the server's own /openapi.json,
sent from generated cases to a real server, answers as the document says.

For each operation: never a 5xx, the status is documented, the body and content type match
the documented answer, and every 4xx is JSON in the protocol's error shape. One pass is
unauthenticated (schemathesis makes up its own tokens and cookies); a second pass calls the
relying-party routes with a valid API key, half the time naming a real user or approval.

schemathesis sends with `requests`, which blocks; the server runs on this test's event loop,
so the generated cases are driven from a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, checks

from tests.fixtures.app import LiveServer
from tests.security.harness import api_key, clear_limits, person

pytestmark = pytest.mark.timeout(120)

CASES = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


def secured_by(*schemes: str) -> Callable[[Any], bool]:
    """Operations whose documented security names one of `schemes`."""

    def select(operation: Any) -> bool:
        security = operation.definition.raw.get("security", [])
        return any(name in schemes for entry in security for name in entry)

    return select


def error_shape(response: Any) -> str | None:
    """Why a 4xx answer is not `{"error": str, "message": str}` JSON, or None."""
    if not 400 <= response.status_code < 500:
        return None
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if not content_type.startswith("application/json"):
        return f"content-type {content_type!r}"
    try:
        body = json.loads(response.content)
    except ValueError:
        return "body is not JSON"
    if not isinstance(body, dict) or not isinstance(body.get("error"), str) or not body["error"]:
        return "no `error` string"
    if not isinstance(body.get("message"), str):
        return "no `message` string"
    return None


def fuzz(
    server: LiveServer,
    select: Callable[[Any], bool] | None = None,
    headers: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
    adapt: Callable[[Case], None] | None = None,
) -> tuple[int, list[str]]:
    """Run generated cases for every operation (or those `select` picks); the number of
    cases sent and one report per failing operation. Blocking: call from a thread."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", timeout=10)
    sent = 0
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if select is not None and not select(operation):
            continue

        @CASES
        @given(case=operation.as_strategy())
        def run(case: Case) -> None:
            nonlocal sent
            if adapt is not None:
                adapt(case)
            extra = {"Origin": server.origin, **(headers or {})}
            response = case.call(base_url=server.url, headers=extra, cookies=cookies, timeout=30)
            sent += 1
            case.validate_response(response, checks=CHECKS, headers=extra)
            problem = error_shape(response)
            assert problem is None, (
                f"{case.operation.label}: {response.status_code} error body: {problem}: "
                f"{response.content[:300]!r}\n{case.as_curl_command(headers=extra)}"
            )

        try:
            run()
        except Exception as exc:
            failures.append(f"{operation.label}:\n{exc}")
    return sent, failures


async def test_every_operation_answers_as_documented(server: LiveServer) -> None:
    sent, failures = await asyncio.to_thread(fuzz, server)
    assert not failures, "\n\n".join(failures)
    assert sent >= 200, sent


async def test_relying_party_routes_with_a_valid_api_key(server: LiveServer) -> None:
    key = await api_key(server)
    who = await person(server, "rp-target")
    headers = {"Authorization": f"Bearer {key}"}
    created = await who.session.post(
        "/api/v1/approvals", json={"user": who.email, "ttl": 600}, headers=headers
    )
    assert created.status_code == 201, created.text
    known = created.json()["approval_id"]
    loop = asyncio.get_running_loop()

    def adapt(case: Case) -> None:
        # Creating approvals for one user trips push-fatigue backoff (a documented 429)
        # after the first; forget it so the 201 answer is checked more than once.
        asyncio.run_coroutine_threadsafe(clear_limits(server), loop).result(10)
        # Half the cases name the real user / approval, so the 201 and 200 answers are
        # checked too; `wait` is kept short, a pending approval would otherwise hold 30 s.
        real = zlib.crc32(repr((case.body, case.path_parameters)).encode()) % 2 == 0
        if isinstance(case.body, dict) and real:
            case.body["user"] = who.email
        if case.path_parameters and real:
            case.path_parameters["approval_id"] = known
        if case.query and "wait" in case.query:
            case.query["wait"] = min(float(case.query["wait"]), 0.2)

    sent, failures = await asyncio.to_thread(
        fuzz, server, secured_by("apiKey"), headers, None, adapt
    )
    assert not failures, "\n\n".join(failures)
    assert sent >= 2 * CASES.max_examples // 2, sent


async def test_session_and_device_routes_signed_in(server: LiveServer) -> None:
    """A signed-in user (session cookie, approved with a device) whose phone's token is the
    Bearer credential; DELETE /api/devices/me is left to the unauthenticated pass, or it
    would unenroll the phone halfway through."""
    who = await person(server, "signed-in")
    cookies = {"tapprove_session": who.session.cookies["tapprove_session"]}

    def select(operation: Any) -> bool:
        return operation.label != "DELETE /api/devices/me" and secured_by("session", "deviceToken")(
            operation
        )

    sent, failures = await asyncio.to_thread(fuzz, server, select, who.phone.auth, cookies)
    assert not failures, "\n\n".join(failures)
    assert sent >= 100, sent
