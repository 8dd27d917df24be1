"""Secrets never reach the logs: a whole life (register, verify, sign in, enroll, approve over
the socket, complete, trusted sign-in, a relying party, sign out) runs with every logger at
DEBUG, and no password, token, code, cookie, challenge or JWS appears in what the server
logged, formatted the way production formats it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from app.core.signatures import device_public_jwk, sign_decision
from app.logs import ConsoleFormatter, JsonFormatter, RequestIdFilter
from tests.fixtures.app import ServerFactory
from tests.fixtures.mail import SmtpServer
from tests.security.harness import api_key, device_socket, next_frame

pytestmark = pytest.mark.timeout(120)

# Loggers of the test's own clients and fake servers, not of tapprove: the phone's websockets
# client, httpx, and the SMTP server that receives the mail (it logs what it receives).
NOT_THE_SERVER = ("httpx", "httpcore", "websockets.client", "mail.log", "aiosmtpd", "hpack")


class Capture(logging.Handler):
    """Every record, formatted both ways production can format it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.formats = [JsonFormatter(), ConsoleFormatter()]
        self.addFilter(RequestIdFilter())

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(NOT_THE_SERVER):
            return
        for formatter in self.formats:
            self.lines.append(formatter.format(record))


@pytest.fixture
def captured() -> Iterator[Capture]:
    capture = Capture()
    root = logging.getLogger()
    saved = (
        root.level,
        {
            n: logging.getLogger(n).level
            for n in ("uvicorn", "uvicorn.error", "sqlalchemy", "websockets")
        },
    )
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    yield capture
    root.removeHandler(capture)
    root.setLevel(saved[0])
    for name, level in saved[1].items():
        logging.getLogger(name).setLevel(level)


def _debug_everything() -> None:
    # uvicorn set its own loggers to WARNING when the server started; production turns its
    # access log off (it prints query strings), and so does this test.
    for name in ("uvicorn", "uvicorn.error", "websockets"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    logging.getLogger("uvicorn.access").disabled = True
    # SQLAlchemy keeps itself at WARNING whatever the root says; at INFO it logs every
    # statement (its parameters must stay hidden). Its DEBUG level dumps result rows, an
    # explicit "show me the data" mode that no secret-keeping can survive.
    logging.getLogger("sqlalchemy").setLevel(logging.INFO)


async def test_a_whole_flow_at_debug_logs_no_secret(
    server_factory: ServerFactory,
    smtp_server: SmtpServer,
    captured: Capture,
) -> None:
    server = await server_factory(smtp_url=smtp_server.url)
    _debug_everything()
    secrets: dict[str, str] = {}
    email = f"logs-{int(time.time())}@example.com"
    password = "Correct-Horse-7-Battery"
    secrets["password"] = password
    browser = server.browser()

    registered = await browser.post("/api/register", json={"email": email, "password": password})
    assert registered.status_code == 202, registered.text
    mail = (await smtp_server.wait_for(1))[0]
    token = re.search(r"token=([A-Za-z0-9_-]+)", mail.link()).group(1)  # type: ignore[union-attr]
    secrets["email token"] = token
    assert (await browser.get("/verify-email", params={"token": token})).status_code == 200
    assert (await browser.post("/api/verify-email", json={"token": token})).status_code == 200

    wrong = await browser.post("/api/login", json={"email": email, "password": "Wrong-pass-99"})
    assert wrong.status_code == 401
    secrets["wrong password"] = "Wrong-pass-99"
    first = await browser.post("/api/login", json={"email": email, "password": password})
    assert first.json() == {"status": "enrollment_required"}
    secrets["restricted session"] = browser.cookies["tapprove_session"]
    enrollment = await browser.post("/api/devices/enrollments")
    assert enrollment.status_code == 201, enrollment.text
    code = enrollment.json()["code"]
    secrets["enrollment code"] = code
    key = ec.generate_private_key(ec.SECP256R1())
    enrolled = await browser.post(
        "/api/devices",
        json={
            "code": code,
            "name": "Pixel",
            "platform": "android",
            "public_key": device_public_jwk(key.public_key()),
            "push": {"provider": "fcm", "token": "fcm-registration-token-abcdef0123456789"},
        },
    )
    assert enrolled.status_code == 201, enrolled.text
    device_id, device_token = enrolled.json()["device_id"], enrolled.json()["device_token"]
    secrets["device token"] = device_token
    secrets["push token"] = "fcm-registration-token-abcdef0123456789"

    from tests.fixtures.app import Phone

    phone = Phone(device_id, device_token, key)
    ws = await device_socket(server, phone)
    other = server.browser()
    started = await other.post(
        "/api/login", json={"email": email, "password": password, "remember_browser": True}
    )
    assert started.status_code == 202, started.text
    secrets["login cookie"] = other.cookies["tapprove_login"]
    request = await next_frame(ws, "approval_request")
    approval = request["approval"]
    secrets["challenge"] = approval["challenge"]
    await ws.send(json.dumps({"type": "ack", "id": approval["id"]}))
    bad = sign_decision(
        key,
        device_id,
        {
            "aid": approval["id"],
            "chl": approval["challenge"],
            "decision": "approve",
            "number": "xx",
            "iat": int(time.time()) - 1000,
        },
    )
    secrets["rejected JWS"] = bad
    await ws.send(json.dumps({"type": "decision", "jws": bad}))
    assert (await next_frame(ws, "error"))["error"] == "bad_signature"
    good = phone.sign(approval, number=started.json()["number"])
    secrets["JWS"] = good
    await ws.send(json.dumps({"type": "decision", "jws": good}))
    assert (await next_frame(ws, "decision_result"))["status"] == "approved"
    done = await other.post(f"/api/login/{started.json()['approval_id']}/complete")
    assert done.status_code == 200, done.text
    secrets["session cookie"] = other.cookies["tapprove_session"]
    secrets["trust cookie"] = other.cookies["tapprove_trust"]
    assert (await other.get("/api/account")).status_code == 200
    again = await other.post("/api/login", json={"email": email, "password": password})
    assert again.json() == {"status": "authenticated"}
    secrets["second session cookie"] = other.cookies["tapprove_session"]

    rp_key = await api_key(server)
    secrets["API key"] = rp_key
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {rp_key}"}
    ) as rp:
        created = await rp.post("/api/v1/approvals", json={"user": email})
        assert created.status_code == 201, created.text
        await next_frame(ws, "approval_request")
        await rp.get(f"/api/v1/approvals/{created.json()['approval_id']}")
    await other.post("/api/logout")
    await ws.close()

    logged = "\n".join(captured.lines)
    assert len(captured.lines) > 20, "nothing was captured: is logging wired?"
    leaks = {
        name: _context(logged, value)
        for name, value in secrets.items()
        if value in logged or json.dumps(value)[1:-1] in logged
    }
    assert not leaks, leaks


def _context(text: str, secret: str) -> Any:
    at = text.find(secret)
    if at < 0:
        secret = json.dumps(secret)[1:-1]
        at = text.find(secret)
    return text[max(0, at - 200) : at + len(secret) + 50]
