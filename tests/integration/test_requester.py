"""A phone is told who asks: a browser sign-in, or a relying party by its API key's name
(`requester` in the Approval object, docs/protocol.md §3.3), on every way it reads one.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import websockets

from app.db.accounts import create_api_key
from tests.fixtures.app import LiveServer, approval_for

pytestmark = pytest.mark.timeout(60)


async def test_the_phone_sees_the_relying_partys_name_and_a_login_as_a_login(
    server: LiveServer,
) -> None:
    user_id = await server.add_user("who@example.com")
    phone = await server.enroll_phone(user_id)
    async with server.services.db() as db:
        _, api_key = await create_api_key(db, "Staging VPN", now=time.time())
        await db.commit()
    ws = await websockets.connect(f"{server.ws_url}/ws/device")
    await ws.send(json.dumps({"type": "auth", "token": phone.token}))
    assert json.loads(await ws.recv())["type"] == "ready"

    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {api_key}"}
    ) as rp:
        created = await rp.post("/api/v1/approvals", json={"user": "who@example.com"})
    assert created.status_code == 201, created.text
    request = json.loads(await ws.recv())
    assert request["type"] == "approval_request"
    assert request["approval"]["requester"] == {"kind": "rp", "name": "Staging VPN"}
    fetched = await approval_for(phone, server)
    assert fetched["requester"] == {"kind": "rp", "name": "Staging VPN"}
    async with httpx.AsyncClient(base_url=server.url) as app:
        one = await app.get(f"/api/approvals/{fetched['id']}", headers=phone.auth)
    assert one.json()["requester"] == {"kind": "rp", "name": "Staging VPN"}

    login = await server.login(server.browser(), "who@example.com")
    assert login.status_code == 202, login.text
    frames = [json.loads(await ws.recv()) for _ in range(2)]  # the RP's ends, the login's comes
    [offered] = [f for f in frames if f["type"] == "approval_request"]
    assert offered["approval"]["requester"] == {"kind": "login", "name": None}
    await ws.close()
