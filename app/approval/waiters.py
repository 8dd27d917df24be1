"""Waiting for an approval to end, without a Redis subscription per wait.

Each process listens on inbox channels of its own (`{s<k>}:ev:proc:<process id>`, one per
shard k, so the script that ends an approval publishes within its slot). A waiter
registers its process's inbox on the approval in the same Lua step that reads it
(ApprovalStore.watch), and the step that ends an approval (the `finalize` Lua library)
publishes the result to every inbox registered. A relying party's long
poll or a browser's stream thus costs one round trip to start, where a subscription of
its own cost SUBSCRIBE, a read and UNSUBSCRIBE, with a confirmation for each.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from app.approval.model import PendingApproval
from app.approval.store import ApprovalStore
from app.store.events import RECONNECTED, Event, EventBus, Listener
from app.store.redis import KeySpace


class Waiters:
    """This process's waits for approvals to end, fed from its inbox."""

    def __init__(
        self, events: EventBus, approvals: ApprovalStore, keys: KeySpace, process_id: str
    ) -> None:
        self._events = events
        self._approvals = approvals
        # One inbox per shard: the script that ends an approval publishes in its own slot.
        self._inboxes = [keys.process_inbox(process_id, shard) for shard in keys.shards]
        self._local: dict[str, list[Listener]] = {}
        # Shards whose inbox this process listens on: each from its first wait on, so a
        # shard that is down fails only the waits on its own approvals.
        self._listening: set[int] = set()
        self._lock = asyncio.Lock()

    async def _listen(self, shard: int) -> None:
        async with self._lock:
            if shard not in self._listening:
                await self._events.add_listener(self._on_event, self._inboxes[shard])
                self._listening.add(shard)

    @contextlib.asynccontextmanager
    async def watch(
        self, approval_id: str, listener: Listener
    ) -> AsyncIterator[PendingApproval | None]:
        """The approval as it is now (None when unknown); while the block runs, `listener`
        gets its `result` event when it ends, and RECONNECTED when events may have been
        missed (then read the approval again)."""
        shard = self._approvals.keys.shard_of(approval_id)
        shard = 0 if shard is None else shard  # no such approval: watch says so
        if shard not in self._listening:
            await self._listen(shard)
        waiting = self._local.setdefault(approval_id, [])
        waiting.append(listener)
        try:
            yield await self._approvals.watch(approval_id, self._inboxes[shard])
        finally:
            waiting.remove(listener)
            if not waiting:
                del self._local[approval_id]

    def _on_event(self, event: Event) -> None:
        if event is RECONNECTED:
            targets = [each for listeners in self._local.values() for each in listeners]
        else:
            targets = list(self._local.get(str(event.get("id")), ()))
        for listener in targets:
            listener(event)
