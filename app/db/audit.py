"""The audit log: who did what, when, from where; details are JSON and never hold secrets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

import orjson
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.core.clock import rfc3339, to_datetime
from app.core.redaction import REDACTED, is_secret
from app.db.models import AuditEvent

MAX_DETAIL_CHARS = 4000
MAX_RECENT = 500


class StreamedLine(Protocol):
    """An audit line read back from the audit stream (app.store.audit_stream)."""

    @property
    def stream_id(self) -> str: ...

    @property
    def fields(self) -> dict[str, Any]: ...


async def record(
    session: AsyncSession,
    kind: str,
    *,
    user_id: str | None = None,
    ip: str | None = None,
    device_id: str | None = None,
    approval_id: str | None = None,
    detail: dict[str, Any] | None = None,
    now: float,
) -> AuditEvent:
    """Add one audit event to the session (the caller commits it with the change it reports)."""
    event = AuditEvent(
        at=to_datetime(now),
        kind=kind[:64],
        user_id=user_id,
        ip=ip[:64] if ip is not None else None,
        device_id=device_id,
        approval_id=approval_id,
        detail=detail_json(detail or {}),
    )
    session.add(event)
    return event


def line(
    kind: str,
    *,
    now: float,
    user_id: str | None = None,
    ip: str | None = None,
    device_id: str | None = None,
    approval_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> bytes:
    """One audit event as the audit stream carries it (app.store.audit_stream); the Lua
    scripts that append it write the change it reports in the same step."""
    return orjson.dumps(
        {
            "at": now,
            "kind": kind,
            "user_id": user_id,
            "ip": ip,
            "device_id": device_id,
            "approval_id": approval_id,
            "detail": detail_json(detail or {}),
        }
    )


def _row(event: StreamedLine) -> dict[str, Any]:
    """The `auditevent` row of a streamed line (fields cut to their column sizes)."""
    data = event.fields

    def text(name: str, size: int) -> str | None:
        value = data.get(name)
        return str(value)[:size] if value is not None else None

    at = data.get("at")
    return {
        "at": to_datetime(float(at) if isinstance(at, int | float) else 0.0),
        "kind": text("kind", 64) or "unknown",
        "user_id": text("user_id", 32),
        "ip": text("ip", 64),
        "device_id": text("device_id", 32),
        "approval_id": text("approval_id", 32),
        "detail": text("detail", MAX_DETAIL_CHARS) or "{}",
        "stream_id": event.stream_id,
    }


async def insert_streamed(session: AsyncSession, events: Sequence[StreamedLine]) -> None:
    """Add streamed audit lines in one statement; lines stored before are skipped."""
    rows = [_row(event) for event in events if event.fields]
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # One statement whatever the batch size, so SQLAlchemy compiles it once per process;
    # the rows go as executemany parameters (batched into multi-row INSERTs by the driver).
    statement = insert(AuditEvent).on_conflict_do_nothing(index_elements=["stream_id"])
    await session.exec(statement, params=rows)


def as_event(event: StreamedLine) -> AuditEvent:
    """A streamed line not yet in SQL, shaped like a stored row (no `id` yet)."""
    return AuditEvent(**_row(event))


async def recent(session: AsyncSession, user_id: str, limit: int = 50) -> list[AuditEvent]:
    """The user's latest audit events, newest first."""
    limit = max(1, min(limit, MAX_RECENT))
    result = await session.exec(
        select(AuditEvent)
        .where(AuditEvent.user_id == user_id)
        .order_by(col(AuditEvent.at).desc(), col(AuditEvent.id).desc())
        .limit(limit)
    )
    return list(result.all())


def event_json(event: AuditEvent) -> dict[str, Any]:
    """An audit event as the JSON the account page's activity list shows."""
    try:
        detail = json.loads(event.detail)
    except ValueError:
        detail = {}
    return {
        "id": event.id,
        "at": rfc3339(event.at),
        "kind": event.kind,
        "ip": event.ip,
        "device_id": event.device_id,
        "approval_id": event.approval_id,
        "detail": detail,
    }


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            str(key): REDACTED if is_secret(str(key)) else _scrub(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    return value


def detail_json(detail: dict[str, Any]) -> str:
    """A detail as stored: secrets redacted, compact, at most MAX_DETAIL_CHARS."""
    text = orjson.dumps(_scrub(detail), option=orjson.OPT_SORT_KEYS, default=str).decode()
    if len(text) <= MAX_DETAIL_CHARS:
        return text
    # Cutting the JSON would leave it unreadable; keep which keys there were instead.
    return json.dumps({"truncated": True, "keys": sorted(str(k) for k in detail)[:50]})
