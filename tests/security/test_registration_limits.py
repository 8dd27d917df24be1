"""Registration is rate-limited per IP and per address (PROTOCOL: 429 `rate_limited` with
`Retry-After`), and the limits tell nothing about whether an address is registered: a known
and an unknown address get the same answers, byte for byte, below the limit and past it.

The server runs like `tapprove serve` behind a local proxy (TAPPROVE_TRUSTED_PROXIES=
127.0.0.1), so each request chooses its client IP with `X-Forwarded-For`; every limit is live.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.web.registration import REGISTRATIONS_PER_ADDRESS, REGISTRATIONS_PER_IP
from tests.fixtures.app import PASSWORD, LiveServer
from tests.security.harness import add_user, assert_error, unique_email
from tests.security.served import production_servers

pytestmark = pytest.mark.timeout(240)

PER_ADDRESS, ADDRESS_WINDOW = REGISTRATIONS_PER_ADDRESS
PER_IP, IP_WINDOW = REGISTRATIONS_PER_IP
# Headers that differ between any two responses, whatever they answer.
VARYING = {"date", "x-request-id", "retry-after"}


@pytest.fixture
async def server(
    tmp_path: Path, redis_url: str, redis_prefix: str, fresh_pg_url: str
) -> AsyncIterator[LiveServer]:
    async with production_servers(tmp_path, redis_url, redis_prefix, fresh_pg_url) as start:
        yield await start(trusted_proxies="127.0.0.1")


def an_ip() -> str:
    return f"198.18.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


async def register(server: LiveServer, email: str, ip: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url) as client:
        return await client.post(
            "/api/register",
            json={"email": email, "password": PASSWORD},
            headers={"X-Forwarded-For": ip},
        )


def fingerprint(response: httpx.Response) -> tuple[int, bytes, tuple[tuple[str, str], ...]]:
    headers = tuple(
        sorted((k.lower(), v) for k, v in response.headers.items() if k.lower() not in VARYING)
    )
    return response.status_code, response.content, headers


def assert_limited(response: httpx.Response, window: int) -> None:
    assert_error(response, 429, "rate_limited")
    assert 0 < int(response.headers["retry-after"]) <= window, response.headers


async def test_an_ip_is_limited_to_20_registrations_in_15_minutes(server: LiveServer) -> None:
    busy, other = an_ip(), an_ip()
    for _ in range(PER_IP):
        answer = await register(server, unique_email("burst"), busy)
        assert answer.status_code == 202, answer.text
    assert_limited(await register(server, unique_email("burst"), busy), IP_WINDOW)
    # Malformed ones are refused too: the budget counts attempts, not successes.
    assert_limited(await register(server, "not an address", busy), IP_WINDOW)
    # The limit is the IP's alone.
    assert (await register(server, unique_email("other"), other)).status_code == 202


async def test_an_address_is_limited_to_5_registrations_an_hour_from_any_ip(
    server: LiveServer,
) -> None:
    email = unique_email("popular")
    # Spellings of one address share its budget.
    spellings = [email, email.upper(), f"  {email}  ", email.capitalize(), email]
    assert len(spellings) == PER_ADDRESS
    for spelling in spellings:
        answer = await register(server, spelling, an_ip())
        assert answer.status_code == 202, answer.text
    assert_limited(await register(server, email.upper(), an_ip()), ADDRESS_WINDOW)
    assert (await register(server, unique_email("unrelated"), an_ip())).status_code == 202


async def test_known_and_unknown_addresses_get_the_same_answers_below_and_past_the_limits(
    server: LiveServer,
) -> None:
    known = unique_email("known")
    await add_user(server, known)
    unknown = unique_email("unknown")
    answers: dict[str, list[httpx.Response]] = {known: [], unknown: []}
    # Per address: the same sequence of answers, 202s then a 429.
    for _ in range(PER_ADDRESS + 2):
        for email in (known, unknown):
            answers[email].append(await register(server, email, an_ip()))
    assert [a.status_code for a in answers[unknown]] == [202] * PER_ADDRESS + [429, 429]
    assert [fingerprint(a) for a in answers[known]] == [fingerprint(a) for a in answers[unknown]]
    for email in (known, unknown):
        assert_limited(answers[email][-1], ADDRESS_WINDOW)
    # Per IP: from an IP past its limit, known and fresh addresses get the same 429.
    busy = an_ip()
    for _ in range(PER_IP):
        assert (await register(server, unique_email("filler"), busy)).status_code == 202
    past = [await register(server, email, busy) for email in (known, unique_email("fresh"))]
    assert len({fingerprint(a) for a in past}) == 1, [a.text for a in past]
    assert_limited(past[0], IP_WINDOW)
