"""Waiting for an approval's end through the process inbox: the read that starts a wait
registers it, the end reaches every waiter of every process once, and nothing is left
registered afterwards."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from app.approval.model import ApprovalContext, PendingApproval, Status, new_approval
from app.approval.rules import Outcome
from app.approval.store import Created, StillPending
from app.approval.waiting import wait_for_end
from app.core.matching import MatchPolicy
from app.db import audit
from app.services import Services
from tests.fixtures.app import ServerFactory

pytestmark = pytest.mark.timeout(60)

CONTEXT = ApprovalContext(ip="10.0.0.1", user_agent="ua", browser="b", os="o")


async def pending(svc: Services) -> PendingApproval:
    approval = new_approval(
        user_id="u" * 32,
        kind="rp",
        ttl=60,
        policy=MatchPolicy.for_mode("typed"),
        context=CONTEXT,
        now=svc.clock.now(),
        api_key_id="key",
        shard=svc.approvals.shard_for("u" * 32),
    )
    event = orjson.dumps({"type": "approval_request", "approval": approval.device_json()})
    line = audit.line("approval.created", now=time.time())
    created = await svc.approvals.create(approval, event, line)
    if isinstance(created, StillPending):  # the user's previous one: supersede it
        replaced = (created.approval_id, audit.line("approval.superseded", now=time.time()))
        created = await svc.approvals.create(approval, event, line, superseding=replaced)
    assert isinstance(created, Created), created
    return approval


async def end(svc: Services, approval: PendingApproval) -> None:
    result = await svc.approvals.decide(approval, Outcome(Status.APPROVED), audit_line=b"{}")
    assert result.kind == "decided"


def waiters_key(svc: Services, approval: PendingApproval) -> str:
    """Where the store registers the processes waiting for the approval's end."""
    shard = svc.approvals.shard_for(approval.user_id)
    return svc.approvals.keys.approval(approval.id, shard).waiters


def anyone(_: Any) -> bool:
    return True


async def test_waiters_on_two_processes_each_hear_the_end_once(
    server_factory: ServerFactory,
) -> None:
    here, there = await server_factory(), await server_factory()
    approval = await pending(here.services)
    waits = [
        asyncio.create_task(wait_for_end(svc, approval.id, 20, visible=anyone))
        for svc in (here.services, here.services, there.services)
    ]
    key = waiters_key(here.services, approval)
    deadline = time.monotonic() + 10
    while await here.services.redis.scard(key) < 2:  # both processes registered
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)

    await end(there.services, approval)
    ended = await asyncio.wait_for(asyncio.gather(*waits), 10)

    stored = await here.services.approvals.get(approval.id)
    assert stored is not None and stored.status is Status.APPROVED
    for found in ended:
        assert found is not None
        assert (found.status, found.decided_at) == (Status.APPROVED, stored.decided_at)
    assert not await here.services.redis.exists(key)  # the end unregistered everyone


async def test_a_wait_on_an_ended_approval_returns_at_once_and_registers_nothing(
    server_factory: ServerFactory,
) -> None:
    svc = (await server_factory()).services
    approval = await pending(svc)
    await end(svc, approval)

    found = await asyncio.wait_for(wait_for_end(svc, approval.id, 20, visible=anyone), 5)

    assert found is not None and found.status is Status.APPROVED
    assert not await svc.redis.exists(waiters_key(svc, approval))


async def test_a_wait_the_caller_may_not_see_returns_at_once(
    server_factory: ServerFactory,
) -> None:
    svc = (await server_factory()).services
    approval = await pending(svc)

    found = await asyncio.wait_for(
        wait_for_end(svc, approval.id, 20, visible=lambda a: a.api_key_id == "other"), 5
    )

    assert found is not None and found.status is Status.PENDING
    assert await svc.approvals.watch("nope", svc.keys.process_inbox(svc.process_id, 0)) is None
