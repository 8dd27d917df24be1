"""Faults on the way to the phone: a phone whose connection drops and comes back, and a server
process killed outright (SIGKILL, no goodbye) while a phone was connected to it. In both the
pending approval reaches the phone again and the sign-in completes.

(Redis stopping mid-flow is tests/integration/test_redis_outage.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.fixtures.app import LiveServer, ServerFactory, free_port
from tests.security.harness import (
    device_socket,
    login_stream,
    next_frame,
    pending_login,
    person,
)

pytestmark = pytest.mark.timeout(120)


def drop(ws: Any) -> None:
    """Lose the connection the way a phone in a tunnel does: no close frame, just gone."""
    ws.transport.abort()


async def frames_until(stream: Any, kind: str, timeout: float = 15) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["type"] != kind:
        seen.append(json.loads(await asyncio.wait_for(stream.recv(), timeout)))
    return seen


async def test_a_phone_that_drops_and_returns_still_gets_the_request(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory()
    who = await person(server, "tunnel")
    ws = await device_socket(server, who.phone)
    login = await pending_login(server, who)
    first = await next_frame(ws, "approval_request")
    assert first["approval"]["id"] == login.approval_id
    drop(ws)  # before it could ack or answer

    # A sign-in started while the phone is away waits for it too (it supersedes the first).
    await asyncio.sleep(0.2)
    later = await pending_login(server, who)
    async with login_stream(
        server,
        later.approval_id,
        cookie=later.browser.cookies["tapprove_login"],
        origin=server.origin,
    ) as stream:
        assert json.loads(await stream.recv())["type"] == "status"
        back = await device_socket(server, who.phone)
        offered = await next_frame(back, "approval_request")
        assert offered["approval"]["id"] == later.approval_id
        await back.send(json.dumps({"type": "ack", "id": later.approval_id}))
        assert json.loads(await asyncio.wait_for(stream.recv(), 10)) == {
            "type": "delivered",
            "channel": "websocket",
        }
        await back.send(
            json.dumps(
                {
                    "type": "decision",
                    "jws": who.phone.sign(offered["approval"], number=later.number),
                }
            )
        )
        assert (await next_frame(back, "decision_result"))["status"] == "approved"
        assert (await frames_until(stream, "result"))[-1] == {
            "type": "result",
            "status": "approved",
            "reason": "device",
        }
    done = await later.browser.post(f"/api/login/{later.approval_id}/complete")
    assert done.status_code == 200, done.text
    # The first request, superseded while the phone was away, is not offered again.
    again = await device_socket(server, who.phone)
    await again.send(json.dumps({"type": "marker"}))
    assert (await next_frame(again, "error"))["error"] == "bad_message"
    await again.close()
    await back.close()


async def test_a_phone_that_drops_right_after_answering(server_factory: ServerFactory) -> None:
    server = await server_factory()
    who = await person(server, "hasty")
    ws = await device_socket(server, who.phone)
    login = await pending_login(server, who)
    request = await next_frame(ws, "approval_request")
    await ws.send(
        json.dumps(
            {"type": "decision", "jws": who.phone.sign(request["approval"], number=login.number)}
        )
    )
    drop(ws)
    for _ in range(100):
        status = (await login.browser.get(f"/api/login/{login.approval_id}")).json()["status"]
        if status != "pending":
            break
        await asyncio.sleep(0.05)
    assert status == "approved"
    done = await login.browser.post(f"/api/login/{login.approval_id}/complete")
    assert done.status_code == 200, done.text


@contextlib.asynccontextmanager
async def serve_process(
    server: LiveServer, tmp_path: Path
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """`tapprove serve` as a real process on the same Redis prefix and database."""
    port = free_port()
    env = {
        **os.environ,
        "TAPPROVE_DATABASE_URL": server.settings.sqlalchemy_url,
        "TAPPROVE_REDIS_URL": server.settings.redis_url or "",
        "TAPPROVE_REDIS_PREFIX": server.settings.redis_prefix,
        "TAPPROVE_PUBLIC_URL": server.settings.public_url,
        "TAPPROVE_DATA_DIR": str(tmp_path / "serve"),
        "TAPPROVE_LOG_FORMAT": "json",
    }
    log = (tmp_path / "serve.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("tapprove")),
        "serve",
        "--port",
        str(port),
        "--no-worker",
        env=env,
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/healthz")).status_code == 200:
                        break
                if process.returncode is not None:
                    raise AssertionError((tmp_path / "serve.log").read_text())
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("tapprove serve did not start")
        yield url, process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        log.close()


async def test_a_killed_server_process_loses_nothing(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = await server_factory()
    who = await person(server, "killed")
    async with serve_process(server, tmp_path) as (doomed_url, doomed_process):
        doomed = doomed_url.replace("http", "ws", 1)
        ws = await device_socket(server, who.phone, url=doomed)
        login = await pending_login(server, who)
        assert (await next_frame(ws, "approval_request"))["approval"]["id"] == login.approval_id
        doomed_process.send_signal(signal.SIGKILL)
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 15)

    # The phone reconnects to the surviving process and finds the request waiting.
    back = await device_socket(server, who.phone)
    offered = await next_frame(back, "approval_request")
    assert offered["approval"]["id"] == login.approval_id
    await back.send(
        json.dumps(
            {"type": "decision", "jws": who.phone.sign(offered["approval"], number=login.number)}
        )
    )
    assert (await next_frame(back, "decision_result"))["status"] == "approved"
    done = await login.browser.post(f"/api/login/{login.approval_id}/complete")
    assert done.status_code == 200, done.text
    await back.close()
