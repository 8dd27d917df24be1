"""/phone as an installable app that gets requests by Web Push, in headless Chromium against
a real server and the fake push service.

Headless Chromium here refuses `pushManager.subscribe()` (no push service to talk to), so
each test registers a subscription it made itself (keys held as a browser holds them)
through the API, with the page's own device credential. What the server sends arrives at
the fake push service, encrypted; the test decrypts it and hands the payload to the page's
real service worker with the DevTools call `ServiceWorker.deliverPushMessage`, which runs
its `push` handler exactly as a push from the network would. The notification it shows is
read through `registration.getNotifications()` (headless Chromium draws none on screen).
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
from typing import Any

import pytest
from playwright.async_api import BrowserContext, CDPSession, Page, expect

from tests.fakes import wait_until
from tests.fakes.webpush import BrowserSubscription, FakePushService
from tests.fixtures.app import LiveServer, ServerFactory
from tests.fixtures.browser import Browsers
from tests.integration.test_webpush import webpush_server

from .test_browser import enroll, enrollment_code, sign_in, waiting_number

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(180)]

WAIT = 30.0


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def phone_with_browser_phone(
    server: LiveServer, browsers: Browsers, email: str, name: str = "Pixel browser"
) -> Page:
    user_id = await server.add_user(email)
    phone = await browsers.person(server.url, "phone", phone=True)
    await enroll(phone, await enrollment_code(server, user_id), name)
    return phone


async def controlled(page: Page) -> str:
    """Wait until the service worker controls the page; its registration's scope."""
    await page.wait_for_function("navigator.serviceWorker.controller !== null")
    scope: str = await page.evaluate("navigator.serviceWorker.ready.then(r => r.scope)")
    return scope


DEVICE_TOKEN_JS = """() => new Promise((resolve, reject) => {
  const open = indexedDB.open("tapprove-phone", 1);
  open.onerror = () => reject(open.error);
  open.onsuccess = () => {
    const get = open.result.transaction("device").objectStore("device").get("current");
    get.onsuccess = () => resolve(get.result.deviceToken);
  };
})"""

NOTIFICATIONS_JS = """() => navigator.serviceWorker.getRegistration("/phone")
  .then(r => r.getNotifications())
  .then(list => list.map(n => ({
    title: n.title, body: n.body, tag: n.tag, data: n.data,
    actions: n.actions.map(a => ({action: a.action, title: a.title})),
  })))"""


class WorkerConsole:
    """The DevTools side of the phone's service worker: its registration id, and pushes."""

    def __init__(self, session: CDPSession, scope: str) -> None:
        self.session = session
        self.scope = scope
        self.registration_id: str | None = None

    @classmethod
    async def attach(cls, context: BrowserContext, page: Page, scope: str) -> WorkerConsole:
        session = await context.new_cdp_session(page)
        console = cls(session, scope)

        def updated(event: dict[str, Any]) -> None:
            for registration in event["registrations"]:
                if registration["scopeURL"] == scope and not registration["isDeleted"]:
                    console.registration_id = registration["registrationId"]

        session.on("ServiceWorker.workerRegistrationUpdated", updated)
        await session.send("ServiceWorker.enable")
        await wait_until(lambda: console.registration_id is not None, timeout=WAIT)
        return console

    async def push(self, origin: str, payload: dict[str, Any]) -> None:
        """Run the worker's `push` handler with `payload`, as a push from the network would."""
        await self.session.send(
            "ServiceWorker.deliverPushMessage",
            {"origin": origin, "registrationId": self.registration_id, "data": json.dumps(payload)},
        )


