"""The other ways in, in headless Chromium against a real server: a phone with no network
(an offline passcode), a lost phone (a recovery code), and a passkey (Chromium's virtual
WebAuthn authenticator, through the DevTools protocol). Every step leaves a screenshot in
test-artifacts/screenshots/; the README shows some of them.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import httpx
import pytest
from playwright.async_api import CDPSession, Page, expect
from sqlmodel import select

from app.db.models import AuditEvent, User
from tests.e2e.test_browser import (
    approve_on,
    enroll,
    enrollment_code,
    fill_sign_in,
    sign_in,
    sign_out,
    start,
    user_with_browser_phone,
    waiting_number,
)
from tests.fixtures.app import LiveServer, ServerFactory, free_port
from tests.fixtures.browser import Browsers
from tests.fixtures.mail import SmtpServer

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(240)]

SIX_DIGITS = re.compile(r"^\d{3} \d{3}$")
CODE = re.compile(r"^[0-9a-z]{5}-[0-9a-z]{5}$")


async def signed_in_with_phone(
    server: LiveServer, browsers: Browsers, email: str
) -> tuple[Page, Page]:
    """A user whose phone is a /phone page, signed in on the account page (approved on it)."""
    phone = await user_with_browser_phone(server, browsers, email)
    web = await browsers.person(server.url, "web")
    await sign_in(web, email)
    await approve_on(phone, await waiting_number(web))
    await web.wait_for_url(f"{server.url}/account")
    return web, phone


async def audit_kinds(server: LiveServer, email: str) -> list[str]:
    await server.audit_filed()
    async with server.services.db() as db:
        user = (await db.exec(select(User).where(User.email == email))).one()
        rows = await db.exec(select(AuditEvent.kind).where(AuditEvent.user_id == user.id))
        return list(rows.all())


# --- no network on the phone: an offline passcode ----------------------------------------------


async def test_a_user_whose_phone_has_no_network_signs_in_with_a_passcode(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server)
    email = "offline@example.com"
    phone = await user_with_browser_phone(server, browsers, email)
    code = phone.get_by_test_id("passcode")
    await expect(code).to_have_text(SIX_DIGITS)
    expiry = phone.get_by_test_id("passcode-expiry")
    await expect(expiry).to_have_text(re.compile(r"^Changes in \d+ s$"))

    # The phone loses its network: the socket drops, the passcode keeps counting down.
    await phone.context.set_offline(True)
    await expect(phone.locator("#conn")).to_contain_text("Offline")
    before = await expiry.inner_text()
    await expect(expiry).not_to_have_text(before)
    await browsers.shot(phone, "01-phone-passcode-offline")

    web = await browsers.person(server.url, "web")
    await sign_in(web, email)
    await waiting_number(web)
    # Nothing reached the phone; the person reads the passcode off its screen instead.
    await expect(web.get_by_test_id("channel-status")).not_to_contain_text("delivered")
    await web.get_by_role("button", name="Use a passcode from your phone").click()
    await web.get_by_label("Passcode").fill(await code.inner_text())
    await browsers.shot(web, "02-waiting-passcode")
    await web.get_by_role("button", name="Verify passcode").click()

    await web.wait_for_url(f"{server.url}/account")
    await expect(web.get_by_test_id("account-email")).to_have_text(email)
    await expect(web.get_by_test_id("activity")).to_contain_text(
        "Approved with a passcode from your phone"
    )
    await browsers.shot(web, "03-account-after-passcode")


async def test_a_wrong_passcode_says_so_and_the_right_one_still_works(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server)
    email = "typo@example.com"
    phone = await user_with_browser_phone(server, browsers, email)
    web = await browsers.person(server.url, "web")
    await sign_in(web, email)
    await waiting_number(web)
    await web.get_by_role("button", name="Use a passcode from your phone").click()
    shown = (await phone.get_by_test_id("passcode").inner_text()).replace(" ", "")
    wrong = f"{(int(shown) + 500_000) % 1_000_000:06d}"

    await web.get_by_label("Passcode").fill(wrong)
    await web.get_by_role("button", name="Verify passcode").click()
    await expect(web.locator("#passcode-error")).to_have_text(
        "That passcode is not right. Check the code your phone shows now."
    )
    await browsers.shot(web, "01-wrong-passcode")
    await web.get_by_label("Passcode").fill(shown)
    await web.get_by_role("button", name="Verify passcode").click()
    await web.wait_for_url(f"{server.url}/account")


# --- a lost phone: a recovery code --------------------------------------------------------------


async def test_a_user_who_lost_the_phone_signs_in_with_a_recovery_code(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server)
    email = "lost@example.com"
    web, phone = await signed_in_with_phone(server, browsers, email)
    await expect(web.get_by_test_id("recovery-left")).to_have_text("You have no recovery codes.")
    await web.get_by_role("button", name="Make recovery codes").click()
    codes = web.get_by_test_id("recovery-code")
    await expect(codes).to_have_count(10)
    saved = [await c.inner_text() for c in await codes.all()]
    assert all(CODE.match(c) for c in saved), saved
    await expect(web.get_by_test_id("recovery-left")).to_have_text("10 of 10 codes left.")
    await web.get_by_test_id("recovery-codes").scroll_into_view_if_needed()
    await browsers.shot(web, "01-recovery-codes")
    await web.get_by_role("button", name="I saved them").click()
    await expect(web.get_by_test_id("recovery-codes")).to_be_hidden()
    await sign_out(web, server)
    await phone.close()  # the phone is lost

    await fill_sign_in(web, email)
    await web.get_by_role("button", name="Lost your phone? Use a recovery code").click()
    await web.get_by_label("Recovery code", exact=True).fill(saved[4].upper())
    await browsers.shot(web, "02-sign-in-with-recovery-code")
    await web.get_by_role("button", name="Sign in with recovery code").click()

    await web.wait_for_url(f"{server.url}/account")
    banner = web.get_by_test_id("recovery-banner")
    await expect(banner).to_contain_text("You signed in with a recovery code.")
    await expect(banner).to_contain_text("Revoke the phone you lost")
    await expect(web.get_by_test_id("recovery-left")).to_have_text("9 of 10 codes left.")
    await expect(web.get_by_role("button", name="Make new codes")).to_be_disabled()
    await browsers.shot(web, "03-account-after-recovery-code")
    await web.get_by_role("button", name="Revoke Test phone").click()
    await expect(web.get_by_test_id("device-row")).to_have_count(0)
    await expect(banner).to_contain_text("Add your new phone now")

    # The new phone joins with the code the account page gives.
    await web.get_by_role("button", name="Add a phone").click()
    uri = web.get_by_test_id("enroll-uri")
    await expect(uri).to_have_text(re.compile(r"^tapprove://enroll\?"))
    new_phone = await browsers.person(server.url, "new phone", phone=True)
    await enroll(new_phone, await uri.inner_text(), "New phone")
    await expect(web.get_by_test_id("device-row")).to_contain_text("New phone")
    await browsers.shot(web, "04-new-phone-added")
    mails = await smtp_server.wait_for(3, timeout=30)
    assert any(m.subject == "A recovery code was used to sign in to your account" for m in mails)
    # The code worked once.
    await sign_out(web, server)
    await fill_sign_in(web, email)
    await web.get_by_role("button", name="Lost your phone? Use a recovery code").click()
    await web.get_by_label("Recovery code", exact=True).fill(saved[4])
    await web.get_by_role("button", name="Sign in with recovery code").click()
    await expect(web.locator("#form-error")).to_have_text(
        "That recovery code is not right, or was already used."
    )


# --- passkeys, with Chromium's virtual authenticator ---------------------------------------------


async def virtual_authenticator(page: Page) -> tuple[CDPSession, str]:
    """A platform authenticator with resident keys and user verification, for this tab."""
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable")
    added = await cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "internal",
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": True,
                "automaticPresenceSimulation": True,
            }
        },
    )
    return cdp, added["authenticatorId"]


async def presence(cdp: CDPSession, authenticator: str, touched: bool) -> None:
    """Whether the virtual authenticator answers at once, as if the person touched it."""
    await cdp.send(
        "WebAuthn.setAutomaticPresenceSimulation",
        {"authenticatorId": authenticator, "enabled": touched},
    )


async def passkey_button_sign_in(
    web: Page,
    server: LiveServer,
    cdp: CDPSession,
    authenticator: str,
    *,
    shot: Browsers | None = None,
) -> None:
    """Sign out, then choose "Sign in with a passkey" on the login page.

    The page also offers passkeys in the email field's autofill (conditional mediation),
    which waits for the person to pick one: the authenticator answers no one until the person
    is "present". A request already waiting is not answered when presence comes back, so
    the button's request, made after, is the one that goes through.
    """
    await presence(cdp, authenticator, False)
    await sign_out(web, server)
    button = web.get_by_role("button", name="Sign in with a passkey")
    await expect(button).to_be_visible()
    if shot is not None:
        await shot.shot(web, "02-login-with-passkey-option")
    await presence(cdp, authenticator, True)
    await button.click()


async def add_passkey_on_account_page(web: Page, name: str) -> None:
    await web.get_by_label("Passkey name").fill(name)
    await web.get_by_role("button", name="Add a passkey").click()
    await expect(web.get_by_test_id("passkeys")).to_contain_text(name)


async def test_a_passkey_is_added_then_signs_in_without_a_password_and_is_removed(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server, host_name="localhost")
    email = "passkey@example.com"
    web, phone = await signed_in_with_phone(server, browsers, email)
    cdp, authenticator = await virtual_authenticator(web)

    await add_passkey_on_account_page(web, "Test laptop")
    row = web.get_by_test_id("passkey-row")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("never used yet")
    [credential] = (await cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator}))[
        "credentials"
    ]
    assert credential["isResidentCredential"] is True and credential["rpId"] == "localhost"
    await row.get_by_role("button", name="Rename Test laptop").click()
    await row.get_by_label("New name").fill("Work laptop")
    await row.get_by_role("button", name="Save").click()
    await expect(row).to_contain_text("Work laptop")
    await web.get_by_test_id("passkeys").scroll_into_view_if_needed()
    await browsers.shot(web, "01-account-passkey")
    mails = await smtp_server.wait_for(2, timeout=30)  # the device added, the passkey added
    assert [m.subject for m in mails if "passkey" in m.subject] == [
        "A passkey was added to your account"
    ]

    # Signed out, the passkey alone signs in: no password typed, nothing asked of the phone.
    await passkey_button_sign_in(web, server, cdp, authenticator, shot=browsers)
    await web.wait_for_url(f"{server.url}/account")
    await expect(web.get_by_test_id("account-email")).to_have_text(email)
    await expect(web.get_by_test_id("activity")).to_contain_text("Signed in with a passkey")
    await expect(row).not_to_contain_text("never used yet")
    await expect(phone.get_by_test_id("approval-request")).to_have_count(1)  # the first sign-in's
    await browsers.shot(web, "03-signed-in-with-passkey")

    # A copy of the key whose counter lags behind (a cloned authenticator) is refused.
    await cdp.send(
        "WebAuthn.removeCredential",
        {"authenticatorId": authenticator, "credentialId": credential["credentialId"]},
    )
    await cdp.send(
        "WebAuthn.addCredential",
        {"authenticatorId": authenticator, "credential": {**credential, "signCount": 0}},
    )
    await passkey_button_sign_in(web, server, cdp, authenticator)
    await expect(web.locator("#form-error")).to_contain_text("counter went backwards")
    assert "passkey.refused" in await audit_kinds(server, email)

    # Back in with the phone; the passkey is removed and signs in no more.
    await presence(cdp, authenticator, False)
    await fill_sign_in(web, email)
    await web.get_by_role("button", name="Sign in", exact=True).click()
    await approve_on(phone, await waiting_number(web))
    await web.wait_for_url(f"{server.url}/account")
    await web.get_by_role("button", name="Remove Work laptop").click()
    await expect(web.get_by_test_id("passkeys")).to_contain_text("No passkeys yet.")
    await passkey_button_sign_in(web, server, cdp, authenticator)
    await expect(web.locator("#form-error")).to_contain_text("not registered here")


async def test_a_second_account_cannot_use_the_first_ones_passkey(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server, host_name="localhost")
    ann, _ = await signed_in_with_phone(server, browsers, "ann@example.com")
    cdp, authenticator = await virtual_authenticator(ann)
    await add_passkey_on_account_page(ann, "Ann's laptop")
    ann_passkey = await ann.get_by_test_id("passkey-row").get_attribute("data-passkey-id")
    await presence(cdp, authenticator, False)  # the login page's autofill waits for a pick
    await sign_out(ann, server)

    # Bob signs in on the same computer, whose authenticator holds Ann's passkey.
    bob_id = await server.add_user("bob@example.com")
    bob_phone = await browsers.person(server.url, "bob phone", phone=True)
    await enroll(bob_phone, await enrollment_code(server, bob_id), "Bob phone")
    await sign_in(ann, "bob@example.com")
    await approve_on(bob_phone, await waiting_number(ann))
    await ann.wait_for_url(f"{server.url}/account")
    await expect(ann.get_by_test_id("passkeys")).to_contain_text("No passkeys yet.")
    # Ann's passkey is not Bob's to rename or remove.
    for method, body in (("PATCH", {"name": "mine now"}), ("DELETE", None)):
        status = await ann.evaluate(
            """async ([method, url, body]) => (await fetch(url, {
                method, headers: {"Content-Type": "application/json"},
                body: body ? JSON.stringify(body) : undefined})).status""",
            [method, f"/api/account/passkeys/{ann_passkey}", body],
        )
        assert status == 404, (method, status)
    # An answer from Ann's credential cannot sign in as Bob, whatever user handle it carries.
    async with httpx.AsyncClient(base_url=server.url, headers={"Origin": server.url}) as proxy:
        options = (await proxy.post("/api/login/passkey/options")).json()["publicKey"]
        await presence(cdp, authenticator, True)
        answer = await get_assertion(ann, options)
        answer["response"]["userHandle"] = b64url(bob_id.encode())
        as_bob = await proxy.post("/api/login/passkey", json={"credential": answer})
    assert as_bob.status_code == 400 and as_bob.json()["error"] == "passkey_refused"
    assert "tapprove_session" not in as_bob.cookies
    assert "passkey.refused" in await audit_kinds(server, "ann@example.com")


async def test_a_passkey_answer_from_a_page_on_another_origin_is_refused(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server, host_name="localhost")
    web, _ = await signed_in_with_phone(server, browsers, "phished@example.com")
    await virtual_authenticator(web)
    await add_passkey_on_account_page(web, "Laptop")

    # A look-alike page on another origin of the same host (so the browser lets it ask for
    # this site's passkeys) relays a challenge it fetched from the real server.
    evil = f"http://localhost:{free_port()}"
    await web.route(
        f"{evil}/**",
        lambda route: route.fulfill(
            content_type="text/html",
            body='<!doctype html><meta charset="utf-8"><title>Sign in</title><p>Sign in</p>',
        ),
    )
    await web.goto(f"{evil}/login")
    async with httpx.AsyncClient(base_url=server.url, headers={"Origin": server.url}) as proxy:
        options = (await proxy.post("/api/login/passkey/options")).json()["publicKey"]
        answer = await get_assertion(web, options)
        relayed = await proxy.post("/api/login/passkey", json={"credential": answer})

    assert relayed.status_code == 400 and relayed.json()["error"] == "passkey_refused"
    assert "tapprove_session" not in relayed.cookies
    client_data = answer["response"]["clientDataJSON"]
    assert evil in unb64url(client_data).decode()  # the browser named the page's origin


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


GET_ASSERTION = """async (options) => {
  const decode = (t) => Uint8Array.from(atob(t.replace(/-/g, "+").replace(/_/g, "/")
    .padEnd(Math.ceil(t.length / 4) * 4, "=")), (c) => c.charCodeAt(0));
  const encode = (b) => btoa(String.fromCharCode(...new Uint8Array(b)))
    .replace(/\\+/g, "-").replace(/\\//g, "_").replace(/=+$/, "");
  const credential = await navigator.credentials.get({publicKey: {
    challenge: decode(options.challenge), rpId: options.rpId,
    userVerification: options.userVerification, timeout: options.timeout}});
  const r = credential.response;
  return {id: credential.id, rawId: encode(credential.rawId), type: credential.type,
    response: {clientDataJSON: encode(r.clientDataJSON),
      authenticatorData: encode(r.authenticatorData), signature: encode(r.signature),
      userHandle: r.userHandle ? encode(r.userHandle) : null}};
}"""


async def get_assertion(page: Page, options: dict[str, Any]) -> dict[str, Any]:
    """What navigator.credentials.get() answers in `page` (whatever its origin)."""
    found: dict[str, Any] = await page.evaluate(GET_ASSERTION, options)
    return found

