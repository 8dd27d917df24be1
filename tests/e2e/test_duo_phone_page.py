"""A Duo integration's request on the /phone page, in headless Chromium against a real
server: the page names the integration, shows the request's own lines (`context.details`,
from pushinfo, type and display_username), and in phone-only confirmation asks for no
number: Approve sends the approval, Deny denies it, and the Duo client hears which."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from playwright.async_api import expect

from tests.fixtures.app import LiveServer, ServerFactory
from tests.fixtures.browser import Browsers
from tests.security.test_duo_hostile import Integration, duo_json, integration

from .test_browser import user_with_browser_phone

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(180)]

PUSHINFO = "Server+IP=192.0.2.2&Command=sudo+reboot%0Anow"


async def ask(duo: Integration, email: str) -> str:
    """An asynchronous Duo push, as login_duo or authentik sends it: its txid."""
    params = {
        "factor": "push", "username": email, "async": "1", "ipaddr": "198.51.100.7",
        "type": "SSH login", "display_username": "alice", "pushinfo": PUSHINFO,
    }  # fmt: skip
    started = duo_json(await duo.send(duo.v5("POST", "/auth/v2/auth", params)), 200)
    txid: str = started["response"]["txid"]
    return txid


async def status(duo: Integration, txid: str) -> dict[str, Any]:
    polled = await duo.send(duo.v5("GET", "/auth/v2/auth_status", {"txid": txid}))
    reply: dict[str, Any] = duo_json(polled, 200)["response"]
    return reply


@pytest.mark.parametrize("answer", ["Approve", "Deny"])
async def test_a_duo_request_shows_its_lines_and_asks_for_no_number(
    server_factory: ServerFactory, browsers: Browsers, answer: str
) -> None:
    server: LiveServer = await server_factory()
    email = f"duo-{answer.lower()}@example.com"
    phone = await user_with_browser_phone(server, browsers, email)
    duo = await integration(server, "ssh-servers")
    txid = await ask(duo, email)
    polling = asyncio.create_task(status(duo, txid))  # held until the phone answers

    request = phone.get_by_test_id("approval-request")
    await expect(request).to_have_count(1)
    heading = request.get_by_role("heading")
    await expect(heading).to_contain_text("Approve a request from ssh-servers-")
    await expect(request.get_by_test_id("request-ip")).to_have_text("198.51.100.7")
    labels = request.get_by_test_id("request-detail-label")
    values = request.get_by_test_id("request-detail")
    await expect(labels).to_have_text(["Request", "User", "Server IP", "Command"])
    # A newline in a value cannot start a line of its own: it arrives as U+FFFD.
    await expect(values).to_have_text(["SSH login", "alice", "192.0.2.2", "sudo reboot\ufffdnow"])
    # Phone-only confirmation: no number to type or pick, just the decision.
    await expect(request.get_by_label("Number")).to_have_count(0)
    await expect(request.get_by_role("group", name="Choices")).to_have_count(0)
    await expect(request.get_by_test_id("confirm-hint")).to_contain_text("shows no number")
    await expect(request.get_by_role("button", name="Approve")).to_be_focused()
    await browsers.shot(phone, f"01-duo-request-{answer.lower()}")

    await request.get_by_role("button", name=answer).click()
    if answer == "Approve":
        await expect(request.get_by_test_id("decision-result")).to_contain_text("Approved")
    reply = await asyncio.wait_for(polling, timeout=60)
    expected = "allow" if answer == "Approve" else "deny"
    assert (reply["result"], reply["status"]) == (expected, expected), reply
