"""No account enumeration (PROTOCOL §1, §2): an unknown address and a wrong password get the
same answer, byte for byte, in the same time; what is special about an account (unverified,
locked) shows only after the right password.
"""

from __future__ import annotations

import time

import httpx
import pytest

from app.db.accounts import create_user, set_locked
from tests.fixtures.app import PASSWORD, LiveServer
from tests.fixtures.hashing import Argon2Work, todays_parameters
from tests.security.harness import add_user, clear_limits, unique_email

pytestmark = pytest.mark.timeout(120)

# Headers that differ between any two responses.
VARYING = {"date", "x-request-id"}


def fingerprint(response: httpx.Response) -> tuple[int, bytes, tuple[tuple[str, str], ...]]:
    headers = tuple(
        sorted((k.lower(), v) for k, v in response.headers.items() if k.lower() not in VARYING)
    )
    return response.status_code, response.content, headers


async def test_unknown_addresses_and_wrong_passwords_get_identical_answers(
    server: LiveServer,
) -> None:
    known = unique_email("known")
    await add_user(server, known)
    unverified = unique_email("unverified")
    await add_user(server, unverified, verified=False)
    locked = unique_email("locked")
    await add_user(server, locked)
    async with server.services.db() as db:
        await set_locked(db, locked, True)
        await db.commit()

    async def sign_in(email: str, password: str) -> httpx.Response:
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Origin": server.origin}
        ) as client:
            return await client.post("/api/login", json={"email": email, "password": password})

    wrong = [
        await sign_in(email, "wrong password")
        for email in (
            unique_email("nobody"),
            known,
            unverified,
            locked,
            known.upper(),
            "not even an address",
        )
    ]
    first = fingerprint(wrong[0])
    assert first[0] == 401
    for response in wrong[1:]:
        assert fingerprint(response) == first
    for response in wrong:
        assert "set-cookie" not in response.headers
    # Only the right password tells what is special about the account.
    assert (await sign_in(unverified, PASSWORD)).json()["error"] == "email_not_verified"
    assert (await sign_in(locked, PASSWORD)).json()["error"] == "locked"


async def test_registering_a_taken_address_looks_like_a_new_one(server: LiveServer) -> None:
    taken = unique_email("taken")
    await add_user(server, taken)
    answers = []
    async with httpx.AsyncClient(base_url=server.url) as client:
        for email in (unique_email("new"), taken, taken.upper()):
            answers.append(
                await client.post("/api/register", json={"email": email, "password": PASSWORD})
            )
            # A clean slate on purpose: the three answers compare the account's states, not
            # how far one IP got into its budgets (the limits have tests of their own).
            await clear_limits(server)
        for email in (unique_email("new"), taken):
            answers.append(await client.post("/api/verify-email/resend", json={"email": email}))
    assert len({fingerprint(a) for a in answers[:3]}) == 1
    assert answers[0].status_code == 202
    assert fingerprint(answers[3]) == fingerprint(answers[4])


async def test_an_unknown_address_costs_the_same_argon2_work_as_a_wrong_password(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same time, shown structurally: every failed sign-in, known address or not, does
    exactly one argon2 verification at today's full cost (unknown addresses against the
    server's dummy hash). Wall times are measured by `python -m bench.enumeration`: compared
    here they flaked on a loaded machine."""
    known = unique_email("timed")
    unverified = unique_email("unverified")
    locked = unique_email("locked")
    async with server.services.db() as db:
        # Real-cost hashes (not the cheap test one): their cost is what is being compared.
        for email in (known, unverified, locked):
            await create_user(
                db, email, password=PASSWORD, verified=email != unverified, now=time.time()
            )
        await set_locked(db, locked, True)
        await db.commit()
    work = Argon2Work(monkeypatch)
    one_verification = [("verify", todays_parameters())]
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Origin": server.origin}, timeout=60
    ) as client:
        for email in (
            unique_email("nobody"),
            known,
            unverified,
            locked,
            known.upper(),
            "not even an address",
        ):
            response = await client.post(
                "/api/login", json={"email": email, "password": "wrong password"}
            )
            assert response.status_code == 401, response.text
            assert work.take() == one_verification, email
        # The right password costs the same one verification (and only then tells more).
        right = await client.post("/api/login", json={"email": unverified, "password": PASSWORD})
        assert right.json()["error"] == "email_not_verified"
        assert work.take() == one_verification
