"""What the server's own HTTP layer says, on servers started like `tapprove serve`: a request
the parser refuses gets 400 in the JSON error shape; the CSP lets pages open sockets only to
our own origin; `X-Forwarded-For` counts only from the proxies in TAPPROVE_TRUSTED_PROXIES.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pydantic
import pytest

from app.settings import Settings
from tests.fixtures.app import LiveServer
from tests.security.harness import add_user, device_view, unique_email
from tests.security.served import Start, parse_answer, production_servers, read_until_closed

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def start(
    tmp_path: Path, redis_url: str, redis_prefix: str, fresh_pg_url: str
) -> AsyncIterator[Start]:
    async with production_servers(tmp_path, redis_url, redis_prefix, fresh_pg_url) as start:
        yield start


# --- the parser's 400 -------------------------------------------------------------------------

MALFORMED_HEADS = [
    b"NOT AN HTTP REQUEST\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: tapprove\r\nA header without a colon\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: tapprove\r\nContent-Length: ten\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: tapprove\r\n\r\n",
    b"POST /api/register HTTP/1.1\r\nHost: tapprove\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


async def test_a_request_the_parser_refuses_gets_400_in_the_json_error_shape(
    start: Start,
) -> None:
    server = await start()
    port = int(server.url.rsplit(":", 1)[1])
    for head in MALFORMED_HEADS:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        answer = parse_answer(await read_until_closed(reader))
        writer.close()
        assert answer.status == 400, (head, answer)
        assert answer.headers["content-type"] == "application/json", (head, answer)
        assert answer.headers["connection"] == "close", (head, answer)
        body = answer.json()
        assert body["error"] == "bad_request", (head, body)
        assert isinstance(body["message"], str) and body["message"], (head, body)


# --- CSP ----------------------------------------------------------------------------------------


def _connect_src(csp: str) -> list[str]:
    for directive in csp.split(";"):
        name, *sources = directive.split()
        if name == "connect-src":
            return sources
    raise AssertionError(f"no connect-src in {csp!r}")


async def test_pages_may_open_sockets_only_to_their_own_origin(start: Start) -> None:
    plain = await start()
    behind_tls = await start(public_url="https://login.example.com")
    several = await start(allowed_origins="https://login.example.com,http://10.0.0.5:8000")
    seen = {}
    for server in (plain, behind_tls, several):
        page = await server.browser().get("/")
        assert page.status_code == 200
        seen[server.url] = _connect_src(page.headers["content-security-policy"])
    host = plain.url.removeprefix("http://")
    assert seen[plain.url] == ["'self'", f"ws://{host}"]
    assert seen[behind_tls.url] == ["'self'", "wss://login.example.com"]
    assert sorted(seen[several.url]) == sorted(["'self'", "wss://login.example.com", "ws://10.0.0.5:8000"])


# --- trusted proxies ----------------------------------------------------------------------------


async def _ip_the_phone_is_shown(server: LiveServer, forwarded_for: str) -> str:
    email = unique_email("forwarded")
    phone = await server.enroll_phone(await add_user(server, email))
    browser = server.browser()
    browser.headers["X-Forwarded-For"] = forwarded_for
    login = await server.login(browser, email)
    assert login.status_code == 202, login.text
    approval = await device_view(server, phone, login.json()["approval_id"])
    ip: str = approval["context"]["ip"]
    return ip


async def test_x_forwarded_for_is_ignored_unless_it_comes_from_a_trusted_proxy(
    start: Start,
) -> None:
    by_default = await start()
    assert await _ip_the_phone_is_shown(by_default, "203.0.113.7") == "127.0.0.1"
    elsewhere = await start(trusted_proxies="10.0.0.0/8, 192.0.2.1")
    assert await _ip_the_phone_is_shown(elsewhere, "203.0.113.7") == "127.0.0.1"
    behind_local_proxy = await start(trusted_proxies="127.0.0.1")
    assert await _ip_the_phone_is_shown(behind_local_proxy, "203.0.113.7") == "203.0.113.7"


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    assert Settings(trusted_proxies=" 10.0.0.0/8, ::1 ,192.0.2.1").proxies == [
        "10.0.0.0/8",
        "::1",
        "192.0.2.1",
    ]
    assert Settings().proxies == []
    for wrong in ("nginx", "*", "10.0.0.0/33"):
        with pytest.raises(pydantic.ValidationError, match="trusted_proxies"):
            Settings(trusted_proxies=wrong)
