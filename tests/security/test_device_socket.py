"""The device WebSocket under attack: it authenticates with the first frame or closes 4401,
answers every bad frame with `bad_message` and stays open, closes 1009 on frames over
64 KiB, and never lets one user's device touch another user's approvals.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets

from tests.fixtures.app import LiveServer
from tests.security.harness import (
    close_code,
    device_socket,
    device_view,
    next_frame,
    pending_login,
    person,
)

pytestmark = pytest.mark.timeout(120)

BIG = 70 * 1024


async def _closed_with(server: LiveServer, first: str | bytes | None) -> int | None:
    async with websockets.connect(f"{server.ws_url}/ws/device", max_size=None) as ws:
        if first is not None:
            await ws.send(first)
        return await close_code(ws, timeout=15)


async def test_a_socket_without_a_valid_auth_frame_is_closed_4401(server: LiveServer) -> None:
    who = await person(server, "auth")
    other = await person(server, "revoked")
    revoked = await other.session.delete(f"/api/devices/{other.phone.device_id}")
    assert revoked.status_code == 200, revoked.text
    first_frames: list[str | bytes | None] = [
        None,  # silent: 5 s, then 4401
        "not json",
        "[]",
        json.dumps({"type": "auth"}),
        json.dumps({"type": "auth", "token": 12345}),
        json.dumps({"type": "auth", "token": None}),
        json.dumps({"type": "auth", "token": "A" * 43}),
        json.dumps({"type": "auth", "token": "A" * 5000}),
        json.dumps({"type": "auth", "token": "\u0000"}),
        json.dumps({"type": "auth", "token": other.phone.token}),  # a revoked device
        json.dumps({"type": "ack", "token": who.phone.token}),  # not an auth frame
        json.dumps({"type": "AUTH", "token": who.phone.token}),
        json.dumps({"token": who.phone.token}),
        json.dumps({"type": "auth", "token": who.phone.token}).encode(),  # binary
        '{"type": "auth", "token": "\\ud800"}',
    ]
    codes = await asyncio.gather(*(_closed_with(server, f) for f in first_frames))
    assert codes == [4401] * len(first_frames)


async def test_frames_over_64_kib_close_1009(server: LiveServer) -> None:
    who = await person(server, "big")
    assert await _closed_with(server, "x" * BIG) == 1009
    assert await _closed_with(server, json.dumps({"type": "auth", "token": "A" * BIG})) == 1009
    ws = await device_socket(server, who.phone)
    await ws.send(json.dumps({"type": "ack", "id": "a" * BIG}))
    assert await close_code(ws) == 1009
    ws = await device_socket(server, who.phone)
    await ws.send(b"\x00" * BIG)
    assert await close_code(ws) == 1009


class Conversation:
    """Send a frame, then a marker frame the server must refuse; what came back in between
    is the server's whole answer to the frame, and the marker proves the socket is open."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.count = 0

    async def answer(self, frame: str | bytes) -> list[dict[str, Any]]:
        self.count += 1
        marker = f"marker-{self.count}"
        await self.ws.send(frame)
        await self.ws.send(json.dumps({"type": marker}))
        answers: list[dict[str, Any]] = []
        while True:
            got = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
            if got.get("type") == "error" and marker in got.get("message", ""):
                assert got["error"] == "bad_message"
                return answers
            answers.append(got)


