"""tapprove on a real Redis Cluster (three masters, three replicas on loopback): no script
or multi-key command spans two slots (checked with the cluster's own CLUSTER KEYSLOT and
COMMAND GETKEYS), a sign-in works end to end with its keys on every master, a decision
waits for a replica, and /readyz reports the cluster."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
from redis.asyncio.cluster import ClusterPipeline

from app import metrics
from app.approval.model import Status
from app.approval.rules import Outcome
from app.store.lua import Arg, Script
from tests.fixtures.app import LiveServer, ServerFactory
from tests.fixtures.cluster import LocalCluster
from tests.integration.test_login_loop import device_socket, login_stream, next_frame
from tests.integration.test_waiters import end, pending
from tests.security.harness import api_key
from tests.unit.test_lua import LUA_FILES, package_and_name

pytestmark = pytest.mark.timeout(120)

# ARGV names that are channels: scripts publish on them (SPUBLISH on a cluster).
CHANNEL_ARGS = ("user_channel", "delivered_channel", "wake", "inbox")


@dataclass
class Recorder:
    """Every script run and every pipeline sent while a test drives the server."""

    scripts: list[tuple[str, dict[str, str], dict[str, Arg]]] = field(default_factory=list)
    pipelines: list[tuple[bool, list[tuple[Any, ...]]]] = field(default_factory=list)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Record, without changing anything, what the server sends Redis."""
    found = Recorder()
    call, replicated = Script.__call__, Script.replicated
    execute = ClusterPipeline.execute

    async def recorded_call(
        self: Script, keys: Mapping[str, str], args: Mapping[str, Arg], **kw: Any
    ) -> Any:
        found.scripts.append((self.lua.name, dict(keys), dict(args)))
        return await call(self, keys, args, **kw)

    async def recorded_replicated(
        self: Script, keys: Mapping[str, str], args: Mapping[str, Arg], **kw: Any
    ) -> Any:
        found.scripts.append((self.lua.name, dict(keys), dict(args)))
        return await replicated(self, keys, args, **kw)

    async def recorded_execute(self: ClusterPipeline, *args: Any, **kw: Any) -> Any:
        queue = self._execution_strategy._command_queue  # type: ignore[attr-defined]
        commands = [tuple(command.args) for command in queue]
        found.pipelines.append((bool(self._transaction), commands))
        return await execute(self, *args, **kw)

    monkeypatch.setattr(Script, "__call__", recorded_call)
    monkeypatch.setattr(Script, "replicated", recorded_replicated)
    monkeypatch.setattr(ClusterPipeline, "execute", recorded_execute)
    return found


async def on_cluster(
    server_factory: ServerFactory, cluster: LocalCluster, **overrides: Any
) -> LiveServer:
    return await server_factory(redis_url=cluster.url, redis_cluster=True, **overrides)


def slots_of(cluster: LocalCluster, names: list[str]) -> set[int]:
    return {cluster.keyslot(name) for name in names}


def command_keys(cluster: LocalCluster, command: tuple[Any, ...]) -> list[str]:
    """The keys of a command, as the cluster itself finds them (COMMAND GETKEYS)."""
    args = [a if isinstance(a, str | bytes) else str(a) for a in command]
    if str(args[0]).upper() in ("EVALSHA", "EVAL"):
        return [str(k) for k in args[3 : 3 + int(args[2])]]
    if str(args[0]).upper() in ("PUBLISH", "SPUBLISH", "WAIT", "MULTI", "EXEC"):
        return [str(args[1])] if str(args[0]).upper() == "SPUBLISH" else []
    with cluster.live_nodes()[0].client() as client:
        try:
            keys = client.execute_command("COMMAND GETKEYS", *args)
        except redis.ResponseError:  # a command without keys
            return []
    return [str(k) for k in keys]


async def sign_in_flow(server: LiveServer, email: str) -> str:
    """A person signs in, the phone (on its socket) acks and approves, the browser's stream
    hears it and completes; a relying party then asks and long-polls. The approval id."""
    user_id = await server.add_user(email)
    phone = await server.enroll_phone(user_id)
    ws = await device_socket(server, phone)
    browser = server.browser()
    started = (await server.login(browser, email)).json()
    async with login_stream(server, browser, started["approval_id"]) as stream:
        assert json.loads(await stream.recv())["status"] == "pending"
        approval = (await next_frame(ws, "approval_request"))["approval"]
        await ws.send(json.dumps({"type": "ack", "id": approval["id"]}))
        assert json.loads(await stream.recv())["type"] == "delivered"
        jws = phone.sign(approval, number=started["number"])
        await ws.send(json.dumps({"type": "decision", "jws": jws}))
        assert json.loads(await stream.recv())["status"] == "approved"
    done = await browser.post(f"/api/login/{started['approval_id']}/complete")
    assert done.json() == {"status": "authenticated"}, done.text
    assert (await browser.get("/api/account")).status_code == 200
    assert (await browser.post("/api/logout")).status_code in (200, 204)

    key = await api_key(server)
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as rp:
        created = await rp.post("/api/v1/approvals", json={"user": email})
        assert created.status_code == 201, created.text
        rp_id = created.json()["approval_id"]
        poll = asyncio.create_task(rp.get(f"/api/v1/approvals/{rp_id}?wait=20"))
        request = await next_frame(ws, "approval_request")
        await ws.send(json.dumps({"type": "decision", "jws": phone.sign(
            request["approval"], decision="deny")}))
        assert (await poll).json()["status"] == "denied"
    await ws.close()
    return rp_id