async def register_subscription(page: Page, fake: FakePushService) -> BrowserSubscription:
    """What "Turn on notifications" does after `subscribe()`, with a subscription the test
    made (the browser refuses to here), sent with the page's own device token."""
    key = (await (await page.request.get("/api/webpush/key")).json())["public_key"]
    subscription = fake.subscribe(key)
    token = await page.evaluate(DEVICE_TOKEN_JS)
    answer = await page.request.patch(
        "/api/devices/me",
        data={"push": {"provider": "webpush", "subscription": subscription.to_json()}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert answer.status == 200, await answer.text()
    return subscription


async def test_phone_is_installable_and_opens_offline(
    server_factory: ServerFactory, browsers: Browsers
) -> None:
    server = await server_factory()
    phone = await phone_with_browser_phone(server, browsers, "install@example.com")

    # The manifest the page links to: what browsers check before they offer to install.
    href = await phone.evaluate("document.querySelector('link[rel=manifest]').href")
    assert href == f"{server.url}/phone/manifest.webmanifest"
    answer = await phone.request.get(href)
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/manifest+json"
    manifest = await answer.json()
    assert manifest["display"] == "standalone"
    assert manifest["start_url"] == manifest["scope"] == "/phone"
    assert manifest["name"] and manifest["short_name"] and manifest["theme_color"]
    sizes: dict[tuple[str, str], tuple[int, int]] = {}
    for icon in manifest["icons"]:
        if icon["type"] != "image/png":
            continue
        image = await phone.request.get(icon["src"])
        assert image.status == 200 and image.headers["content-type"] == "image/png"
        sizes[(icon["sizes"], icon["purpose"])] = png_size(await image.body())
    assert sizes[("192x192", "any")] == (192, 192)
    assert sizes[("512x512", "any")] == (512, 512)
    assert sizes[("512x512", "maskable")] == (512, 512)

    # The service worker controls /phone itself (served from /phone/sw.js, allowed /phone).
    assert await controlled(phone) == f"{server.url}/phone"
    worker = await phone.request.get("/phone/sw.js")
    assert worker.headers["service-worker-allowed"] == "/phone"
    await expect(phone.get_by_test_id("push-card")).to_be_visible()
    await expect(phone.get_by_role("button", name="Turn on notifications")).to_be_visible()
    await browsers.shot(phone, "01-phone-online")

    # Offline: the installed app still opens (the cached shell) and says it is offline.
    await phone.context.set_offline(True)
    await phone.reload()
    await expect(phone.get_by_test_id("offline-notice")).to_be_visible()
    await expect(phone.get_by_role("heading", name="Pixel browser")).to_be_visible()
    await expect(phone.locator("#conn")).to_contain_text("Offline")
    await browsers.shot(phone, "02-phone-offline")
    await phone.context.set_offline(False)
    await expect(phone.locator("#conn")).to_have_text("Connected")
    await expect(phone.get_by_test_id("offline-notice")).to_be_hidden()


async def test_a_sign_in_reaches_the_closed_phone_by_web_push_and_is_approved_from_the_notification(
    server_factory: ServerFactory,
    webpush_env: dict[str, str],
    fake_push: FakePushService,
    browsers: Browsers,
) -> None:
    server = await webpush_server(server_factory, webpush_env)
    email = "push@example.com"
    phone = await phone_with_browser_phone(server, browsers, email)
    await phone.context.grant_permissions(["notifications"], origin=server.url)
    scope = await controlled(phone)
    worker = await WorkerConsole.attach(phone.context, phone, scope)
    await register_subscription(phone, fake_push)

    # The phone's page is closed (here: it went elsewhere; its socket is gone).
    await phone.goto("/static/icon.svg")
    await expect(phone.locator("svg")).to_be_attached()

    web = await browsers.person(server.url, "web")
    await sign_in(web, email)
    number = await waiting_number(web)
    await expect(web.get_by_test_id("channel-status")).to_contain_text("Notification sent")
    await browsers.shot(web, "01-waiting-notification-sent")

    # The push service got an encrypted push for this browser; the browser hands it on.
    await wait_until(lambda: len(fake_push.delivered()) == 1, timeout=WAIT)
    [push] = fake_push.delivered()
    assert push.payload is not None
    approval_id = push.payload["approval_id"]
    await worker.push(server.url, push.payload)

    notifications: list[dict[str, Any]] = []

    async def shown() -> bool:
        notifications[:] = await phone.evaluate(NOTIFICATIONS_JS)
        return bool(notifications)

    for _ in range(int(WAIT * 10)):
        if await shown():
            break
        await asyncio.sleep(0.1)
    [notification] = notifications
    assert notification["title"] == "Sign-in request"
    assert notification["tag"] == approval_id  # one request shows once
    assert notification["actions"] == [{"action": "review", "title": "Review"}]
    assert re.search(r"^Chrome \d+ on Linux$", notification["body"], re.M)
    assert "IP 127.0.0.1" in notification["body"]
    assert f"Sign-in to 127.0.0.1:{server.url.rsplit(':', 1)[1]}" in notification["body"]
    assert number not in notification["body"].replace("127.0.0.1", "")

    # Tapping it opens /phone on that request, where the number is entered as always.
    target = notification["data"]["url"]
    assert target == f"/phone?approval={approval_id}"
    await phone.goto(target)
    request = phone.locator(f"[data-approval-id='{approval_id}']")
    await expect(request).to_be_visible()
    await expect(request.get_by_label("Number")).to_be_focused()
    assert phone.url == f"{server.url}/phone"  # the id leaves the address bar
    await browsers.shot(phone, "02-phone-opened-from-notification")
    await request.get_by_label("Number").fill(number)
    await request.get_by_role("button", name="Approve").click()
    await expect(request.get_by_test_id("decision-result")).to_contain_text("Approved")
    await web.wait_for_url(f"{server.url}/account")
    await expect(web.get_by_test_id("account-email")).to_have_text(email)
    await browsers.shot(phone, "03-phone-approved")

    # The request ended, so its notification is gone.
    for _ in range(int(WAIT * 10)):
        if not await phone.evaluate(NOTIFICATIONS_JS):
            break
        await asyncio.sleep(0.1)
    assert await phone.evaluate(NOTIFICATIONS_JS) == []


async def test_an_answered_request_shows_no_notification(
    server_factory: ServerFactory,
    webpush_env: dict[str, str],
    fake_push: FakePushService,
    browsers: Browsers,
) -> None:
    server = await webpush_server(server_factory, webpush_env)
    phone = await phone_with_browser_phone(server, browsers, "late@example.com")
    await phone.context.grant_permissions(["notifications"], origin=server.url)
    worker = await WorkerConsole.attach(phone.context, phone, await controlled(phone))
    await register_subscription(phone, fake_push)
    await phone.goto("/static/icon.svg")

    web = await browsers.person(server.url, "web")
    await sign_in(web, "late@example.com")
    await waiting_number(web)
    await wait_until(lambda: len(fake_push.delivered()) == 1, timeout=WAIT)
    [stale] = fake_push.delivered()
    assert stale.payload is not None
    # It ends before its push arrives (here a newer sign-in replaces it; answered on another
    # phone is the same to this one): that push shows nothing, the newer one shows.
    web2 = await browsers.person(server.url, "web2")
    await sign_in(web2, "late@example.com")
    await waiting_number(web2)
    await wait_until(lambda: len(fake_push.delivered()) == 2, timeout=WAIT)
    fresh = fake_push.delivered()[1]
    assert fresh.payload is not None
    await worker.push(server.url, stale.payload)
    await worker.push(server.url, fresh.payload)
    shown: list[dict[str, Any]] = []
    for _ in range(int(WAIT * 10)):
        shown[:] = await phone.evaluate(NOTIFICATIONS_JS)
        if shown:
            break
        await asyncio.sleep(0.1)
    assert [n["tag"] for n in shown] == [fresh.payload["approval_id"]]


async def test_the_add_a_phone_panel_explains_install_with_a_qr_code_for_the_phone_page(
    server_factory: ServerFactory, browsers: Browsers
) -> None:
    server = await server_factory()
    email = "panel@example.com"
    await server.add_user(email)
    web = await browsers.person(server.url, "web")
    await sign_in(web, email)
    await web.wait_for_url(f"{server.url}/account")
    await web.get_by_role("button", name="Add a phone").click()
    await expect(web.get_by_test_id("enroll-qr")).to_be_visible()
    install = web.get_by_test_id("install-step")
    await expect(install).to_contain_text("Add to Home Screen")
    await expect(install).to_contain_text("notifications")
    await expect(install).to_contain_text("iPhone")
    await expect(web.get_by_test_id("enrollment")).to_be_in_viewport(ratio=0.99)
    await browsers.shot(web, "01-add-a-phone-install")
    code = await web.get_by_test_id("enroll-code").inner_text()

    # The QR code's link: the phone page with the code filled in, ready to enroll.
    phone = await browsers.person(server.url, "phone", phone=True)
    await phone.goto(f"/phone#enroll={code}")
    await expect(phone.get_by_label("Enrollment link or code")).to_have_value(code)
    await phone.get_by_role("button", name="Enroll").click()
    await expect(phone.locator("#conn")).to_have_text("Connected")
    await expect(phone.get_by_role("button", name="Turn on notifications")).to_be_visible()
    await browsers.shot(phone, "02-phone-enrolled-offers-notifications")
