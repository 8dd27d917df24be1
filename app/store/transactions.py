"""Transactions that end the moment they start, with no approval behind them (a Duo passcode
checked, SMS passcodes sent): their answer, kept a few minutes for an asynchronous caller's
status poll, readable only by whoever started it."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
import redis.asyncio as aioredis

from app.store.redis import KeySpace

# As long as an approval's final state stays readable (app.approval.rules.FINAL_STATE_KEEP).
KEEP = 300


class EndedTransactions:
    """Keep and read the answer of a transaction that ended as it started."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace) -> None:
        self._redis = redis
        self._keys = keys

    def _key(self, txid: str) -> str:
        return self._keys("tx", txid)

    async def keep(self, txid: str, owner: str, answer: Mapping[str, str]) -> None:
        """Keep `answer` under `txid` for KEEP seconds, for `owner` to read."""
        record = orjson.dumps({"owner": owner, "answer": dict(answer)})
        await self._redis.set(self._key(txid), record, ex=KEEP)

    async def read(self, txid: str, owner: str) -> dict[str, str] | None:
        """The answer kept under `txid`, if `owner` started it and it is still kept."""
        raw = await self._redis.get(self._key(txid))
        if raw is None:
            return None
        record = orjson.loads(raw)
        if record.get("owner") != owner:
            return None
        answer: dict[str, str] = record["answer"]
        return answer
