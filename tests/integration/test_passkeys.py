"""Passkeys over HTTP against a real server, answered by a WebAuthn authenticator written in
Python (tests/fakes/authenticator.py): adding one, signing in with it without a password,
and every way an answer can be wrong. The same journeys run in Chromium with its virtual
authenticator in tests/e2e/test_factors_browser.py.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlmodel import select

from app.db.models import AuditEvent, Passkey, User
from tests.fakes.authenticator import SoftAuthenticator, b64url
from tests.fixtures.app import PASSWORD, LiveServer, ServerFactory
from tests.security.harness import Person, person

pytestmark = pytest.mark.timeout(120)


async def options_for_adding(session: httpx.AsyncClient) -> dict[str, Any]:
    answer = await session.post("/api/account/passkeys/options")
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()["publicKey"]
    return found


async def add_passkey(
    server: LiveServer, who: Person, name: str = "Laptop"
) -> tuple[SoftAuthenticator, dict[str, Any]]:
    """`who` adds a passkey from the account page (a session approved on the phone)."""
    authenticator = SoftAuthenticator(server.origin)
    credential = authenticator.create(await options_for_adding(who.session))
    added = await who.session.post(
        "/api/account/passkeys", json={"credential": credential, "name": name}
    )
    assert added.status_code == 201, added.text
    body: dict[str, Any] = added.json()
    return authenticator, body


async def sign_in_options(browser: httpx.AsyncClient) -> dict[str, Any]:
    answer = await browser.post("/api/login/passkey/options")
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()["publicKey"]
    return found


async def passkey_sign_in(
    server: LiveServer, authenticator: SoftAuthenticator, **answer: Any
) -> httpx.Response:
    browser = server.browser()
    credential = authenticator.get(await sign_in_options(browser), **answer)
    return await browser.post("/api/login/passkey", json={"credential": credential})


async def audit_details(server: LiveServer, user_id: str, kind: str) -> list[str]:
    async with server.services.db() as db:
        rows = await db.exec(
            select(AuditEvent.detail).where(AuditEvent.user_id == user_id, AuditEvent.kind == kind)
        )
        return list(rows.all())


async def test_options_ask_for_a_discoverable_user_verifying_es256_or_rs256_passkey(
    server: LiveServer,
) -> None:
    who = await person(server, "options")
    _, first = await add_passkey(server, who)

    options = await options_for_adding(who.session)

    assert options["rp"] == {"name": "tapprove", "id": "127.0.0.1"}
    assert options["user"]["id"] == b64url(who.user_id.encode())  # no email in the handle
    assert options["authenticatorSelection"]["residentKey"] == "required"
    assert options["authenticatorSelection"]["userVerification"] == "required"
    assert [p["alg"] for p in options["pubKeyCredParams"]] == [-7, -257]
    assert options["attestation"] == "none"
    async with server.services.db() as db:
        stored = await db.get(Passkey, first["id"])
    assert stored is not None
    assert [e["id"] for e in options["excludeCredentials"]] == [stored.credential_id]
    # The challenge lives a few minutes in Redis, under its hash only.
    pattern = f"{server.settings.redis_prefix}webauthn:*"
    keys = [k async for k in server.services.redis.scan_iter(pattern)]
    assert keys and all(options["challenge"] not in k for k in keys)
    assert 0 < await server.services.redis.ttl(keys[-1]) <= 300


async def test_a_passkey_signs_in_without_password_or_phone(server: LiveServer) -> None:
    who = await person(server, "passkey")
    authenticator, added = await add_passkey(server, who, "Work laptop")
    assert added["name"] == "Work laptop" and added["last_used_at"] is None

    signed_in = await passkey_sign_in(server, authenticator)

    assert (signed_in.status_code, signed_in.json()) == (200, {"status": "authenticated"})
    browser = server.browser(cookies=signed_in.cookies)
    account = (await browser.get("/api/account")).json()
    assert account["email"] == who.email and account["signed_in_with"] == "passkey"
    [listed] = account["passkeys"]
    assert listed["name"] == "Work laptop" and listed["last_used_at"] is not None
    assert await audit_details(server, who.user_id, "login.passkey")
    # As strong as the phone: it may add a device, a passkey, new recovery codes.
    assert (await browser.post("/api/devices/enrollments")).status_code == 201
    assert (await browser.post("/api/account/recovery-codes")).status_code == 201


async def test_an_answer_works_once_and_only_for_its_own_challenge(server: LiveServer) -> None:
    who = await person(server, "replay")
    authenticator, _ = await add_passkey(server, who)
    browser = server.browser()
    credential = authenticator.get(await sign_in_options(browser))
    first = await browser.post("/api/login/passkey", json={"credential": credential})
    assert first.status_code == 200, first.text

    replayed = await browser.post("/api/login/passkey", json={"credential": credential})

    assert replayed.status_code == 400 and replayed.json()["error"] == "passkey_refused"
    # A challenge the server never issued (or one that expired) is refused the same way.
    made_up = authenticator.get({"rpId": "127.0.0.1", "challenge": b64url(b"x" * 32)})
    forged = await browser.post("/api/login/passkey", json={"credential": made_up})
    assert forged.status_code == 400 and forged.json()["message"] == replayed.json()["message"]
    # A registration challenge does not sign in.
    registration = await options_for_adding(who.session)
    crossed = authenticator.get({"rpId": "127.0.0.1", "challenge": registration["challenge"]})
    wrong_kind = await browser.post("/api/login/passkey", json={"credential": crossed})
    assert wrong_kind.status_code == 400


async def test_an_answer_made_for_another_origin_is_refused(server: LiveServer) -> None:
    who = await person(server, "origin")
    authenticator, _ = await add_passkey(server, who)
    # A look-alike site relays our challenge and gets the person's authenticator to answer.
    phished = await passkey_sign_in(server, authenticator, origin="https://tapprove.evil.example")
    assert phished.status_code == 400 and phished.json()["error"] == "passkey_refused"
    assert "tapprove_session" not in phished.cookies
    # Nor can a passkey be added from there.
    elsewhere = SoftAuthenticator("https://tapprove.evil.example")
    credential = elsewhere.create(await options_for_adding(who.session))
    added = await who.session.post("/api/account/passkeys", json={"credential": credential})
    assert added.status_code == 400 and added.json()["error"] == "passkey_refused"


async def test_a_counter_that_goes_backwards_is_refused_and_audited(server: LiveServer) -> None:
    who = await person(server, "clone")
    authenticator, _ = await add_passkey(server, who)
    for _ in range(3):
        assert (await passkey_sign_in(server, authenticator)).status_code == 200
    clone = authenticator.credentials[0]
    clone.sign_count = 1  # a copy of the key, made when the counter was at 1

    refused = await passkey_sign_in(server, authenticator)

    assert refused.status_code == 400 and "counter" in refused.json()["message"]
    [detail] = await audit_details(server, who.user_id, "passkey.refused")
    assert '"reason":"counter_went_back"' in detail.replace(" ", "")
    assert '"stored":3' in detail.replace(" ", "") and '"presented":2' in detail.replace(" ", "")


async def test_a_second_account_cannot_use_or_touch_the_first_ones_passkey(
    server: LiveServer,
) -> None:
    ann = await person(server, "ann")
    bob = await person(server, "bob")
    authenticator, added = await add_passkey(server, ann)

    # Ann's credential cannot speak for Bob: the user handle must be the owner's.
    as_bob = await passkey_sign_in(server, authenticator, user_handle=bob.user_id.encode())
    assert as_bob.status_code == 400 and as_bob.json()["error"] == "passkey_refused"
    assert await audit_details(server, ann.user_id, "passkey.refused")
    # Bob cannot register Ann's credential as his, rename it or remove it.
    stolen = authenticator.create(
        await options_for_adding(bob.session), reuse=authenticator.credentials[0]
    )
    taken = await bob.session.post("/api/account/passkeys", json={"credential": stolen})
    assert taken.status_code == 409 and taken.json()["error"] == "passkey_exists", taken.text
    # Nor by naming it in the answer's id while the authenticator data holds another.
    renamed_id = authenticator.create(await options_for_adding(bob.session))
    renamed_id["id"] = renamed_id["rawId"] = stolen["id"]
    mismatch = await bob.session.post("/api/account/passkeys", json={"credential": renamed_id})
    assert mismatch.status_code == 400 and mismatch.json()["error"] == "passkey_refused"
    renamed = await bob.session.patch(f"/api/account/passkeys/{added['id']}", json={"name": "x"})
    removed = await bob.session.delete(f"/api/account/passkeys/{added['id']}")
    assert (renamed.status_code, removed.status_code) == (404, 404)
    bobs = (await bob.session.get("/api/account")).json()["passkeys"]
    assert bobs == []
    # And Ann's still signs Ann in.
    still = await passkey_sign_in(server, authenticator, credential=authenticator.credentials[0])
    assert still.status_code == 200


async def test_renamed_and_removed_passkeys(server: LiveServer) -> None:
    who = await person(server, "manage")
    authenticator, added = await add_passkey(server, who)
    renamed = await who.session.patch(
        f"/api/account/passkeys/{added['id']}", json={"name": "Old laptop"}
    )
    assert renamed.status_code == 200 and renamed.json()["name"] == "Old laptop"

    removed = await who.session.delete(f"/api/account/passkeys/{added['id']}")

    assert (removed.status_code, removed.json()) == (200, {"status": "removed"})
    refused = await passkey_sign_in(server, authenticator)
    assert refused.status_code == 400 and refused.json()["error"] == "passkey_refused"
    again = await who.session.delete(f"/api/account/passkeys/{added['id']}")
    assert again.status_code == 404


async def test_only_a_strong_sign_in_may_add_a_passkey(server: LiveServer) -> None:
    who = await person(server, "weak")
    for kind in ("restricted", "recovery", "trusted"):
        browser = server.browser()
        flags = {
            "restricted": {"restricted": True},
            "recovery": {"approved_with_recovery_code": True},
            "trusted": {},
        }[kind]
        token = await server.services.sessions.create(who.user_id, **flags)  # type: ignore[arg-type]
        browser.cookies.set("tapprove_session", token)
        refused = await browser.post("/api/account/passkeys/options")
        assert refused.status_code == 403 and refused.json()["error"] == "not_allowed", kind


async def test_a_locked_account_cannot_sign_in_with_its_passkey(server: LiveServer) -> None:
    who = await person(server, "locked")
    authenticator, _ = await add_passkey(server, who)
    async with server.services.db() as db:
        user = (await db.exec(select(User).where(User.id == who.user_id))).one()
        user.locked = True
        db.add(user)
        await db.commit()

    refused = await passkey_sign_in(server, authenticator)

    assert refused.status_code == 423 and refused.json()["error"] == "locked"


async def test_with_passkey_login_off_there_is_no_passkey_sign_in(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(passkey_login=False)
    who = await person(server, "off")
    options = await server.browser().post("/api/login/passkey/options")
    assert options.status_code == 403 and options.json()["error"] == "passkeys_disabled"
    adding = await who.session.post("/api/account/passkeys/options")
    assert adding.status_code == 403 and adding.json()["error"] == "passkeys_disabled"
    assert (await who.session.get("/api/account")).json()["passkeys_enabled"] is False


async def test_an_account_with_a_passkey_may_be_kept_from_the_phone(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(passkey_allows_push=False)
    with_passkey = await person(server, "strict")
    authenticator, _ = await add_passkey(server, with_passkey)
    without = await person(server, "lenient")

    refused = await server.login(server.browser(), with_passkey.email, PASSWORD)
    as_usual = await server.login(server.browser(), without.email, PASSWORD)

    assert refused.status_code == 403 and refused.json()["error"] == "passkey_required"
    assert as_usual.status_code == 202
    assert (await passkey_sign_in(server, authenticator)).status_code == 200
    wrong_password = await server.login(server.browser(), with_passkey.email, "wrong password")
    assert wrong_password.status_code == 401  # asked only after the right password
