"""The async SQL engine and session factory: SQLite (embedded default) or PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db import models as _models  # noqa: F401  (registers every table on SQLModel.metadata)
from app.settings import Settings

# How long a SQLite writer waits for the write lock before failing with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 5000


def make_engine(settings: Settings) -> AsyncEngine:
    """The process-wide engine for the configured database (pooled; dispose it on shutdown)."""
    return engine_from_url(settings.sqlalchemy_url)


def engine_from_url(
    url: str | URL,
    *,
    pooled: bool = True,
    sqlite_foreign_keys: bool = True,
) -> AsyncEngine:
    """An async engine for `url`; SQLite gets its directory, WAL, a busy timeout and FK checks.

    `pooled=False` suits one-shot users such as migrations; `sqlite_foreign_keys=False`
    lets Alembic's batch mode copy and drop referenced tables.
    """
    parsed = make_url(url)
    # SQL parameters hold secrets (queued mail with its link, push tokens): never log them,
    # not even with DEBUG logging, nor in the text of a database error.
    kwargs: dict[str, Any] = {"hide_parameters": True}
    if parsed.get_backend_name() == "sqlite":
        _ensure_sqlite_dir(parsed)
    elif pooled:
        # No pre-ping: it costs a round trip on every checkout (12 per approval flow). After a
        # database restart the first statement on a dead connection fails once and SQLAlchemy
        # then discards every connection older than that failure. Recycling stays under
        # typical proxy/firewall idle cut-offs.
        kwargs.update(pool_size=10, max_overflow=20, pool_recycle=1800)
    if not pooled:
        kwargs["poolclass"] = NullPool
    engine = create_async_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        _install_sqlite_pragmas(engine, foreign_keys=sqlite_foreign_keys)
    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded rows usable after commit (no lazy reloads in async code)."""
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def create_all(engine: AsyncEngine) -> None:
    """Create every table directly from the models; for tests only, production uses Alembic."""
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.create_all)


def _ensure_sqlite_dir(url: URL) -> None:
    database = url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _install_sqlite_pragmas(engine: AsyncEngine, *, foreign_keys: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            # WAL lets readers run while one writer commits; NORMAL is durable enough under WAL.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        finally:
            cursor.close()
