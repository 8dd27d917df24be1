"""Half-sent requests do not hold sockets: a request's head must arrive within
`TAPPROVE_REQUEST_HEAD_TIMEOUT` of its first byte (or of the connection's start) and its body
within `TAPPROVE_REQUEST_BODY_TIMEOUT`; a late request gets 408 `request_timeout` when an
answer can still be sent, and the connection is closed. Phone sockets and requests the app is
working on are never cut.

The server runs with the options `tapprove serve` uses and deadlines of a second, so no test
waits long; each waits for the server to close the socket, with a generous limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.app import LiveServer
from tests.security.harness import add_user, api_key, device_socket, next_frame, unique_email
from tests.security.served import RawAnswer, parse_answer, production_servers
from tests.security.served import read_until_closed as closed

pytestmark = pytest.mark.timeout(120)

DEADLINE = 1.0


@pytest.fixture
async def server(
    tmp_path: Path, redis_url: str, redis_prefix: str, fresh_pg_url: str
) -> AsyncIterator[LiveServer]:
    async with production_servers(tmp_path, redis_url, redis_prefix, fresh_pg_url) as start:
        yield await start(request_head_timeout=DEADLINE, request_body_timeout=DEADLINE)


async def _open(server: LiveServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = int(server.url.rsplit(":", 1)[1])
    return await asyncio.open_connection("127.0.0.1", port)


def _assert_timed_out(answer: RawAnswer) -> None:
    assert answer.status == 408, answer
    assert answer.headers["content-type"] == "application/json", answer
    assert answer.headers["connection"] == "close", answer
    body = answer.json()
    assert body["error"] == "request_timeout" and body["message"], body


async def _trickle(writer: asyncio.StreamWriter, byte: bytes = b"a") -> None:
    """Keep sending one byte at a time, each well inside the deadline, until cut off."""
    with contextlib.suppress(ConnectionError):
        for _ in range(int(60 / 0.05)):  # the connection should be gone long before
            writer.write(byte)
            await writer.drain()
            await asyncio.sleep(0.05)


def _register_head(length: int) -> bytes:
    return (
        b"POST /api/register HTTP/1.1\r\nHost: tapprove\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    server: LiveServer,
) -> None:
    reader, writer = await _open(server)
    assert await closed(reader) == b""
    writer.close()


async def test_a_head_that_stops_halfway_gets_408_and_is_closed(server: LiveServer) -> None:
    reader, writer = await _open(server)
    writer.write(b"POST /api/register HTTP/1.1\r\nHost: tapprove\r\nContent-Ty")
    _assert_timed_out(parse_answer(await closed(reader)))
    writer.close()


async def test_a_head_trickled_byte_by_byte_is_cut_at_its_deadline(server: LiveServer) -> None:
    reader, writer = await _open(server)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: tapprove\r\nX-Pad: ")
    trickle = asyncio.create_task(_trickle(writer))
    _assert_timed_out(parse_answer(await closed(reader)))
    trickle.cancel()
    writer.close()


async def test_a_body_that_stops_halfway_gets_408_and_is_closed(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tapprove.access")
    reader, writer = await _open(server)
    writer.write(_register_head(100) + b'{"email": "')
    _assert_timed_out(parse_answer(await closed(reader)))
    writer.close()
    # The route saw the request end (logged as nginx's 499), not an exception (a 500).
    while not (lines := [r for r in caplog.records if getattr(r, "path", "") == "/api/register"]):
        await asyncio.sleep(0.01)
    assert [getattr(r, "status", None) for r in lines] == [499]


async def test_a_body_trickled_byte_by_byte_is_cut_at_its_deadline(server: LiveServer) -> None:
    reader, writer = await _open(server)
    writer.write(_register_head(60_000) + b'{"email": "')
    trickle = asyncio.create_task(_trickle(writer))
    _assert_timed_out(parse_answer(await closed(reader)))
    trickle.cancel()
    writer.close()


async def test_a_body_still_coming_after_the_answer_is_cut_without_another_answer(
    server: LiveServer,
) -> None:
    """/healthz answers without reading the body; the rest of it still has a deadline, and
    the only response on the wire is the 200 (a 408 there would answer a request not sent)."""
    reader, writer = await _open(server)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: tapprove\r\nContent-Length: 100\r\n\r\n{")
    raw = await closed(reader)
    assert parse_answer(raw).status == 200, raw
    assert raw.count(b"HTTP/1.1 ") == 1, raw
    writer.close()


async def test_a_kept_alive_connection_that_starts_a_request_and_stalls_is_closed(
    server: LiveServer,
) -> None:
    reader, writer = await _open(server)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: tapprove\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(parse_answer(head).headers["content-length"])
    await asyncio.wait_for(reader.readexactly(length), 30)
    # Any byte stops uvicorn's keep-alive timer; the head's own deadline takes over.
    writer.write(b"GET /hea")
    _assert_timed_out(parse_answer(await closed(reader)))
    writer.close()


async def test_many_half_sent_requests_are_all_closed(server: LiveServer) -> None:
    """The report: 40 idle sockets, 40 with trickled headers, 40 with a partial body."""
    connections = [await _open(server) for _ in range(120)]
    trickles = []
    for index, (_, writer) in enumerate(connections):
        if index % 3 == 1:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: tapprove\r\nX-Pad: ")
            trickles.append(asyncio.create_task(_trickle(writer)))
        elif index % 3 == 2:
            writer.write(_register_head(100) + b'{"email": "')
    answers = await asyncio.gather(*(closed(reader) for reader, _ in connections))
    for index, raw in enumerate(answers):
        if index % 3 == 0:
            assert raw == b"", raw
        else:
            _assert_timed_out(parse_answer(raw))
    for task in trickles:
        task.cancel()
    for _, writer in connections:
        writer.close()


async def test_whole_requests_are_answered_as_before(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/healthz")).status_code == 200
        registered = await client.post(
            "/api/register", json={"email": unique_email("whole"), "password": "long enough"}
        )
        assert registered.status_code == 202, registered.text


async def test_a_phone_socket_and_a_long_poll_outlive_the_deadlines(server: LiveServer) -> None:
    """Both connect before an idle probe socket; once the server has closed the probe, their
    own head deadlines have passed too, and both still work."""
    email = unique_email("outlives")
    phone = await server.enroll_phone(await add_user(server, email))
    key = {"Authorization": f"Bearer {await api_key(server)}"}
    rp = server.browser()
    created = await rp.post("/api/v1/approvals", json={"user": email}, headers=key)
    assert created.status_code == 201, created.text
    approval_id = created.json()["approval_id"]

    socket = await device_socket(server, phone)
    request = await next_frame(socket, "approval_request")
    poll = asyncio.create_task(rp.get(f"/api/v1/approvals/{approval_id}?wait=30", headers=key))
    keys = server.services.approvals.keys
    waiters = keys.approval(approval_id, keys.shard_of(approval_id) or 0).waiters
    while not await server.services.redis.exists(waiters):  # the long poll is being held
        assert not poll.done(), poll.result().text
        await asyncio.sleep(0.01)
    reader, probe = await _open(server)
    assert await closed(reader) == b""
    probe.close()

    jws = phone.sign(request["approval"], number=created.json()["number"])
    await socket.send(json.dumps({"type": "decision", "jws": jws}))
    result = await next_frame(socket, "decision_result")
    assert result["status"] == "approved", result
    answer = await poll
    assert answer.status_code == 200 and answer.json()["status"] == "approved", answer.text
    await socket.close()
