"""Every Redis key and channel name of the approval: the only place they are spelled.

Only the approval store (app.approval.store) uses this. An approval's keys and its user's
share the user's shard hash tag (app.store.redis.KeySpace), which the approval id names, so
a script that creates or ends an approval touches one Redis Cluster slot, and any process
finds an approval's keys from its id alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.approval.model import shard_of_id
from app.store.redis import KeySpace


@dataclass(frozen=True, slots=True)
class ApprovalKeySet:
    """The keys of one approval, and the channel its deliveries are announced on."""

    shard: int
    hash: str  # PendingApproval.to_fields(), plus delivery bookkeeping
    acks: str  # set: devices that acknowledged it
    inflight: str  # set: one ticket per delivery under way (app.delivery.dispatch)
    waiters: str  # set: inbox channels of processes waiting for its end
    delivered: str  # channel: each channel that reached the person (the browser's stream)


@dataclass(frozen=True, slots=True)
class UserKeySet:
    """The approval keys of one user."""

    pending: str  # string: the id of the user's one pending approval
    fatigue: str  # hash: failures, next_at (push-fatigue backoff)


class ApprovalKeys:
    """Key names of approvals, their users and their shards."""

    def __init__(self, space: KeySpace) -> None:
        self.space = space

    def shard_of(self, approval_id: str) -> int | None:
        """The shard an approval id names; None when no approval of ours has that id."""
        shard = shard_of_id(approval_id)
        return shard if shard is not None and shard in self.space.shards else None

    def approval(self, approval_id: str, shard: int) -> ApprovalKeySet:
        base = self.space.in_shard(shard, "approval", approval_id)
        return ApprovalKeySet(
            shard=shard,
            hash=base,
            acks=f"{base}:acks",
            inflight=f"{base}:inflight",
            waiters=f"{base}:waiters",
            delivered=self.space.in_shard(shard, "ev", "approval", approval_id, "delivered"),
        )

    def user(self, user_id: str) -> UserKeySet:
        shard = self.space.shard_of(user_id)
        return UserKeySet(
            pending=self.space.in_shard(shard, "user", user_id, "pending"),
            fatigue=self.space.in_shard(shard, "user", user_id, "fatigue"),
        )

    def deadlines(self, shard: int) -> str:
        """ZSET of the shard's pending approval ids, scored by their deadline."""
        return self.space.in_shard(shard, "approvals", "deadlines")
