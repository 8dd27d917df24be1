"""A Redis Cluster master dies (SIGKILL) with approvals in flight: its replica is promoted,
the approval that was pending is still there and the phone's decision completes it, the
one already decided keeps its result, no server process fails, and the delivery job queued
on that shard before the kill is sent once after the promotion."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.fakes import wait_until
from tests.fakes.fcm import FakeFcm
from tests.fixtures.app import LiveServer, Phone, ServerFactory
from tests.fixtures.cluster import LocalCluster
from tests.integration.test_push_delivery import providers_for
from tests.security.harness import api_key

pytestmark = pytest.mark.timeout(240)


async def decide_over_http(server: LiveServer, phone: Phone, approval_id: str, **how: Any) -> int:
    """The phone reads the approval and posts its signed decision; the HTTP status."""
    async with httpx.AsyncClient(base_url=server.url, headers=phone.auth, timeout=30) as app:
        viewed = await app.get(f"/api/approvals/{approval_id}")
        assert viewed.status_code == 200, viewed.text
        answer = await app.post(
            f"/api/approvals/{approval_id}/decision",
            json={"jws": phone.sign(viewed.json(), **how)},
        )
    return answer.status_code


async def status_once_answered(rp: httpx.AsyncClient, approval_id: str) -> str:
    """The approval's status, asking again while its shard answers 503 (a failover)."""
    deadline = time.monotonic() + 60
    while True:
        found = await rp.get(f"/api/v1/approvals/{approval_id}")
        if found.status_code != 503:
            assert found.status_code == 200, found.text
            status: str = found.json()["status"]
            return status
        assert "Retry-After" in found.headers
        assert time.monotonic() < deadline, "the shard never came back"
        await asyncio.sleep(0.2)


async def test_a_master_dies_and_its_replica_carries_on(
    server_factory: ServerFactory,
    private_cluster: LocalCluster,
    fcm_env: dict[str, str],
    fake_fcm: FakeFcm,
) -> None:
    cluster = private_cluster
    front = await server_factory(
        redis_url=cluster.url,
        redis_cluster=True,
        run_worker=False,  # the queued push waits for the worker started after the kill
        providers=await providers_for(fcm_env),
    )
    svc = front.services
    user_id = await front.add_user("failover@example.com")
    phone = await front.enroll_phone(user_id, push={"provider": "fcm", "token": "fcm-failover"})
    shard = svc.keys.shard_of(user_id)
    master = cluster.master_of(svc.keys.in_shard(shard, "probe"))
    replica = cluster.replica_of(master)
    other_users_master = next(
        address for address in cluster.masters() if address != master.address
    )

    key = await api_key(front)
    async with httpx.AsyncClient(
        base_url=front.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as rp:
        decided = (await rp.post("/api/v1/approvals", json={"user": "failover@example.com"}))
        assert decided.status_code == 201, decided.text
        decided_id = decided.json()["approval_id"]
        number = decided.json()["number"]
        assert await decide_over_http(front, phone, decided_id, number=number) == 200

        pending = await rp.post("/api/v1/approvals", json={"user": "failover@example.com"})
        assert pending.status_code == 201, pending.text
        pending_id = pending.json()["approval_id"]
        assert pending.json()["channels"] == ["fcm"]
        assert await svc.jobs.depth() >= 1  # the push, queued on the user's shard
        assert not fake_fcm.requests

        cluster.kill(master)
        cluster.wait_until_ok()  # the replica took over the dead master's slots
        masters = cluster.masters()
        assert replica.address in masters and master.address not in masters
        assert other_users_master in masters

        # What was acknowledged survived: the decided one keeps its result, the pending
        # one is still pending (each was answered only once the replica had it).
        assert await status_once_answered(rp, decided_id) == "approved"
        assert await status_once_answered(rp, pending_id) == "pending"

        # A worker started now finds the push queued before the kill, and sends it once.
        await server_factory(
            redis_url=cluster.url, redis_cluster=True, providers=await providers_for(fcm_env)
        )
        await wait_until(lambda: len(fake_fcm.requests) == 1, timeout=30)
        assert fake_fcm.requests[0].message["token"] == "fcm-failover"

        # The phone's decision completes the approval that crossed the failover.
        assert await decide_over_http(front, phone, pending_id, decision="deny") == 200
        assert await status_once_answered(rp, pending_id) == "denied"

        ready = await rp.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["redis_cluster"]["state"] == "ok"

    # The job was finished, not left under a lease that would send it again.
    deadline = time.monotonic() + 30
    while await svc.jobs.depth():
        assert time.monotonic() < deadline, "the push job was never finished"
        await asyncio.sleep(0.1)
    assert len(fake_fcm.requests) == 1
