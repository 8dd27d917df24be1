"""`tapprove integration create/list/revoke` as real processes, and what they leave in SQL:
the skey is printed once and stored only sealed, bound to its integration."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from app.db.engine import make_engine, make_sessionmaker
from app.db.models import Integration
from app.duo.integrations import SEAL_PURPOSE, IntegrationDirectory, opened
from app.server_keys import SealError, SecretBox, secret_key
from app.settings import Settings

pytestmark = pytest.mark.timeout(180)

PUBLIC_URL = "https://mfa.example.com:8443"


class Cli:
    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.settings = Settings(
            data_dir=tmp_path / "data", database_url=database_url, public_url=PUBLIC_URL
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TAPPROVE_")}
        self.env.update(
            TAPPROVE_DATA_DIR=str(tmp_path / "data"),
            TAPPROVE_DATABASE_URL=database_url,
            TAPPROVE_PUBLIC_URL=PUBLIC_URL,
        )

    async def run(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app.cli", *args, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def json(self, *args: str) -> dict[str, Any]:
        code, out, err = await self.run(*args, "--json")
        assert code == 0, err
        assert out.count("\n") == 1, out  # exactly one object
        found: dict[str, Any] = json.loads(out)
        return found

    async def rows(self) -> list[Integration]:
        engine = make_engine(self.settings)
        try:
            async with make_sessionmaker(engine)() as session:
                return list((await session.exec(select(Integration))).all())
        finally:
            await engine.dispose()


@pytest.fixture
def cli(tmp_path: Path, fresh_pg_url: str) -> Cli:
    return Cli(tmp_path, fresh_pg_url)


async def test_create_prints_the_keys_once_and_stores_the_skey_sealed(cli: Cli) -> None:
    created = await cli.json("integration", "create", "ssh-bastion")

    assert set(created) == {"name", "ikey", "skey", "api_host"}
    assert created["name"] == "ssh-bastion"
    assert re.fullmatch(r"DI[A-Z0-9]{18}", created["ikey"])
    assert re.fullmatch(r"[A-Za-z0-9]{40}", created["skey"])
    assert created["api_host"] == "mfa.example.com:8443"
    [row] = await cli.rows()
    assert row.ikey == created["ikey"] and row.match_mode == "confirm"
    assert created["skey"] not in row.skey_sealed
    box = SecretBox(secret_key(cli.settings), "duo-skey")
    assert opened(row, box).skey == created["skey"]
    listed = await cli.json("integration", "list")
    assert created["skey"] not in json.dumps(listed)
    assert listed["integrations"][0]["ikey"] == created["ikey"]


async def test_a_sealed_skey_does_not_open_on_another_integration(cli: Cli) -> None:
    await cli.json("integration", "create", "one")
    await cli.json("integration", "create", "two")
    one, two = sorted(await cli.rows(), key=lambda r: r.name)
    box = SecretBox(secret_key(cli.settings), "duo-skey")
    two.skey_sealed = one.skey_sealed  # a copied row: the seal is bound to the ikey
    with pytest.raises(SealError):
        opened(two, box)
    with pytest.raises(SealError):
        opened(one, SecretBox(secret_key(cli.settings), "other-purpose"))


async def test_options_names_and_revocation(cli: Cli) -> None:
    await cli.json("integration", "create", "web", "--match-mode", "typed",
                   "--username-domain", "@Example.COM")  # fmt: skip
    [row] = await cli.rows()
    assert (row.match_mode, row.username_domain) == ("typed", "example.com")

    code, out, _ = await cli.run("integration", "create", "web", "--json")
    assert code == 1 and json.loads(out)["error"] == "duplicate_integration"
    code, out, _ = await cli.run("integration", "create", "x", "--match-mode", "sms", "--json")
    assert code == 1 and json.loads(out)["error"] == "invalid_request"
    code, out, _ = await cli.run("integration", "create", "y", "--username-domain", "a b",
                                 "--json")  # fmt: skip
    assert code == 1 and json.loads(out)["error"] == "invalid_request"

    assert await cli.json("integration", "revoke", "web") == {"name": "web", "revoked": True}
    code, out, _ = await cli.run("integration", "revoke", "web", "--json")
    assert code == 1 and json.loads(out)["error"] == "unknown_integration"
    listed = await cli.json("integration", "list")
    assert listed["integrations"][0]["revoked_at"] is not None


async def test_enroll_is_off_unless_the_integration_is_created_with_allow_enroll(
    cli: Cli,
) -> None:
    await cli.json("integration", "create", "plain")
    await cli.json("integration", "create", "idp", "--allow-enroll")
    rows = {row.name: row for row in await cli.rows()}
    assert (rows["plain"].allow_enroll, rows["idp"].allow_enroll) == (False, True)
    listed = {i["name"]: i for i in (await cli.json("integration", "list"))["integrations"]}
    assert (listed["plain"]["allow_enroll"], listed["idp"]["allow_enroll"]) == (False, True)
    box = SecretBox(secret_key(cli.settings), SEAL_PURPOSE)
    assert opened(rows["idp"], box).allow_enroll and not opened(rows["plain"], box).allow_enroll


async def test_the_directory_serves_live_integrations_only(cli: Cli) -> None:
    live = await cli.json("integration", "create", "live")
    gone = await cli.json("integration", "create", "gone")
    await cli.json("integration", "revoke", "gone")
    engine = make_engine(cli.settings)
    try:
        box = SecretBox(secret_key(cli.settings), "duo-skey")

        class Clock:
            def now(self) -> float:
                return 0.0

        directory = IntegrationDirectory(make_sessionmaker(engine), box, Clock())
        found = await directory.by_ikey(live["ikey"])
        assert found is not None and found.skey == live["skey"] and found.name == "live"
        assert await directory.by_ikey(gone["ikey"]) is None
        assert await directory.by_ikey("DI" + "0" * 18) is None
        assert await directory.by_ikey("x\x00" * 10) is None
    finally:
        await engine.dispose()


async def test_serve_refuses_half_or_missing_tls_files(cli: Cli, tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not really a certificate")
    for args in (
        ["--tls-cert", str(cert)],
        ["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(cert)],
    ):
        code, out, _ = await cli.run("serve", "--port", "1", *args, "--json")
        assert code == 1 and json.loads(out)["error"] == "invalid_settings", out
