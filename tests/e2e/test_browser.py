"""The pages in headless Chromium against a real server (real Redis, PostgreSQL and SMTP):
a person's browser and the in-browser phone (/phone) are separate contexts, as they would be
separate devices. Every step leaves a screenshot in test-artifacts/screenshots/.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest
from playwright.async_api import Page, expect

from app.db.accounts import create_api_key, create_enrollment_code
from tests.fixtures.app import PASSWORD, LiveServer, ServerFactory
from tests.fixtures.browser import Browsers
from tests.fixtures.mail import SmtpServer
from tests.integration.test_push_delivery import add_user_with_phone

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(180)]

TWO_DIGITS = re.compile(r"^\d{2}$")
PHONE_NUMBER = "+14155552671"


async def start(server_factory: ServerFactory, smtp: SmtpServer, **settings: object) -> LiveServer:
    """A server whose mail goes to the test SMTP server."""
    return await server_factory(smtp_url=smtp.url, **settings)


async def enrollment_code(server: LiveServer, user_id: str) -> str:
    """An enrollment code, as `tapprove device enroll-code` would print it."""
    async with server.services.db() as db:
        code, _ = await create_enrollment_code(db, user_id, now=time.time())
        await db.commit()
    return code


async def fill_sign_in(page: Page, email: str, *, remember: bool = False) -> None:
    await page.goto("/")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(PASSWORD)
    if remember:
        await page.get_by_label("Remember this browser").check()


async def sign_in(page: Page, email: str, *, remember: bool = False) -> None:
    await fill_sign_in(page, email, remember=remember)
    await page.get_by_role("button", name="Sign in").click()


async def sign_out(page: Page, server: LiveServer) -> None:
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url(f"{server.url}/")


async def enroll(phone: Page, link_or_code: str, name: str) -> None:
    """Enroll the /phone page and wait until its WebSocket is authenticated."""
    await phone.goto("/phone")
    await phone.get_by_label("Enrollment link or code").fill(link_or_code)
    await phone.get_by_label("Device name").fill(name)
    await phone.get_by_role("button", name="Enroll").click()
    await expect(phone.locator("#conn")).to_have_text("Connected")


async def waiting_number(page: Page) -> str:
    """The number the waiting view asks to enter on the phone."""
    number = page.get_by_test_id("match-number")
    await expect(number).to_have_text(TWO_DIGITS)
    return await number.inner_text()


async def user_with_browser_phone(
    server: LiveServer, browsers: Browsers, email: str, name: str = "Test phone"
) -> Page:
    """A verified user whose only device is a /phone page in a context of its own."""
    user_id = await server.add_user(email)
    phone = await browsers.person(server.url, "phone", phone=True)
    await enroll(phone, await enrollment_code(server, user_id), name)
    return phone


async def approve_on(phone: Page, number: str) -> None:
    request = phone.get_by_test_id("approval-request").first
    await request.get_by_label("Number").fill(number)
    await request.get_by_role("button", name="Approve").click()
    await expect(request.get_by_test_id("decision-result")).to_contain_text("Approved")


async def test_full_journey_from_registration_to_an_approved_sign_in(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server)
    email = "journey@example.com"
    web = await browsers.person(server.url, "web")

    await web.goto("/register")
    await web.get_by_label("Email").fill(email)
    await web.get_by_label("Password").fill(PASSWORD)
    await browsers.shot(web, "01-register")
    await web.get_by_role("button", name="Create account").click()
    await expect(web.get_by_role("heading", name="Check your inbox")).to_be_visible()
    await expect(web.get_by_text(email)).to_be_visible()
    await browsers.shot(web, "02-check-inbox")

    # The verification mail went through the outbox, the worker and a real SMTP server.
    [mail] = await smtp_server.wait_for(1, timeout=20)
    assert mail.recipients == [email]
    link = mail.link("/verify-email")
    assert link.startswith(f"{server.url}/verify-email?token=")
    await web.goto(link)
    await browsers.shot(web, "03-verify-email")
    await web.get_by_role("button", name="Confirm my email").click()
    await expect(web.get_by_role("heading", name="Email confirmed")).to_be_visible()
    await browsers.shot(web, "04-email-confirmed")

    # First sign-in: no phone yet, so straight to the account page to add one.
    await web.get_by_role("link", name="Sign in").click()
    await web.wait_for_url(f"{server.url}/")
    await sign_in(web, email)
    await web.wait_for_url(f"{server.url}/account")
    await expect(web.get_by_test_id("account-email")).to_have_text(email)
    await expect(web.get_by_test_id("restricted-banner")).to_be_visible()
    await web.get_by_role("button", name="Add a phone").click()
    uri = web.get_by_test_id("enroll-uri")
    await expect(uri).to_have_text(re.compile(r"^tapprove://enroll\?url=.+&code=.+"))
    await expect(web.get_by_test_id("enroll-qr")).to_be_visible()
    # It names what to open: the /phone page at its address, or the reference client.
    steps = web.get_by_test_id("enroll-steps")
    await expect(steps).not_to_contain_text("tapprove app")
    await expect(web.get_by_test_id("phone-page-link")).to_have_text(f"{server.url}/phone")
    await expect(web.get_by_test_id("stub-command")).to_have_text(
        f"python -m mobile_stub enroll '{await uri.inner_text()}' --state phone.json"
    )
    await expect(web.get_by_test_id("restricted-banner")).not_to_contain_text("tapprove app")
    await expect(web.get_by_test_id("enrollment")).to_be_in_viewport(ratio=0.99)
    await browsers.shot(web, "05-add-a-phone")

    # The in-browser phone, a second context (another device), enrolls with the link.
    phone = await browsers.person(server.url, "phone", phone=True)
    await enroll(phone, await uri.inner_text(), "Journey phone")
    await expect(phone.get_by_role("heading", name="Journey phone")).to_be_visible()
    await browsers.shot(phone, "06-phone-enrolled")
    # The account page notices the new device by itself.
    await expect(web.get_by_test_id("device-row")).to_have_count(1)
    await expect(web.get_by_test_id("device-row")).to_contain_text("Journey phone")
    await browsers.shot(web, "07-account-phone-added")

    # Sign out, sign in again: this time the phone has to approve.
    await sign_out(web, server)
    await fill_sign_in(web, email)
    await browsers.shot(web, "08-login")
    await web.get_by_role("button", name="Sign in").click()
    number = await waiting_number(web)
    await expect(web.get_by_test_id("channel-status")).to_contain_text("delivered")
    await browsers.shot(web, "09-waiting-with-number")

    request = phone.get_by_test_id("approval-request")
    await expect(request).to_have_count(1)
    await expect(request.get_by_test_id("request-browser")).not_to_have_text("")
    await request.get_by_label("Number").fill(number)
    await browsers.shot(phone, "10-phone-request")
    await request.get_by_role("button", name="Approve").click()

    # The login page finishes by itself and lands on the account page.
    await web.wait_for_url(f"{server.url}/account")
    await expect(request.get_by_test_id("decision-result")).to_contain_text("Approved")
    await browsers.shot(phone, "11-phone-approved")
    await expect(web.get_by_test_id("account-email")).to_have_text(email)
    await expect(web.get_by_test_id("restricted-banner")).to_be_hidden()
    rows = web.get_by_test_id("device-row")
    await expect(rows).to_have_count(1)
    await expect(rows).to_contain_text("Journey phone")
    await expect(web.get_by_role("button", name="Revoke Journey phone")).to_be_enabled()
    await expect(web.get_by_test_id("activity")).to_contain_text("Signed in")
    await browsers.shot(web, "12-account")
    await browsers.shot(web, "12-account-full", full_page=True)


async def test_a_denied_request_ends_with_a_plain_message_and_try_again(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server)
    phone = await user_with_browser_phone(server, browsers, "deny@example.com")
    web = await browsers.person(server.url, "web")

    await sign_in(web, "deny@example.com")
    await waiting_number(web)
    request = phone.get_by_test_id("approval-request")
    await expect(request.get_by_label("Number")).to_be_visible()
    await browsers.shot(phone, "01-phone-request")
    await request.get_by_role("button", name="Deny").click()

    await expect(web.get_by_role("heading", name="Sign-in denied")).to_be_visible()
    await expect(web.get_by_text("The request was denied on your phone.")).to_be_visible()
    await expect(request.get_by_test_id("decision-result")).to_contain_text("Denied")
    await browsers.shot(web, "02-denied")
    await browsers.shot(phone, "03-phone-denied")

    await web.get_by_role("button", name="Try again").click()
    await expect(web.get_by_role("button", name="Sign in")).to_be_visible()
    await expect(web.get_by_label("Email")).to_have_value("deny@example.com")
    await expect(web.get_by_label("Password")).to_have_value("")
    await browsers.shot(web, "04-try-again")


async def test_an_unanswered_request_expires_with_a_plain_message_and_try_again(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server, approval_ttl=5)
    phone = await user_with_browser_phone(server, browsers, "expire@example.com")
    web = await browsers.person(server.url, "web")

    await sign_in(web, "expire@example.com")
    await waiting_number(web)
    await expect(phone.get_by_test_id("approval-request")).to_have_count(1)
    await browsers.shot(web, "01-waiting")

    # Nobody answers: both sides say it expired (the approval lives 5 s).
    await expect(web.get_by_role("heading", name="Request expired")).to_be_visible()
    await expect(web.get_by_text("The request wasn't answered in time.")).to_be_visible()
    await expect(phone.get_by_test_id("decision-result")).to_contain_text("expired")
    await expect(phone.get_by_label("Number")).to_have_count(0)
    await browsers.shot(web, "02-expired")
    await browsers.shot(phone, "03-phone-expired")

    await web.get_by_role("button", name="Try again").click()
    await expect(web.get_by_role("button", name="Sign in")).to_be_visible()
    await browsers.shot(web, "04-try-again")


async def test_a_remembered_browser_skips_approval_until_it_is_revoked(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server)
    email = "remember@example.com"
    phone = await user_with_browser_phone(server, browsers, email)
    web = await browsers.person(server.url, "web")

    await sign_in(web, email, remember=True)
    await approve_on(phone, await waiting_number(web))
    await web.wait_for_url(f"{server.url}/account")
    trusted = web.get_by_test_id("trusted-browser-row")
    await expect(trusted).to_have_count(1)
    await expect(trusted).to_contain_text("This browser")
    await browsers.shot(web, "01-account-trusted", full_page=True)

    # Next sign-in from this browser: no approval request, straight to the account page.
    await sign_out(web, server)
    await sign_in(web, email)
    await web.wait_for_url(f"{server.url}/account")
    await expect(web.get_by_test_id("activity")).to_contain_text("Signed in from a trusted browser")
    await expect(phone.get_by_test_id("approval-request")).to_have_count(1)  # the first one only
    await browsers.shot(web, "02-signed-in-without-phone")

    # Revoke the trusted browser: the phone is asked again.
    await trusted.get_by_role("button", name=re.compile(r"^Revoke ")).click()
    await expect(trusted).to_have_count(0)
    await expect(web.get_by_test_id("trusted-browsers")).to_contain_text("No trusted browsers")
    await browsers.shot(web, "03-trusted-browser-revoked", full_page=True)

    await sign_out(web, server)
    await sign_in(web, email)
    await waiting_number(web)
    requests = phone.get_by_test_id("approval-request")
    await expect(requests).to_have_count(2)
    await expect(requests.first.get_by_label("Number")).to_be_visible()
    await browsers.shot(web, "04-approval-again")


async def test_a_device_revoked_on_the_account_page_learns_it_was_revoked(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server)
    email = "revoke@example.com"
    phone = await user_with_browser_phone(server, browsers, email, "Old tablet")
    web = await browsers.person(server.url, "web")

    await sign_in(web, email)
    await approve_on(phone, await waiting_number(web))
    await web.wait_for_url(f"{server.url}/account")
    await expect(web.get_by_test_id("device-row")).to_contain_text("Old tablet")
    await browsers.shot(web, "01-account")

    await web.get_by_role("button", name="Revoke Old tablet").click()
    await expect(web.get_by_test_id("device-row")).to_have_count(0)
    await expect(web.get_by_text("Old tablet was revoked.")).to_be_visible()
    await browsers.shot(web, "02-account-revoked")

    await expect(phone.get_by_role("heading", name="This device was revoked")).to_be_visible()
    await expect(phone.locator("#conn")).to_have_text("Revoked")
    await browsers.shot(phone, "03-phone-revoked")


async def test_a_relying_partys_request_on_the_phone_names_the_relying_party(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server)
    phone = await user_with_browser_phone(server, browsers, "rp@example.com")
    async with server.services.db() as db:
        _, api_key = await create_api_key(db, "Staging VPN", now=time.time())
        await db.commit()
    async with httpx.AsyncClient(
        base_url=server.url,
        headers={"Authorization": f"Bearer {api_key}", "User-Agent": "curl/7.88.1"},
    ) as rp:
        created = await rp.post(
            "/api/v1/approvals", json={"user": "rp@example.com", "context": {"ip": "198.51.100.4"}}
        )
        assert created.status_code == 201, created.text
        number = created.json()["number"]

        request = phone.get_by_test_id("approval-request")
        await expect(request).to_have_count(1)
        await expect(request.get_by_role("heading")).to_have_text(
            "Approve a request from Staging VPN?"
        )
        await expect(request.get_by_test_id("request-requester")).to_have_text("Staging VPN")
        await expect(request.get_by_test_id("request-ip")).to_have_text("198.51.100.4")
        # Nothing calls the relying party's HTTP client a browser, or asks for a browser's number.
        await expect(request.get_by_test_id("request-browser")).to_have_count(0)
        await expect(request).not_to_contain_text("Browser")
        await expect(request).not_to_contain_text("browser")
        await expect(request).to_contain_text("Type the 2-digit number Staging VPN shows")
        await browsers.shot(phone, "01-phone-rp-request")

        await request.get_by_label("Number").fill(number)
        await request.get_by_role("button", name="Approve").click()
        await expect(request.get_by_test_id("decision-result")).to_contain_text("Approved")
        answer = await rp.get(f"/api/v1/approvals/{created.json()['approval_id']}?wait=20")
    assert (answer.json()["status"], answer.json()["reason"]) == ("approved", "device")


async def test_a_sign_in_replaced_by_a_newer_one_says_so_in_the_browser_and_on_the_phone(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server)
    email = "twice@example.com"
    phone = await user_with_browser_phone(server, browsers, email)
    first = await browsers.person(server.url, "first")
    second = await browsers.person(server.url, "second")

    await sign_in(first, email)
    await waiting_number(first)
    await expect(phone.get_by_test_id("approval-request")).to_have_count(1)
    await sign_in(second, email)
    await waiting_number(second)

    await expect(first.get_by_role("heading", name="Replaced by a newer sign-in")).to_be_visible()
    await browsers.shot(first, "01-replaced")
    requests = phone.get_by_test_id("approval-request")
    await expect(requests).to_have_count(2)
    await expect(requests.nth(1).get_by_test_id("decision-result")).to_have_text(
        "Replaced by a newer request."
    )
    await browsers.shot(phone, "02-phone-replaced", full_page=True)


async def test_sms_codes_show_off_until_a_phone_number_is_verified(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server)
    for email, number in (("nonumber@example.com", None), ("number@example.com", PHONE_NUMBER)):
        if number is None:
            phone = await user_with_browser_phone(server, browsers, email)
        else:
            user_id = await add_user_with_phone(server, email, number)
            phone = await browsers.person(server.url, "phone", phone=True)
            await enroll(phone, await enrollment_code(server, user_id), "Test phone")
        web = await browsers.person(server.url, "web")
        await sign_in(web, email)
        await approve_on(phone, await waiting_number(web))
        await web.wait_for_url(f"{server.url}/account")
        toggle = web.get_by_role("switch", name="Allow SMS codes")
        if number is None:
            # The account's setting is on (the default), but no code can be sent: shown off.
            await expect(toggle).not_to_be_checked()
            await expect(toggle).to_be_disabled()
            await expect(web.locator("#sms-fallback-hint")).to_have_text(
                "Available once you add and verify a phone number above."
            )
            await browsers.shot(web, "01-no-number", full_page=True)
        else:
            await expect(toggle).to_be_checked()
            await expect(toggle).to_be_enabled()
            await toggle.click()
            await expect(toggle).not_to_be_checked()
            await expect(web.get_by_text("SMS codes are turned off.")).to_be_visible()
            await browsers.shot(web, "02-verified-number", full_page=True)


async def test_a_restricted_accounts_note_keeps_its_distance_from_the_phone_form(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server)
    await server.add_user("restricted@example.com")
    web = await browsers.person(server.url, "web")
    await sign_in(web, "restricted@example.com")  # no phone yet: a restricted session
    await web.wait_for_url(f"{server.url}/account")
    note = web.get_by_test_id("restricted-note")
    await expect(note).to_have_text("Available after you sign in with your phone.")
    label = web.get_by_text("Phone number", exact=True)
    note_box, label_box = await note.bounding_box(), await label.bounding_box()
    assert note_box is not None and label_box is not None
    gap = label_box["y"] - (note_box["y"] + note_box["height"])
    assert gap >= 12, f"only {gap:.1f} px between the note and the label under it"
    await browsers.shot(web, "01-restricted-account", full_page=True)


async def test_a_heading_focused_by_script_has_no_focus_ring_but_keyboard_focus_does(
    server_factory: ServerFactory, smtp_server: SmtpServer, browsers: Browsers
) -> None:
    server = await start(server_factory, smtp_server)
    page = await browsers.person(server.url, "phone", phone=True)
    await page.goto("/phone")
    await expect(page.get_by_label("Enrollment link or code")).to_be_focused()
    # The keyboard moves focus on: the next control shows the ring.
    await page.keyboard.press("Tab")
    await expect(page.get_by_label("Device name")).to_be_focused()
    assert await outline(page) == ("solid", "3px")
    # A script moves focus to a heading (as the pages do when a view changes): no ring there,
    # even right after a keyboard interaction.
    heading = page.get_by_role("heading", name="Use this browser as your phone")
    await heading.evaluate("element => element.focus()")
    await expect(heading).to_be_focused()
    assert (await outline(page))[0] == "none"

    # The sign-in page, used by keyboard: Enter signs in and the page focuses its waiting view.
    phone = await user_with_browser_phone(server, browsers, "focus@example.com")
    web = await browsers.person(server.url, "web")
    await fill_sign_in(web, "focus@example.com")
    await web.get_by_label("Password").press("Enter")
    await waiting_number(web)
    waiting = web.get_by_role("heading", name="Approval request sent to your phone")
    await expect(waiting).to_be_focused()
    assert (await outline(web))[0] == "none"
    await browsers.shot(web, "01-waiting-heading-focused")
    await expect(phone.get_by_test_id("approval-request")).to_have_count(1)


async def outline(page: Page) -> tuple[str, str]:
    """The computed outline style and width of the focused element."""
    found: list[str] = await page.evaluate(
        """() => {
            const style = getComputedStyle(document.activeElement);
            return [style.outlineStyle, style.outlineWidth];
        }"""
    )
    return found[0], found[1]
