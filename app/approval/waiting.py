"""Waiting for an approval's end: a relying party's long poll, a browser's stream of its
sign-in, and the sweeper that ends approvals whose deadline passed.

A wait starts with one read that also registers it (app.approval.waiters), so an end after
the read is not missed; the end's `result` event carries the final status and time, so the
approval need not be read again. A wait at an approval's deadline ends it as expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from app.approval.model import PendingApproval, Status
from app.approval.rules import past_deadline
from app.services import Services
from app.store.events import RECONNECTED, Event

log = logging.getLogger(__name__)

# After a deadline the sweeper may not have reached yet, wait this much before looking again.
_PAST_DEADLINE_PAUSE = 0.5
# An end is announced a moment after the deadline it follows.
_DEADLINE_SLACK = 0.05


class Watch:
    """An approval being waited for: `approval` is as last heard of (None once gone)."""

    def __init__(self, svc: Services, approval: PendingApproval | None) -> None:
        self.svc = svc
        self.approval = approval
        self.events: asyncio.Queue[Event] = asyncio.Queue()

    @property
    def pending(self) -> bool:
        return self.approval is not None and self.approval.status is Status.PENDING

    async def next(self, seconds: float, *, stop: asyncio.Event | None = None) -> str | None:
        """Wait up to `seconds` (or until `stop`) for news of a pending approval: the channel
        of a delivery that landed, else None. `approval` is current afterwards."""
        approval = self.approval
        if approval is None or approval.status is not Status.PENDING:
            return None
        until_deadline = approval.expires_at - self.svc.clock.now()
        if until_deadline <= 0:
            if await self._expire(approval):
                return None
            until_deadline = _PAST_DEADLINE_PAUSE
        event = await self._event(min(seconds, until_deadline + _DEADLINE_SLACK), stop)
        if event is None:
            return None
        if event is RECONNECTED:  # events may have been missed
            self.approval = await self.svc.approvals.get(approval.id)
        elif event.get("type") == "delivered":
            return str(event.get("channel"))
        elif event.get("type") == "result":
            self.approval = approval.ended(event) or await self.svc.approvals.get(approval.id)
        return None

    async def _expire(self, approval: PendingApproval) -> bool:
        """End it as expired; True when it is no longer pending (read again)."""
        status = await self.svc.approvals.expire_if_due(approval)
        if status is Status.PENDING:
            return False
        self.approval = await self.svc.approvals.get(approval.id)
        return True

    async def _event(self, seconds: float, stop: asyncio.Event | None) -> Event | None:
        if stop is None:
            # asyncio.timeout, not a task per wait: the long poll is a hot path.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    return await self.events.get()
            return None
        getter = asyncio.ensure_future(self.events.get())
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait(
            {getter, stopper}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
        )
        for task in (getter, stopper):
            if task not in done:
                task.cancel()
        return getter.result() if getter in done else None


async def as_of_now(svc: Services, approval: PendingApproval) -> PendingApproval | None:
    """The approval as it stands now: one past its deadline is first ended as expired (the
    sweeper may not have reached it yet) and read again (None if it is gone meanwhile)."""
    if not past_deadline(approval, svc.clock.now()):
        return approval
    await svc.approvals.expire_if_due(approval)
    return await svc.approvals.get(approval.id)


@contextlib.asynccontextmanager
async def watching(
    svc: Services, approval_id: str, *, deliveries: bool = False
) -> AsyncIterator[Watch]:
    """Wait for the approval's end while the block runs (and, with `deliveries`, hear each
    channel that reaches the person: the browser's stream). `approval` is None when unknown."""
    watch = Watch(svc, None)
    channel = svc.approvals.delivered_channel(approval_id) if deliveries else None
    async with contextlib.AsyncExitStack() as stack:
        if channel is not None:
            await stack.enter_async_context(svc.events.subscribe(watch.events.put_nowait, channel))
        watch.approval = await stack.enter_async_context(
            svc.waiters.watch(approval_id, watch.events.put_nowait)
        )
        yield watch


async def wait_for_end(
    svc: Services,
    approval_id: str,
    seconds: float,
    *,
    visible: Callable[[PendingApproval], bool],
) -> PendingApproval | None:
    """The approval once it has ended, or as it is when `seconds` have passed; None when
    unknown. One that `visible` rejects comes back at once (the caller answers 404)."""
    if seconds <= 0:
        return await svc.approvals.get(approval_id)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + seconds
    async with watching(svc, approval_id) as watch:
        while watch.approval is not None and watch.pending and visible(watch.approval):
            remaining = give_up - loop.time()
            if remaining <= 0 and not past_deadline(watch.approval, svc.clock.now()):
                break
            await watch.next(max(remaining, 0.0))
        return watch.approval


async def run_expiry_sweeper(svc: Services, stop: asyncio.Event) -> None:
    """End approvals whose deadline passed, so devices and waiters hear `expired` on time."""
    await asyncio.gather(*(_sweep_shard(svc, stop, shard) for shard in svc.keys.shards))


async def _sweep_shard(svc: Services, stop: asyncio.Event, shard: int) -> None:
    while not stop.is_set():
        try:
            for approval_id in await svc.approvals.due_for_expiry(shard):
                await svc.approvals.expire_by_id(shard, approval_id)  # counted in the store
            next_deadline = await svc.approvals.next_deadline(shard)
        except Exception as exc:
            log.warning("expiry sweep failed: %s", type(exc).__name__)
            next_deadline = None
        pause = 0.5 if next_deadline is None else min(0.5, next_deadline - svc.clock.now())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(0.05, pause))
