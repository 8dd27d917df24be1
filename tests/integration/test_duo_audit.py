"""An integration's approvals are a relying party's: the audit line of each names it, and a
refusal (push-fatigue backoff) is answered in Duo's words."""

from __future__ import annotations

import email.utils
import json
import time

import httpx
from duo_client.client import Client, sign
from sqlmodel import select

from app.db.models import AuditEvent
from app.duo.integrations import SEAL_PURPOSE, create_integration
from app.server_keys import SecretBox, secret_key
from tests.fixtures.app import LiveServer


async def _auth(server: LiveServer, ikey: str, skey: str, params: dict[str, str]) -> httpx.Response:
    date = email.utils.formatdate()
    body = Client.canon_json(params)
    authz = sign(ikey, skey, "POST", "127.0.0.1", "/auth/v2/auth", date, 5, {}, body=body)
    headers = {"Authorization": authz, "Date": date, "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        return await client.post("/auth/v2/auth", content=body, headers=headers)


async def test_audit_lines_name_the_integration_and_backoff_is_a_duo_deny(
    server: LiveServer,
) -> None:
    user_id = await server.add_user("audited@example.com")
    await server.enroll_phone(user_id)
    box = SecretBox(secret_key(server.settings), SEAL_PURPOSE)
    async with server.services.db() as db:
        row, skey = await create_integration(db, box, "vpn-gateway", now=time.time())
        await db.commit()
    params = {"factor": "push", "username": "audited@example.com", "async": "1"}

    started = await _auth(server, row.ikey, skey, params)
    assert started.status_code == 200, started.text
    txid = started.json()["response"]["txid"]
    await server.audit_filed()
    async with server.services.db() as db:
        created = (
            await db.exec(
                select(AuditEvent).where(
                    AuditEvent.approval_id == txid, AuditEvent.kind == "approval.created"
                )
            )
        ).one()
    assert json.loads(created.detail)["requester"] == "vpn-gateway"

    # A second request supersedes the first (one pending per user), which counts as
    # unanswered: the next one waits, and Duo clients hear a deny saying so.
    second = await _auth(server, row.ikey, skey, params)
    assert second.status_code == 200, second.text
    third = await _auth(server, row.ikey, skey, params)
    refused = third.json()["response"]
    assert refused["result"] == "deny" and "try again in" in refused["status_msg"], refused
