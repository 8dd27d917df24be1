"""The Alembic history builds exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import DateTime, column, inspect, select, table, text
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from app.db import migrate
from app.db.engine import engine_from_url
from app.settings import Settings

MODEL_TABLES = set(SQLModel.metadata.tables)


def _schema_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, SQLModel.metadata))


async def _inspect(url: str) -> tuple[set[str], list[Any], str | None]:
    """Tables present, differences from the models, and the stamped revision."""
    engine = engine_from_url(url, pooled=False)
    try:
        async with engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
            diff = await conn.run_sync(_schema_diff)
            revision = await conn.run_sync(
                lambda c: MigrationContext.configure(c).get_current_revision()
            )
    finally:
        await engine.dispose()
    return tables, diff, revision


async def test_upgrade_on_sqlite_matches_the_models(fresh_sqlite_url: str) -> None:
    await migrate.upgrade_async(Settings(database_url=fresh_sqlite_url))

    tables, diff, revision = await _inspect(fresh_sqlite_url)

    assert diff == []
    assert tables == MODEL_TABLES | {"alembic_version"}
    assert revision == migrate.head_revision()


async def test_upgrade_on_postgres_matches_the_models(fresh_pg_url: str) -> None:
    await migrate.upgrade_async(Settings(database_url=fresh_pg_url))

    tables, diff, revision = await _inspect(fresh_pg_url)

    assert diff == []
    assert tables == MODEL_TABLES | {"alembic_version"}
    assert revision == migrate.head_revision()


async def test_upgrade_downgrade_upgrade_round_trips(any_db_url: str) -> None:
    settings = Settings(database_url=any_db_url)

    await migrate.upgrade_async(settings)
    await migrate.downgrade_async(settings, "base")
    tables, _, revision = await _inspect(any_db_url)
    assert tables <= {"alembic_version"}
    assert revision is None

    await migrate.upgrade_async(settings)
    tables, diff, revision = await _inspect(any_db_url)
    assert diff == []
    assert tables == MODEL_TABLES | {"alembic_version"}
    assert revision == migrate.head_revision()


async def test_sync_upgrade_works_inside_a_running_event_loop(fresh_sqlite_url: str) -> None:
    # The blocking form moves Alembic (which runs its own loop) onto a thread.
    migrate.upgrade(Settings(database_url=fresh_sqlite_url))

    _, diff, revision = await _inspect(fresh_sqlite_url)
    assert diff == []
    assert revision == migrate.head_revision()


async def test_upgrading_twice_is_a_no_op(fresh_sqlite_url: str) -> None:
    settings = Settings(database_url=fresh_sqlite_url)
    await migrate.upgrade_async(settings)
    await migrate.upgrade_async(settings)

    _, diff, revision = await _inspect(fresh_sqlite_url)
    assert diff == []
    assert revision == migrate.head_revision()


async def test_concurrent_upgrades_in_one_process_all_succeed(any_db_url: str) -> None:
    settings = Settings(database_url=any_db_url)

    await asyncio.gather(*(migrate.upgrade_async(settings) for _ in range(4)))

    _, diff, revision = await _inspect(any_db_url)
    assert diff == []
    assert revision == migrate.head_revision()


async def test_processes_starting_at_once_on_an_empty_database_all_migrate(
    any_db_url: str, tmp_path: Path
) -> None:
    # Several `tapprove serve` processes may start together on a fresh database.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPPROVE_")}
    env.update(TAPPROVE_DATABASE_URL=any_db_url, TAPPROVE_DATA_DIR=str(tmp_path))
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app.cli",
            "--json",
            "db",
            "upgrade",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(4)
    ]
    results = [await proc.communicate() for proc in procs]

    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()
        assert json.loads(out) == {"revision": migrate.head_revision()}
    _, diff, revision = await _inspect(any_db_url)
    assert diff == []
    assert revision == migrate.head_revision()


async def test_sqlite_upgrade_creates_the_data_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "yet" / "there"
    settings = Settings(data_dir=data_dir)

    await migrate.upgrade_async(settings)

    assert (data_dir / "tapprove.sqlite3").is_file()
    _, diff, _ = await _inspect(settings.sqlalchemy_url)
    assert diff == []


async def test_0003_remembers_every_device_an_account_ever_had(any_db_url: str) -> None:
    # An account whose devices were all revoked before the upgrade must not look brand new:
    # the first-device rule reads `second_factor_at`.
    settings = Settings(database_url=any_db_url)
    await migrate.upgrade_async(settings, "0002")
    # The tables as revision 0002 has them.
    user = table(
        "user",
        *(column(c) for c in ("id", "email", "password_hash", "email_verified")),
        *(column(c) for c in ("phone_verified", "sms_fallback", "locked", "created_at")),
    )
    device = table(
        "device",
        *(column(c) for c in ("id", "user_id", "name", "platform", "public_jwk")),
        *(column(c) for c in ("token_hash", "created_at", "revoked_at")),
    )
    code = table(
        "enrollmentcode", *(column(c) for c in ("code_hash", "user_id", "created_at", "expires_at"))
    )
    day = datetime(2026, 1, 1)
    engine = engine_from_url(any_db_url, pooled=False)
    try:
        async with engine.begin() as conn:
            for user_id in ("lost", "kept", "new"):
                await conn.execute(
                    user.insert().values(
                        id=user_id,
                        email=f"{user_id}@example.com",
                        password_hash="x",
                        email_verified=True,
                        phone_verified=False,
                        sms_fallback=True,
                        locked=False,
                        created_at=day,
                    )
                )
            for device_id, user_id, created_at, revoked_at in (
                ("d1", "lost", datetime(2026, 2, 1), datetime(2026, 3, 1)),
                ("d2", "kept", datetime(2026, 2, 2), datetime(2026, 3, 1)),
                ("d3", "kept", datetime(2026, 4, 1), None),
            ):
                await conn.execute(
                    device.insert().values(
                        id=device_id,
                        user_id=user_id,
                        name="Pixel",
                        platform="android",
                        public_jwk="{}",
                        token_hash=device_id,
                        created_at=created_at,
                        revoked_at=revoked_at,
                    )
                )
            await conn.execute(
                code.insert().values(code_hash="h", user_id="new", created_at=day, expires_at=day)
            )

        await migrate.upgrade_async(settings)

        async with engine.connect() as conn:
            upgraded = table(
                "user",
                column("id"),
                column("second_factor_at", DateTime()),
                column("device_enrollments"),
            )
            found = {row[0]: (row[1], row[2]) for row in await conn.execute(select(upgraded))}
            kind = (await conn.execute(text("SELECT kind FROM enrollmentcode"))).scalar_one()
    finally:
        await engine.dispose()
    assert found == {
        "kept": (datetime(2026, 2, 2), 2),
        "lost": (datetime(2026, 2, 1), 1),
        "new": (None, 0),
    }
    assert kind == "first_device"  # a code in flight is held to the strictest rule


async def test_0005_leaves_devices_enrolled_before_without_a_seed(any_db_url: str) -> None:
    # They get one over their socket on the next connection (docs/protocol.md §3.6).
    settings = Settings(database_url=any_db_url)
    await migrate.upgrade_async(settings, "0003")
    engine = engine_from_url(any_db_url, pooled=False)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO \"user\" (id, email, password_hash, email_verified,"
                    " phone_verified, sms_fallback, locked, created_at, device_enrollments)"
                    " VALUES ('u', 'u@example.com', 'x', true, false, true, false,"
                    " '2026-01-01', 1)"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO device (id, user_id, name, platform, public_jwk, token_hash,"
                    " created_at) VALUES ('d', 'u', 'Pixel', 'android', '{}', 'h', '2026-01-02')"
                )
            )

        await migrate.upgrade_async(settings)

        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT name, passcode_seed, passcode_confirmed_at, passcode_last_step"
                        " FROM device"
                    )
                )
            ).one()
    finally:
        await engine.dispose()
    assert tuple(row) == ("Pixel", None, None, None)


async def test_0006_leaves_integrations_made_before_without_enroll(any_db_url: str) -> None:
    settings = Settings(database_url=any_db_url)
    await migrate.upgrade_async(settings, "0005")
    engine = engine_from_url(any_db_url, pooled=False)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO integration (id, name, ikey, skey_sealed, match_mode,"
                    " created_at) VALUES ('i', 'vpn', 'DIAAAAAAAAAAAAAAAAAA', 'sealed',"
                    " 'confirm', '2026-01-01')"
                )
            )

        await migrate.upgrade_async(settings)

        async with engine.connect() as conn:
            row = (await conn.execute(text("SELECT name, allow_enroll FROM integration"))).one()
    finally:
        await engine.dispose()
    assert tuple(row) == ("vpn", False)