async def test_no_script_or_multi_key_command_spans_two_slots(
    server_factory: ServerFactory, redis_cluster: LocalCluster, recorder: Recorder
) -> None:
    server = await on_cluster(server_factory, redis_cluster, run_worker=True)
    svc = server.services
    await sign_in_flow(server, "slots@example.com")
    # What the flow above does not reach: expiry, codes, rate-limit refunds, leaving.
    approval = await pending(svc)
    assert await svc.approvals.expire_if_due(approval) is Status.PENDING
    await end(svc, await pending(svc))
    await svc.codes.issue("sms", approval.id, "123456", life=60, keep=60)
    assert (await svc.codes.check("sms", approval.id, "123456", max_attempts=3, keep=60)).right
    limit = svc.limits.key("test", "slots")
    await svc.limits.hit(limit, limit=5, window=60)
    await svc.limits.refund(limit)
    await svc.presence.leave("u" * 32, "d" * 32)
    await svc.approvals.mark_delivered(approval.id, "fcm")
    await svc.jobs.enqueue("noop", {}, shard=3, run_at=time.time() + 3600)

    on_disk = {
        package_and_name(path)[1] for path in LUA_FILES if "-- library:" not in path.read_text()
    }
    assert {name for name, _, _ in recorder.scripts} == on_disk, "every script was walked"
    for name, keys, args in recorder.scripts:
        names = list(keys.values())
        names += [str(value) for arg, value in args.items() if arg in CHANNEL_ARGS and value]
        assert len(slots_of(redis_cluster, names)) == 1, (name, names)

    transactions = [commands for atomic, commands in recorder.pipelines if atomic]
    assert transactions, "the flow ran transactions (jobs, deliveries)"
    for atomic, commands in recorder.pipelines:
        per_command = [command_keys(redis_cluster, command) for command in commands]
        for command, keys in zip(commands, per_command, strict=True):
            assert len(slots_of(redis_cluster, keys)) <= 1, command
        if atomic:  # MULTI/EXEC: everything in one slot
            every = [key for keys in per_command for key in keys]
            assert len(slots_of(redis_cluster, every)) == 1, commands


async def test_a_sign_in_works_and_users_spread_over_every_master(
    server_factory: ServerFactory, redis_cluster: LocalCluster
) -> None:
    server = await on_cluster(server_factory, redis_cluster)
    svc = server.services
    everyone = set(redis_cluster.masters())
    # 16 shards over three masters: where each user's keys go is fixed by the user id.
    served = {redis_cluster.master_of(svc.keys.in_shard(shard, "x")).address
              for shard in svc.keys.shards}
    assert served == everyone
    masters: set[str] = set()
    for i in range(30):
        approval_id = await sign_in_flow(server, f"spread-{i}@example.com")
        masters.add(redis_cluster.master_of(approval_hash(svc, approval_id)).address)
        if masters == everyone:
            break
    assert masters == everyone  # sign-ins ran, end to end, on every master


async def test_a_decision_is_answered_once_a_replica_holds_it(
    server_factory: ServerFactory, redis_cluster: LocalCluster
) -> None:
    server = await on_cluster(server_factory, redis_cluster)
    svc = server.services
    assert server.settings.wait_replicas == 1
    approval = await pending(svc)
    key = approval_hash(svc, approval.id)
    assert (await replica_copy(redis_cluster, key)).get("status") == "pending"
    result = await svc.approvals.decide(approval, Outcome(Status.APPROVED), audit_line=b"{}")
    assert result.kind == "decided"
    assert unreplicated("decide") == 0.0
    assert (await replica_copy(redis_cluster, key)).get("status") == "approved"

    # A replica that cannot answer (stopped): WAIT on the write's own connection gives up
    # after TAPPROVE_REDIS_WAIT_MS, and the decision is still answered, counted as such.
    approval = await pending(svc)
    replica = redis_cluster.replica_of(redis_cluster.master_of(approval_hash(svc, approval.id)))
    os.kill(replica.process.pid, signal.SIGSTOP)
    try:
        result = await svc.approvals.decide(approval, Outcome(Status.DENIED), audit_line=b"{}")
    finally:
        os.kill(replica.process.pid, signal.SIGCONT)
    assert result.kind == "decided"
    assert unreplicated("decide") == 1.0


def approval_hash(svc: Any, approval_id: str) -> str:
    shard = svc.approvals.keys.shard_of(approval_id)
    assert shard is not None
    key: str = svc.approvals.keys.approval(approval_id, shard).hash
    return key


def unreplicated(step: str) -> float:
    """How many `step`s no replica acknowledged in time, so far in this test process."""
    found = metrics.REGISTRY.get_sample_value(
        "tapprove_redis_unreplicated_total", {"step": step}
    )
    return (found or 0.0) - BASELINE.get(step, 0.0)


BASELINE: dict[str, float] = {}


@pytest.fixture(autouse=True)
def unreplicated_baseline() -> None:
    for step in ("create", "decide"):
        BASELINE[step] = 0.0
        BASELINE[step] = unreplicated(step)


async def replica_copy(cluster: LocalCluster, key: str) -> dict[str, str]:
    """The hash `key` as the replica of its master holds it (READONLY read)."""
    replica = cluster.replica_of(cluster.master_of(key))
    with replica.client() as client:
        client.execute_command("READONLY")
        found: dict[str, str] = client.hgetall(key)  # type: ignore[assignment]
        return found


async def test_readyz_reports_the_cluster(
    server_factory: ServerFactory, redis_cluster: LocalCluster
) -> None:
    server = await on_cluster(server_factory, redis_cluster)
    async with httpx.AsyncClient(base_url=server.url) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    assert ready.json()["redis_cluster"] == {"state": "ok", "masters": 3, "unreachable": []}

