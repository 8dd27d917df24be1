"""Online password guessing (PROTOCOL §2): 10 failed passwords per account or 100 per IP in
15 minutes answer 429 with Retry-After, in every process alike; other spellings of the same
address count against the same account; a correct password from a trusted browser still
gets in, but a stolen trust cookie buys no unlimited guesses.

Requests come from chosen IPs for real: each client binds its socket to an address of
127.0.0.0/8 (all of it is this machine), so no proxy header has to be trusted. Limits are
never wiped: each test has its own people and IPs.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import httpx
import pytest

from app.core.tokens import hash_token
from tests.fixtures.app import PASSWORD, LiveServer, ServerFactory, loopback_address
from tests.security.harness import (
    CHROME,
    MakePerson,
    add_user,
    approved_on_socket,
    assert_error,
    person,
    unique_email,
)

pytestmark = pytest.mark.timeout(120)

WRONG = "not the password"


def an_ip() -> str:
    return loopback_address()


async def attempt(
    server: LiveServer,
    email: str,
    password: str,
    *,
    ip: str | None = None,
    browser: httpx.AsyncClient | None = None,
) -> httpx.Response:
    """One sign-in from `browser` (its own IP), or from a client at `ip` (default: a new one).

    The timeout is generous: parallel attempts on unknown addresses each spend a real-cost
    argon2 verification, and they queue behind one another on a small machine."""
    headers = {"Origin": server.origin, "User-Agent": CHROME}
    body = {"email": email, "password": password}
    if browser is not None:
        assert ip is None, "a browser comes from its own IP"
        return await browser.post("/api/login", json=body, headers=headers)
    transport = httpx.AsyncHTTPTransport(local_address=ip or an_ip())
    async with httpx.AsyncClient(base_url=server.url, transport=transport, timeout=60) as client:
        return await client.post("/api/login", json=body, headers=headers)


def fullwidth(text: str) -> str:
    """Full-width letters: IDNA maps them to ASCII, so it is still the same address."""
    return "".join(chr(ord(c) + 0xFEE0) for c in text)


def assert_limited(response: httpx.Response) -> None:
    assert_error(response, 429, "rate_limited")
    assert 1 <= int(response.headers["Retry-After"]) <= 15 * 60, response.headers


def assert_refused(answers: list[httpx.Response]) -> list[int]:
    """Each answer is a wrong-password 401 or a 429 with Retry-After; their statuses."""
    for answer in answers:
        if answer.status_code == 429:
            assert_limited(answer)
        else:
            assert_error(answer, 401, "invalid_credentials")
    return [a.status_code for a in answers]


async def test_ten_failures_lock_the_account_from_every_ip(
    server: LiveServer, make_person: MakePerson
) -> None:
    who = await make_person(server, "guessed")
    for _ in range(10):
        assert_error(await attempt(server, who.email, WRONG), 401, "invalid_credentials")
    # The right password, from a new IP and an untrusted browser: still refused.
    assert_limited(await attempt(server, who.email, PASSWORD))
    assert_limited(await attempt(server, who.email, WRONG))
    # Another account is not affected.
    other = await person(server, "bystander")
    assert (await attempt(server, other.email, PASSWORD)).status_code == 202


async def test_failures_count_over_a_15_minute_window_then_the_owner_gets_in(
    server: LiveServer, make_person: MakePerson
) -> None:
    """The window is read where the server keeps it (the TTL Redis reports for each
    counter, and Retry-After), then ended, rather than waited out."""
    who = await make_person(server, "window")
    ip = an_ip()
    assert_error(await attempt(server, who.email, WRONG, ip=ip), 401, "invalid_credentials")
    redis, limits = server.services.redis, server.services.limits
    counters = [
        limits.key("login-failed", "account", hash_token(who.email)),
        limits.key("login-failed", "ip", ip),
    ]
    for key in counters:
        assert 15 * 60 - 30 <= await redis.ttl(key) <= 15 * 60, key
    for _ in range(9):
        assert_error(await attempt(server, who.email, WRONG, ip=ip), 401, "invalid_credentials")
    limited = await attempt(server, who.email, PASSWORD)
    assert_limited(limited)
    assert int(limited.headers["Retry-After"]) >= 15 * 60 - 30, limited.headers
    # The window ends (as 15 minutes would end it): the right password is let in again.
    await redis.pexpire(counters[0], 1)
    deadline = time.monotonic() + 10
    while await redis.exists(counters[0]):
        assert time.monotonic() < deadline, "the counter outlived its TTL"
    assert (await attempt(server, who.email, PASSWORD)).status_code == 202


async def test_unknown_addresses_are_limited_the_same_way(server: LiveServer) -> None:
    ghost = unique_email("ghost")
    failures = await asyncio.gather(*(attempt(server, ghost, WRONG) for _ in range(10)))
    assert {r.status_code for r in failures} == {401}
    limited = await attempt(server, ghost, WRONG)
    assert_limited(limited)
    who = await person(server, "real")
    for _ in range(10):
        await attempt(server, who.email, WRONG)
    real = await attempt(server, who.email, WRONG)
    assert real.json() == limited.json()


async def test_other_spellings_of_an_address_share_its_limit(server: LiveServer) -> None:
    local = f"spelled{secrets.token_hex(3)}"
    email = f"{local}@example.com"
    await add_user(server, email)
    spellings = [
        email,
        email.upper(),
        f"  {email}  ",
        f"{local}@EXAMPLE.com",
        f"{local}@{fullwidth('example')}.com",
        f"{local}@example.{fullwidth('com')}",
    ]
    for index in range(10):
        spelling = spellings[index % len(spellings)]
        assert_error(await attempt(server, spelling, WRONG), 401, "invalid_credentials")
    for spelling in spellings:
        assert_limited(await attempt(server, spelling, PASSWORD))


async def test_a_hundred_failures_lock_an_ip_even_in_one_burst(server: LiveServer) -> None:
    ip = an_ip()
    # Nine failures each on twelve accounts, all at once: no account reaches its own limit,
    # and no more than 100 guesses from the IP get to the password check.
    emails = [unique_email("spray") for _ in range(12)]
    await asyncio.gather(*(add_user(server, email) for email in emails))
    answers = await asyncio.gather(
        *(attempt(server, email, WRONG, ip=ip) for email in emails for _ in range(9))
    )
    codes = assert_refused(answers)
    assert codes.count(401) == 100 and codes.count(429) == 8, sorted(codes)
    fresh = await person(server, "fresh")
    assert_limited(await attempt(server, fresh.email, PASSWORD, ip=ip))
    assert (await attempt(server, fresh.email, PASSWORD, ip=an_ip())).status_code == 202


async def test_a_trusted_browser_with_the_right_password_still_gets_in(
    server: LiveServer, make_person: MakePerson
) -> None:
    who = await make_person(server, "owner")
    browser = await approved_on_socket(server, who.email, who.phone, remember_browser=True)
    assert "tapprove_trust" in browser.cookies
    for _ in range(10):
        await attempt(server, who.email, WRONG)
    assert_limited(await attempt(server, who.email, PASSWORD))
    owner = await attempt(server, who.email, PASSWORD, browser=browser)
    assert owner.status_code == 200 and owner.json() == {"status": "authenticated"}


async def test_a_stolen_trust_cookie_buys_no_unlimited_guesses(
    server: LiveServer, make_person: MakePerson
) -> None:
    who = await make_person(server, "stolen")
    browser = await approved_on_socket(server, who.email, who.phone, remember_browser=True)
    thief = server.browser()
    thief.cookies.set("tapprove_trust", browser.cookies["tapprove_trust"])
    for _ in range(10):
        await attempt(server, who.email, WRONG)
    answers = [await attempt(server, who.email, WRONG, browser=thief) for _ in range(12)]
    codes = assert_refused(answers)
    assert codes.count(401) <= 10 and codes[-1] == 429, codes
    # Past that, the right password from the stolen cookie is refused as well.
    assert_limited(await attempt(server, who.email, PASSWORD, browser=thief))


async def test_parallel_guesses_do_not_slip_past_the_limit(
    server: LiveServer, make_person: MakePerson
) -> None:
    who = await make_person(server, "burst")
    answers = await asyncio.gather(*(attempt(server, who.email, WRONG) for _ in range(40)))
    codes = assert_refused(answers)
    assert codes.count(401) == 10 and codes.count(429) == 30, sorted(codes)


async def test_limits_are_shared_by_every_process(server_factory: ServerFactory) -> None:
    first, second = await server_factory(), await server_factory()
    email = unique_email("shared")
    await add_user(first, email)
    # Twenty guesses at once, half to each process: the budget is one, in Redis.
    answers = await asyncio.gather(
        *(attempt(first if i % 2 else second, email, WRONG) for i in range(20))
    )
    codes = assert_refused(answers)
    assert codes.count(401) == 10 and codes.count(429) == 10, sorted(codes)
    for server in (first, second):
        assert_limited(await attempt(server, email, PASSWORD))
