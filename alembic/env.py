"""Alembic environment: migrates the database tapprove is configured for, on its async engine.

The URL comes from `config.attributes["url"]` (set by app.db.migrate), else `-x url=...`,
else app.settings.Settings().sqlalchemy_url (TAPPROVE_DATABASE_URL / TAPPROVE_DATA_DIR).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
from collections.abc import Iterator
from logging.config import fileConfig
from pathlib import Path

from sqlalchemy import make_url, text
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import app.db.models  # noqa: F401  (registers every table on SQLModel.metadata)
from alembic import context
from app.db.engine import engine_from_url
from app.settings import Settings

config = context.config

# Only the `alembic` command line configures logging from the ini file; code that calls
# app.db.migrate keeps its own logging untouched.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = SQLModel.metadata

# A fixed key for PostgreSQL's advisory lock, so concurrent upgrades (several `tapprove serve`
# processes starting at once) run one after another instead of colliding.
PG_MIGRATION_LOCK_KEY = 7_461_707_072


def database_url() -> str:
    """The URL to migrate: explicit attribute, then `-x url=`, then the tapprove settings."""
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    return str(url) if url else Settings().sqlalchemy_url


def run_migrations_offline() -> None:
    """Emit the SQL script instead of running it (`alembic upgrade head --sql`)."""
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=make_url(url).get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on one synchronous connection, under a cross-process lock."""
    dialect = connection.dialect.name
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode copies the table instead.
        render_as_batch=dialect == "sqlite",
        compare_type=True,
    )
    lock_key = {"key": PG_MIGRATION_LOCK_KEY}
    if dialect == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:key)"), lock_key)
        connection.commit()
    try:
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if dialect == "postgresql":
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), lock_key)
            connection.commit()
    if dialect == "sqlite":
        # Migrations run with foreign keys off (batch mode drops and copies tables); make sure
        # they left no dangling reference behind.
        problems = connection.execute(text("PRAGMA foreign_key_check")).fetchall()
        if problems:
            raise RuntimeError(f"migration left broken foreign keys: {problems[:5]}")


async def run_async_migrations(url: str) -> None:
    """Open a one-off connection on the async engine and migrate through it."""
    engine = engine_from_url(url, pooled=False, sqlite_foreign_keys=False)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


@contextlib.contextmanager
def sqlite_file_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock file next to a SQLite database while migrating it."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).expanduser().with_name(Path(database).name + ".migrate-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_migrations_online() -> None:
    """Migrate a live database (the caller must not be inside a running event loop)."""
    url = database_url()
    with sqlite_file_lock(url):
        asyncio.run(run_async_migrations(url))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
