"""Every spelling of an address is the one account (SECURITY.md, "Stolen password"): case,
surrounding spaces and full-width letters (U+FF41 for `a` and so on: NFKC-equivalent to
the ASCII address) count against that account's 10-guess budget, sign in to it, and
cannot register a second account beside it.
"""

from __future__ import annotations

import secrets

import httpx
import pytest
from sqlmodel import col, select

from app.db.models import User
from tests.fixtures.app import PASSWORD, LiveServer
from tests.security.harness import CHROME, add_user, assert_error

pytestmark = pytest.mark.timeout(120)


def full_width(text: str) -> str:
    """ASCII letters and digits as their full-width forms (U+FF01..U+FF5E)."""
    return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in text)


def spellings(email: str) -> list[str]:
    local, domain = email.split("@")
    return [
        full_width(local) + "@" + domain,
        full_width(local.upper()) + "@" + domain,
        full_width(local) + "@" + full_width(domain),
        full_width(local[:3]) + local[3:] + "@" + domain,
        full_width(local) + "\uff20" + domain,  # the full-width at sign too
        email.upper(),
        f" {email} ",
    ]


async def test_full_width_spellings_spend_the_accounts_guess_budget(server: LiveServer) -> None:
    email = f"alice{secrets.token_hex(3)}@example.com"
    await add_user(server, email)
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Origin": server.origin, "User-Agent": CHROME}
    ) as browser:

        async def guess(spelling: str) -> httpx.Response:
            return await browser.post(
                "/api/login", json={"email": spelling, "password": "a wrong guess"}
            )

        variants = spellings(email)
        for attempt in range(10):
            answer = await guess(variants[attempt % len(variants)])
            assert_error(answer, 401, "invalid_credentials")
        # The budget is the account's, whichever spelling spent it.
        for spelling in [email, *variants]:
            assert_error(await guess(spelling), 429, "rate_limited")


async def test_a_full_width_spelling_is_the_same_account(server: LiveServer) -> None:
    email = f"bob{secrets.token_hex(3)}@example.com"
    user_id = await add_user(server, email)
    local, domain = email.split("@")
    wide = full_width(local) + "@" + domain
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Origin": server.origin, "User-Agent": CHROME}
    ) as browser:
        # The right password for the account, whatever the spelling (no phone yet: the
        # restricted session that may enroll one).
        signed_in = await browser.post("/api/login", json={"email": wide, "password": PASSWORD})
        assert signed_in.status_code == 200, signed_in.text
        account = await browser.get("/api/account")
        assert account.json()["email"] == email
        # Registering the spelling is registering the taken address: no second account.
        again = await browser.post("/api/register", json={"email": wide, "password": PASSWORD})
        assert again.status_code == 202, again.text
    async with server.services.db() as db:
        found = await db.exec(select(User).where(col(User.email).in_([email, wide, wide.lower()])))
        assert [user.id for user in found.all()] == [user_id]
