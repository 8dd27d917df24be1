"""A relying party's `context` cannot forge lines on the phone: the server refuses control
characters in it (422 naming the field), and the reference phone strips them from every
context field it prints, whatever the server sends.
"""

from __future__ import annotations

import time

import httpx
import pytest
from playwright.async_api import expect

from app.db.accounts import create_enrollment_code
from mobile_stub.cli import Output, event_printer
from tests.fixtures.app import LiveServer
from tests.fixtures.browser import Browsers
from tests.security.harness import (
    add_user,
    api_key,
    assert_error,
    device_view,
    forget_fatigue,
    unique_email,
)

# The report's attack: end the browser line, print a fake IP, then move the cursor up and
# erase the line that holds the real one.
FORGED_IP = "Firefox\n  IP:       10.0.0.1 (your office)\x1b[1B\x1b[2K\x1b[1A"
CONTROLS = [
    "a\nb",
    "a\rb",
    "a\tb",
    "\x1b[31mred",
    "a\x7fb",
    "\x9b2K",  # the one-byte C1 CSI
    "gnp.exe\u202e",  # a bidi override reorders the line
    "a\u2028b",  # a line separator
]
FIELDS = ["ip", "user_agent", "browser", "os"]


async def test_control_characters_in_any_context_field_are_refused(server: LiveServer) -> None:
    email = unique_email("rp-context")
    await add_user(server, email)
    key = {"Authorization": f"Bearer {await api_key(server)}"}
    async with httpx.AsyncClient(base_url=server.url, headers=key) as rp:
        for field in FIELDS:
            for text in [FORGED_IP, *CONTROLS]:
                answer = await rp.post(
                    "/api/v1/approvals", json={"user": email, "context": {field: text}}
                )
                body = assert_error(answer, 422, "invalid_request")
                assert body["message"].startswith(f"context.{field}:"), (text, body)
        # Printable text, non-ASCII included, still goes through as it was sent.
        context = {"ip": "2001:db8::1", "user_agent": "OpenSSH_9.6 ünïcode", "browser": "ssh ✓"}
        created = await rp.post("/api/v1/approvals", json={"user": email, "context": context})
    assert created.status_code == 201, created.text


async def test_a_clean_context_reaches_the_phone_unchanged(server: LiveServer) -> None:
    email = unique_email("rp-clean")
    user_id = await add_user(server, email)
    phone = await server.enroll_phone(user_id)
    await forget_fatigue(server, user_id)
    context = {"ip": "203.0.113.9", "user_agent": "OpenSSH_9.6", "browser": "ssh ✓", "os": "Linux"}
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {await api_key(server)}"}
    ) as rp:
        created = await rp.post("/api/v1/approvals", json={"user": email, "context": context})
    assert created.status_code == 201, created.text
    shown = await device_view(server, phone, created.json()["approval_id"])
    assert shown["context"] == context


@pytest.mark.browser
@pytest.mark.slow
async def test_the_phone_page_shows_markup_in_a_context_as_text(
    server: LiveServer, browsers: Browsers
) -> None:
    """Printable but hostile: HTML in a context field is text on /phone, never markup."""
    email = unique_email("rp-markup")
    user_id = await add_user(server, email)
    async with server.services.db() as db:
        code, _ = await create_enrollment_code(db, user_id, now=time.time())
        await db.commit()
    phone = await browsers.person(server.url, "phone", phone=True)
    await phone.goto("/phone")
    await phone.get_by_label("Enrollment link or code").fill(code)
    await phone.get_by_label("Device name").fill("Markup test")
    await phone.get_by_role("button", name="Enroll").click()
    await expect(phone.locator("#conn")).to_have_text("Connected")

    markup = '<img src=x onerror="window.owned=1"><b id=injected>bold</b>'
    context = {"browser": markup, "os": markup, "ip": "192.0.2.1", "user_agent": markup}
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {await api_key(server)}"}
    ) as rp:
        created = await rp.post("/api/v1/approvals", json={"user": email, "context": context})
    assert created.status_code == 201, created.text
    request = phone.get_by_test_id("approval-request").first
    await expect(request).to_contain_text(markup)
    assert await request.locator("img, #injected").count() == 0
    assert await phone.evaluate("window.owned") is None


def _printed(approval_context: dict[str, str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    approval = {
        "id": "a1",
        "status": "pending",
        "expires_at": "2099-01-01T00:00:00Z",
        "context": approval_context,
        "match": {"mode": "typed", "digits": 2},
    }
    show = event_printer(Output(as_json=False), clock=time.time)
    show({"event": "approval_request", "id": "a1", "approval": approval})
    lines: list[str] = capsys.readouterr().out.splitlines()
    return lines


def test_the_reference_phone_prints_no_control_character_of_any_context_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clean = _printed({"ip": "198.51.100.7", "browser": "Firefox", "os": "Linux"}, capsys)
    hostile = _printed(
        {
            "ip": "198.51.100.7\x1b[2K\u202e",
            "browser": FORGED_IP,
            "os": "Linux\r\x9b1A\u2028\ud800",
            "user_agent": "\x1b]0;owned\x07",
        },
        capsys,
    )
    assert len(hostile) == len(clean), hostile  # no line added, none hidden
    ip_lines = [line for line in hostile if line.lstrip().startswith("IP:")]
    assert ip_lines == ["  IP:       198.51.100.7[2K"], hostile
    for line in hostile:
        assert line.isprintable(), line
    assert "Firefox  IP:       10.0.0.1 (your office)[1B[2K[1A" in hostile[1], hostile