async def test_bad_frames_get_bad_message_and_the_socket_stays_open(server: LiveServer) -> None:
    who = await person(server, "frames")
    ws = await device_socket(server, who.phone)
    talk = Conversation(ws)

    def bad_message(answers: list[dict[str, Any]]) -> None:
        assert len(answers) == 1 and answers[0]["type"] == "error", answers
        assert answers[0]["error"] == "bad_message", answers
        assert isinstance(answers[0]["message"], str)

    for frame in [
        "not json",
        "",
        "[]",
        "null",
        "42",
        '"text"',
        json.dumps({"type": 5}),
        json.dumps({"type": None}),
        json.dumps({"kind": "ack"}),
        json.dumps({"type": "approve"}),
        json.dumps({"type": "x" * 60_000}),
        json.dumps({"type": "\u202e\u0000💩"}),
        '{"type": "\\udfff"}',
        "[" * 3000 + "]" * 3000,
        b"\x00\x01binary",
        b"",
        json.dumps({"type": "ack"}),
        json.dumps({"type": "ack", "id": 7}),
        json.dumps({"type": "ack", "id": ["x"]}),
        json.dumps({"type": "ack", "id": "a" * 65}),
        json.dumps({"type": "decision"}),
        json.dumps({"type": "decision", "jws": 1}),
        json.dumps({"type": "decision", "jws": "x" * 9000}),
    ]:
        bad_message(await talk.answer(frame))

    # Frames that parse but name nothing of this user's: a protocol error, still open.
    for frame, error in [
        (json.dumps({"type": "ack", "id": "0" * 32}), "not_found"),
        (json.dumps({"type": "ack", "id": "%00"}), "not_found"),
        (json.dumps({"type": "ack", "id": "\u0000"}), "not_found"),
        (json.dumps({"type": "decision", "jws": "a.b.c"}), "bad_signature"),
        (json.dumps({"type": "decision", "jws": "x"}), "bad_signature"),
        (json.dumps({"type": "decision", "id": "0" * 32, "jws": "a.b.c"}), "bad_signature"),
    ]:
        answers = await talk.answer(frame)
        assert [a["type"] for a in answers] == ["error"] and answers[0]["error"] == error, (
            frame,
            answers,
        )

    # A repeated auth frame changes nothing, not even to another device's token.
    other = await person(server, "intruder")
    assert await talk.answer(json.dumps({"type": "auth", "token": other.phone.token})) == []

    # After all that the socket still works: a real request arrives and can be answered.
    login = await pending_login(server, who)
    request = await next_frame(ws, "approval_request")
    assert request["approval"]["id"] == login.approval_id
    await ws.send(
        json.dumps({"type": "decision", "jws": who.phone.sign(request["approval"], "deny")})
    )
    result = await next_frame(ws, "decision_result")
    assert result == {"type": "decision_result", "id": login.approval_id, "status": "denied"}
    await ws.close()


async def test_one_users_device_cannot_touch_another_users_approval(server: LiveServer) -> None:
    alice = await person(server, "alice")
    mallory = await person(server, "mallory")
    login = await pending_login(server, alice)
    approval = await device_view(server, alice.phone, login.approval_id)
    ws = await device_socket(server, mallory.phone)
    talk = Conversation(ws)
    ack = await talk.answer(json.dumps({"type": "ack", "id": login.approval_id}))
    assert [a.get("error") for a in ack] == ["not_found"], ack
    for jws in (
        mallory.phone.sign(approval, number=login.number),
        alice.phone.sign(approval, number=login.number),
    ):
        answers = await talk.answer(json.dumps({"type": "decision", "jws": jws}))
        assert [a.get("error") for a in answers] in (["not_found"], ["bad_signature"]), answers
    # Mallory's socket never heard of Alice's approval, and it is still pending.
    assert all(a["type"] == "error" for a in ack)
    async with httpx.AsyncClient(base_url=server.url) as client:
        status = await login.browser.get(f"/api/login/{login.approval_id}")
        assert status.json()["status"] == "pending"
        # Nor over HTTP, with Mallory's token.
        seen = await client.get(f"/api/approvals/{login.approval_id}", headers=mallory.phone.auth)
        assert seen.status_code == 404
    await ws.close()


async def test_a_revoked_device_is_cut_off_everywhere(server: LiveServer) -> None:
    who = await person(server, "cutoff")
    login = await pending_login(server, who)
    approval = await device_view(server, who.phone, login.approval_id)
    ws = await device_socket(server, who.phone)
    revoked = await who.session.delete(f"/api/devices/{who.phone.device_id}")
    assert revoked.status_code == 200 and revoked.json() == {"status": "revoked"}
    assert await close_code(ws) == 4401
    assert (
        await _closed_with(server, json.dumps({"type": "auth", "token": who.phone.token})) == 4401
    )
    async with httpx.AsyncClient(base_url=server.url, headers=who.phone.auth) as client:
        for method, path, body in [
            ("GET", "/api/devices/me/approvals", None),
            ("GET", f"/api/approvals/{login.approval_id}", None),
            (
                "POST",
                f"/api/approvals/{login.approval_id}/decision",
                {"jws": who.phone.sign(approval, number=login.number)},
            ),
            ("PATCH", "/api/devices/me", {"name": "still here?"}),
            ("DELETE", "/api/devices/me", None),
        ]:
            response = await client.request(method, path, json=body)
            assert response.status_code == 401, (path, response.text)
            assert response.json()["error"] == "unauthorized"
    assert (await login.browser.get(f"/api/login/{login.approval_id}")).json()["status"] == (
        "pending"
    )
