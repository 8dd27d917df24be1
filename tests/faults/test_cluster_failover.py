"""A Redis Cluster under stress. A master dies (SIGKILL) with approvals in flight: its
replica is promoted, the approval that was pending is still there and the phone's decision
completes it, the one already decided keeps its result, no server process fails, and the
delivery job and the mail queued on that shard before the kill are sent once after the
promotion. A shard with no replica left stops only its own users (503 with Retry-After). Slots move
(`redis-cli --cluster reshard`) while flows run, and they keep completing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

import httpx
import pytest

from app.delivery.outbox import outbox_stream
from tests.fakes import wait_until
from tests.fakes.fcm import FakeFcm
from tests.fixtures.app import LiveServer, Phone, ServerFactory
from tests.fixtures.cluster import LocalCluster
from tests.fixtures.mail import MailAppFactory, SmtpServer
from tests.integration.test_login_loop import device_socket, next_frame
from tests.integration.test_outbox import register, row_where, rows
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
    private_cluster: LocalCluster,  # first: it outlives the servers, which stop before it
    server_factory: ServerFactory,
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


async def test_a_shard_that_is_down_makes_only_its_users_wait(
    private_cluster: LocalCluster, server_factory: ServerFactory
) -> None:
    cluster = private_cluster
    server = await server_factory(redis_url=cluster.url, redis_cluster=True)
    svc = server.services
    people: dict[str, tuple[str, Phone]] = {}  # master address -> (email, phone)
    for i in range(40):
        email = f"outage-{i}@example.com"
        user_id = await server.add_user(email)
        address = cluster.master_of(svc.keys.in_shard(svc.keys.shard_of(user_id), "x")).address
        if address not in people:
            people[address] = (email, await server.enroll_phone(user_id))
        if len(people) == 3:
            break
    assert len(people) == 3
    down, *up = list(people)
    node = next(n for n in cluster.nodes if n.address == down)
    replica = cluster.replica_of(node)
    # A phone on another shard holds its socket through the outage.
    socket_phone = people[up[0]][1]
    ws = await device_socket(server, socket_phone)
    cluster.kill(replica)  # no replica left to take over: the shard is down
    cluster.kill(node)

    key = await api_key(server)
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as rp:
        refused = await rp.post("/api/v1/approvals", json={"user": people[down][0]})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "unavailable"
        assert int(refused.headers["Retry-After"]) >= 1
        for address in up:
            created = await rp.post("/api/v1/approvals", json={"user": people[address][0]})
            assert created.status_code == 201, created.text
            phone = people[address][1]
            approval_id = created.json()["approval_id"]
            number = created.json()["number"]
            if phone is socket_phone:
                # Events still flow for this shard: the request reaches the socket, and the
                # long poll (this process's inbox of that shard) hears the decision.
                request = await next_frame(ws, "approval_request", timeout=30)
                assert request["approval"]["id"] == approval_id
                poll = asyncio.create_task(rp.get(f"/api/v1/approvals/{approval_id}?wait=30"))
                jws = phone.sign(request["approval"], number=number)
                await ws.send(json.dumps({"type": "decision", "jws": jws}))
                assert (await poll).json()["status"] == "approved"
                continue
            assert await decide_over_http(server, phone, approval_id, number=number) == 200
            assert await status_once_answered(rp, approval_id) == "approved"
        ready = await rp.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["redis_cluster"]["unreachable"] == [down]
    assert ready.json()["redis_cluster"]["masters"] == 2
    assert ready.json()["redis_cluster"]["state"] == "ok"  # the others serve their slots


async def test_flows_keep_completing_while_slots_move(
    private_cluster: LocalCluster, server_factory: ServerFactory
) -> None:
    cluster = private_cluster
    server = await server_factory(redis_url=cluster.url, redis_cluster=True)
    svc = server.services
    # The shard whose slot comes first in its master's range: the fewest slots to move.
    ranges = cluster.masters()

    def offset(shard: int) -> tuple[int, str]:
        slot = cluster.keyslot(svc.keys.in_shard(shard, "x"))
        for address, spans in ranges.items():
            for first, last in spans:
                if first <= slot <= last:
                    return slot - first, address
        raise AssertionError(slot)

    shard = min(svc.keys.shards, key=lambda s: offset(s)[0])
    moved, source = offset(shard)
    target = next(address for address in ranges if address != source)
    slot = cluster.keyslot(svc.keys.in_shard(shard, "x"))
    for i in range(400):
        email = f"reshard-{i}@example.com"
        user_id = await server.add_user(email)
        if svc.keys.shard_of(user_id) == shard:
            break
    else:
        raise AssertionError("no user on that shard")
    phone = await server.enroll_phone(user_id)

    key = await api_key(server)
    completed: list[str] = []
    during: list[str] = []
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as rp:

        async def flow() -> str:
            while True:  # 503 (TRYAGAIN while a slot's keys are split): retry as told
                created = await rp.post("/api/v1/approvals", json={"user": email})
                if created.status_code != 503:
                    break
                await asyncio.sleep(0.1)
            assert created.status_code == 201, created.text
            approval_id: str = created.json()["approval_id"]
            number = created.json()["number"]
            decided = 503
            while decided == 503:
                decided = await decide_over_http(server, phone, approval_id, number=number)
            assert decided == 200
            assert await status_once_answered(rp, approval_id) == "approved"
            return approval_id

        reshard = asyncio.create_task(asyncio.to_thread(
            subprocess.run,
            [
                "redis-cli", "--cluster", "reshard", source,
                "--cluster-from", node_id(cluster, source),
                "--cluster-to", node_id(cluster, target),
                "--cluster-slots", str(moved + 1),
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=180,
            check=False,
        ))
        while not reshard.done():
            completed.append(await flow())
            if not reshard.done():
                during.append(completed[-1])
        done = await reshard
        assert done.returncode == 0, done.stdout.decode()[-2000:] + done.stderr.decode()
        completed.append(await flow())  # and after
    assert during, "no flow ran while the slots moved"
    assert cluster.master_of(svc.keys.in_shard(shard, "x")).address == target
    assert cluster.keyslot(svc.keys.in_shard(shard, "x")) == slot


def node_id(cluster: LocalCluster, address: str) -> str:
    node = next(n for n in cluster.nodes if n.address == address)
    with node.client() as client:
        found: str = client.execute_command("CLUSTER MYID")
        return found


async def test_mail_queued_on_a_shard_whose_master_dies_is_sent_once(
    private_cluster: LocalCluster, mail_app_factory: MailAppFactory, smtp_server: SmtpServer
) -> None:
    cluster = private_cluster
    # Every node: a process may start while the one named first is the one that died.
    every_node = ",".join(f"redis://{node.address}/0" for node in cluster.nodes)
    on_cluster = {"redis_url": every_node, "redis_cluster": True, "outbox_lease": 2.0}
    web = await mail_app_factory(run_worker=False, **on_cluster)
    await register(web)  # the verification mail: a row in SQL, an entry on its shard's stream
    [message] = await rows(web)
    stream = outbox_stream(web.services, message.id).stream
    assert await web.services.redis.xlen(stream) == 1
    cluster.kill(cluster.master_of(stream))
    cluster.wait_until_ok()

    # A worker started after the promotion sends it: from the stream if the replica had the
    # entry, else from SQL once the lease ends (the outbox publishes unsent rows again).
    worker = await mail_app_factory(run_worker=True, **on_cluster)
    [mail] = await smtp_server.wait_for(1, timeout=60)
    assert "ada@example.com" in mail.recipients
    await row_where(worker, status="sent", attempts=1)
    # Two more leases: nothing is sent again (the row says sent; a stale entry is skipped).
    await asyncio.sleep(2 * 2.0)
    assert len(smtp_server.received) == 1
