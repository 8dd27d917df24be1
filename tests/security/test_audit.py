"""SECURITY.md, stolen phone: the audit log records every approval, decision and device change
with time, IP and device. A person set up through the public routes from an address of its
own, a sign-in, a phone renamed and then revoked by its owner: each step is a line with the
caller's IP, the device it concerns, and the time."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx
import pytest
from sqlmodel import col, select

from app.core.clock import to_datetime
from app.db.models import AuditEvent
from tests.fixtures.app import LiveServer, loopback_address
from tests.security.harness import approved_on_socket, person_via_routes

pytestmark = pytest.mark.timeout(120)


async def test_approvals_decisions_and_device_changes_are_audited_with_ip_and_device(
    server: LiveServer,
) -> None:
    started = to_datetime(time.time()) - timedelta(seconds=1)
    who = await person_via_routes(server, "audited")
    browser_ip = server.source_ip
    signed_in = await approved_on_socket(server, who.email, who.phone)
    phone_ip = loopback_address()  # the phone's HTTP calls come from elsewhere
    async with httpx.AsyncClient(
        base_url=server.url,
        headers=who.phone.auth,
        transport=httpx.AsyncHTTPTransport(local_address=phone_ip),
    ) as phone:
        renamed = await phone.patch("/api/devices/me", json={"name": "Work phone"})
        assert renamed.status_code == 200, renamed.text
    revoked = await signed_in.delete(f"/api/devices/{who.phone.device_id}")
    assert revoked.json() == {"status": "revoked"}, revoked.text

    await server.audit_filed()
    async with server.services.db() as db:
        rows = (
            await db.exec(
                select(AuditEvent)
                .where(AuditEvent.user_id == who.user_id)
                .order_by(col(AuditEvent.id))
            )
        ).all()
    ended = to_datetime(time.time()) + timedelta(seconds=1)
    assert all(started <= row.at <= ended for row in rows), [(r.kind, r.at) for r in rows]

    def lines(kind: str) -> list[AuditEvent]:
        return [row for row in rows if row.kind == kind]

    device = who.phone.device_id
    [code] = lines("device.enrollment_started")
    assert code.ip == browser_ip, code
    [added] = lines("device.added")
    # The phone enrolled itself, from 127.0.0.1 (the test's phone clients bind no address).
    assert (added.ip, added.device_id) == ("127.0.0.1", device), added
    # Two sign-ins approved on the phone: person_via_routes' own and this one.
    created, decided = lines("approval.created"), lines("approval.decided")
    assert len(created) == len(decided) == 2, [r.kind for r in rows]
    assert all(row.ip == browser_ip and row.approval_id for row in created), created
    assert [row.approval_id for row in decided] == [row.approval_id for row in created]
    assert all(row.device_id == device and row.ip for row in decided), decided
    [updated] = lines("device.updated")
    assert (updated.ip, updated.device_id) == (phone_ip, device), updated
    [gone] = lines("device.revoked")
    assert (gone.ip, gone.device_id) == (browser_ip, device), gone
