"""The `tapprove` command, run as a real process on SQLite (data dir) and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import typer
from sqlmodel import func, select

from app.cli import app as cli_app
from app.core.clock import to_datetime
from app.db import accounts, migrate
from app.db.engine import make_engine, make_sessionmaker
from app.db.models import OutboxMessage, User
from app.settings import Settings
from tests.fixtures.db import Sessions

PASSWORD = "correct horse battery staple"
PUBLIC_URL = "https://mfa.example.com"
CONSOLE_SCRIPT = Path(sys.executable).parent / "tapprove"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CliRun:
    """One finished `tapprove` process."""

    code: int
    stdout: str
    stderr: str

    def only_object(self) -> dict[str, Any]:
        """The single JSON object stdout must hold, and nothing else."""
        text = self.stdout.strip()
        value, end = json.JSONDecoder().raw_decode(text)
        assert end == len(text), f"more than one JSON value on stdout: {self.stdout!r}"
        assert isinstance(value, dict)
        assert self.stdout.count("\n") == 1
        return value


@dataclass
class Cli:
    """Runs `python -m app.cli` (or the console script) with one test's environment."""

    env: dict[str, str]
    settings: Settings

    async def __call__(self, *args: str, stdin: str | None = None, script: bool = False) -> CliRun:
        command = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "app.cli"]
        proc = await asyncio.create_subprocess_exec(
            *command,
            *args,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), timeout=120
        )
        assert proc.returncode is not None
        return CliRun(proc.returncode, out.decode(), err.decode())

    async def sessions(self) -> AsyncIterator[Sessions]:
        engine = make_engine(self.settings)
        try:
            yield make_sessionmaker(engine)
        finally:
            await engine.dispose()


def _env(**tapprove: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPPROVE_")}
    env.update(tapprove)
    return env


@pytest.fixture(params=["sqlite", "postgresql"])
def cli(request: pytest.FixtureRequest, tmp_path: Path) -> Cli:
    """The CLI on a fresh data dir (embedded SQLite) or on a fresh PostgreSQL database."""
    data_dir = tmp_path / "var" / "tapprove"  # does not exist yet
    env = _env(TAPPROVE_DATA_DIR=str(data_dir), TAPPROVE_PUBLIC_URL=PUBLIC_URL)
    if request.param == "postgresql":
        env["TAPPROVE_DATABASE_URL"] = request.getfixturevalue("fresh_pg_url")
    settings = Settings(data_dir=data_dir, database_url=env.get("TAPPROVE_DATABASE_URL"))
    return Cli(env, settings)


@pytest.fixture
def pg_cli(tmp_path: Path, fresh_pg_url: str) -> Cli:
    """The CLI on a fresh PostgreSQL database."""
    env = _env(
        TAPPROVE_DATA_DIR=str(tmp_path / "var"),
        TAPPROVE_DATABASE_URL=fresh_pg_url,
        TAPPROVE_PUBLIC_URL=PUBLIC_URL,
    )
    return Cli(env, Settings(data_dir=tmp_path / "var", database_url=fresh_pg_url))


async def _user_count(cli: Cli) -> int:
    async for sessions in cli.sessions():
        async with sessions() as session:
            return (await session.exec(select(func.count()).select_from(User))).one()
    raise AssertionError("unreachable")


# --- the happy path, on both databases -------------------------------------------------------


async def test_a_fresh_install_runs_every_data_command_with_one_json_object_each(
    cli: Cli,
) -> None:
    added = await cli(
        "--json", "user", "add", "Alice@Example.com", "--password", PASSWORD,
        "--verified", "--phone", "+1 415 555 2671",
    )  # fmt: skip
    assert added.code == 0, added.stderr
    user = added.only_object()
    assert set(user) == {"user_id", "email"}
    assert user["email"] == "alice@example.com"
    assert re.fullmatch(r"[0-9a-f]{32}", user["user_id"])

    before = time.time()
    enrolled = await cli("device", "enroll-code", "alice@example.com", "--json")
    assert enrolled.code == 0, enrolled.stderr
    enroll = enrolled.only_object()
    assert set(enroll) == {"code", "uri", "expires_at"}
    uri = urlsplit(enroll["uri"])
    assert (uri.scheme, uri.netloc) == ("tapprove", "enroll")
    assert parse_qs(uri.query) == {"url": [PUBLIC_URL], "code": [enroll["code"]]}
    assert "url=https%3A%2F%2Fmfa.example.com&" in enroll["uri"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", enroll["expires_at"])
    expires = datetime.strptime(enroll["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before + 590 <= expires.timestamp() <= time.time() + 601

    created = await cli("apikey", "--json", "create", "shop")
    assert created.code == 0, created.stderr
    key = created.only_object()
    assert set(key) == {"name", "api_key"}
    assert key["name"] == "shop" and key["api_key"].startswith("tap_")
    spare = await cli("apikey", "--json", "create", "spare")
    assert spare.code == 0, spare.stderr
    spare_key = spare.only_object()["api_key"]
    revoked = await cli("apikey", "--json", "revoke", "spare")
    assert revoked.code == 0, revoked.stderr
    assert revoked.only_object() == {"name": "spare", "revoked": True}
    again = await cli("apikey", "--json", "revoke", "spare")
    assert again.code != 0 and again.only_object()["error"] == "unknown_api_key"

    unlocked = await cli("--json", "user", "unlock", "ALICE@example.com")
    assert unlocked.code == 0, unlocked.stderr
    assert unlocked.only_object() == {"email": "alice@example.com", "locked": False}

    listed = await cli("outbox", "--json")
    assert listed.code == 0, listed.stderr
    assert listed.only_object() == {"messages": []}

    upgraded = await cli("db", "upgrade", "--json")
    assert upgraded.code == 0, upgraded.stderr
    assert upgraded.only_object() == {"revision": migrate.head_revision()}

    # What the commands printed is what the database holds.
    async for sessions in cli.sessions():
        async with sessions.begin() as session:
            stored = await accounts.get_user_by_email(session, "alice@example.com")
            assert stored is not None and stored.id == user["user_id"]
            assert stored.email_verified and stored.phone == "+14155552671"
            assert stored.phone_verified
            assert accounts.verify_password(stored.password_hash, PASSWORD)
            found = await accounts.get_api_key_by_plaintext(session, key["api_key"])
            assert found is not None and found.name == "shop"
            assert await accounts.get_api_key_by_plaintext(session, spare_key) is None
            claimed = await accounts.consume_enrollment_code(session, enroll["code"], time.time())
            assert claimed == user["user_id"]


async def test_the_console_script_and_readable_text_without_json(cli: Cli) -> None:
    upgraded = await cli("db", "upgrade", script=True)
    assert upgraded.code == 0, upgraded.stderr
    assert migrate.head_revision() in upgraded.stdout

    added = await cli("user", "add", "bob@example.com", "--password", "-", stdin=PASSWORD + "\n")
    assert added.code == 0, added.stderr
    assert "bob@example.com" in added.stdout
    assert not added.stdout.lstrip().startswith("{")

    async for sessions in cli.sessions():
        async with sessions() as session:
            user = await accounts.get_user_by_email(session, "bob@example.com")
            assert user is not None and accounts.verify_password(user.password_hash, PASSWORD)


# --- errors ---------------------------------------------------------------------------------


async def test_errors_exit_non_zero_with_one_json_error_object(pg_cli: Cli) -> None:
    assert (await pg_cli("user", "add", "a@example.com", "--password", PASSWORD)).code == 0

    duplicate = await pg_cli("--json", "user", "add", "A@example.com", "--password", PASSWORD)
    assert duplicate.code == 1
    assert duplicate.only_object()["error"] == "duplicate_user"
    assert "already exists" in duplicate.stderr

    unknown = await pg_cli("device", "enroll-code", "nobody@example.com", "--json")
    assert unknown.code == 1
    body = unknown.only_object()
    assert set(body) == {"error", "message"}
    assert body["error"] == "unknown_user" and "nobody@example.com" in body["message"]

    malformed = await pg_cli("--json", "user", "add", "not-an-email", "--password", PASSWORD)
    assert malformed.code == 1
    assert malformed.only_object()["error"] == "invalid_request"

    usage = await pg_cli("--json", "user", "add")
    assert usage.code == 2
    assert usage.only_object()["error"] == "usage"
    assert "email" in usage.stderr.lower()


async def test_without_json_an_error_goes_to_stderr_only(pg_cli: Cli) -> None:
    failed = await pg_cli("user", "unlock", "nobody@example.com")

    assert failed.code == 1
    assert failed.stdout == ""
    assert "no user with email nobody@example.com" in failed.stderr


# --- user import ----------------------------------------------------------------------------


async def test_user_import_with_enrollment_codes(pg_cli: Cli, tmp_path: Path) -> None:
    imported_hash = accounts.hash_password("imported password")
    users_file = tmp_path / "users.jsonl"
    users_file.write_text(
        "\ufeff"  # a byte-order mark, as spreadsheet tools write
        + json.dumps({"email": "one@example.com", "password": PASSWORD})
        + "\n\n"
        + json.dumps({"email": "two@example.com", "password_hash": imported_hash,
                      "verified": True, "phone": "+447911123456"})
        + "\n",
        encoding="utf-8",
    )  # fmt: skip

    result = await pg_cli("--json", "user", "import", str(users_file), "--enroll-codes")

    assert result.code == 0, result.stderr
    users = result.only_object()["users"]
    assert [u["email"] for u in users] == ["one@example.com", "two@example.com"]
    assert all(set(u) == {"email", "user_id", "enroll_code"} for u in users)
    async for sessions in pg_cli.sessions():
        async with sessions.begin() as session:
            two = await accounts.get_user_by_email(session, "two@example.com")
            assert two is not None and two.password_hash == imported_hash
            assert two.email_verified and two.phone == "+447911123456"
            for user in users:
                claimed = await accounts.consume_enrollment_code(
                    session, user["enroll_code"], time.time()
                )
                assert claimed == user["user_id"]


async def test_user_import_is_all_or_nothing(pg_cli: Cli) -> None:
    lines = "\n".join(
        [
            json.dumps({"email": "one@example.com", "password": PASSWORD}),
            json.dumps({"email": "two@example.com", "password": PASSWORD}),
            json.dumps({"email": "three@example.com", "password_hash": "$2b$12$bcrypt"}),
        ]
    )

    failed = await pg_cli("user", "import", "-", "--json", stdin=lines)

    assert failed.code == 1
    body = failed.only_object()
    assert body["error"] == "invalid_import"
    assert body["message"].startswith("line 3: ")
    assert await _user_count(pg_cli) == 0

    plain = await pg_cli("user", "import", "-", stdin=lines.rsplit("\n", 1)[0])
    assert plain.code == 0, plain.stderr
    assert "Imported 2 user(s)." in plain.stdout
    assert "enroll code" not in plain.stdout
    assert await _user_count(pg_cli) == 2


# --- outbox and unlock ----------------------------------------------------------------------


async def test_outbox_lists_messages_and_filters_by_status(pg_cli: Cli) -> None:
    await migrate.upgrade_async(pg_cli.settings)
    now = time.time()
    async for sessions in pg_cli.sessions():
        async with sessions.begin() as session:
            for i, (status, error) in enumerate(
                [("sent", None), ("dead", "550 mailbox unavailable"), ("queued", None)]
            ):
                session.add(
                    OutboxMessage(
                        id=f"{i:032x}",
                        channel="email",
                        recipient=f"user{i}@example.com",
                        template="verify",
                        status=status,
                        attempts=i + 1,
                        last_error=error,
                        created_at=to_datetime(now + i),
                        next_attempt_at=to_datetime(now + i),
                        expires_at=to_datetime(now + 3600),
                    )
                )

    everything = await pg_cli("outbox", "--json")
    assert everything.code == 0, everything.stderr
    messages = everything.only_object()["messages"]
    assert [m["status"] for m in messages] == ["queued", "dead", "sent"]  # newest first
    assert all(set(m) == {"id", "channel", "status", "attempts", "last_error"} for m in messages)

    dead = await pg_cli("--json", "outbox", "--status", "dead")
    assert dead.only_object() == {
        "messages": [
            {
                "id": f"{1:032x}",
                "channel": "email",
                "status": "dead",
                "attempts": 2,
                "last_error": "550 mailbox unavailable",
            }
        ]
    }

    text = await pg_cli("outbox", "--status", "dead")
    assert "550 mailbox unavailable" in text.stdout and "dead" in text.stdout


async def test_unlock_clears_a_fraud_lock(pg_cli: Cli) -> None:
    assert (await pg_cli("user", "add", "a@example.com", "--password", PASSWORD)).code == 0
    async for sessions in pg_cli.sessions():
        async with sessions.begin() as session:
            await accounts.set_locked(session, "a@example.com", True, now=time.time())

    result = await pg_cli("--json", "user", "unlock", "a@example.com")

    assert result.only_object() == {"email": "a@example.com", "locked": False}
    async for sessions in pg_cli.sessions():
        async with sessions() as session:
            user = await accounts.get_user_by_email(session, "a@example.com")
            assert user is not None and not user.locked and user.locked_at is None


# --- help, version, and the README's command list ----------------------------------------


def cli_commands() -> dict[tuple[str, ...], Any]:
    """Every runnable command of the typer app, by its words (`("db", "upgrade")`)."""
    found: dict[tuple[str, ...], Any] = {}

    def walk(command: Any, path: tuple[str, ...]) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, (*path, name))
        else:
            found[path] = command

    walk(typer.main.get_command(cli_app), ())
    return found


# One real process prints every help page (a process per page would take a minute).
HELP_PAGES = """
import contextlib, io, json, sys
from app.cli import main
for words in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*words, "--help"])
    sys.stdout.write(out.getvalue() + "\f")
"""


def test_help_shows_no_type_on_flags_and_upper_case_placeholders() -> None:
    commands = [[], ["db"], ["user"], *(list(words) for words in cli_commands())]
    done = subprocess.run(
        [sys.executable, "-c", HELP_PAGES, json.dumps(commands)],
        env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pages = done.stdout.split("\f")[:-1]
    assert len(pages) == len(commands)

    for words, page in zip(commands, pages, strict=True):
        assert "<bool>" not in page, (words, page)
        assert page.startswith("Usage: tapprove"), (words, page)
        assert re.search(r"^  --help +Show this message and exit\.$", page, re.M), page
        # Usage line: {REQUIRED} and [OPTIONAL] placeholders, all upper case.
        placeholders = re.findall(r"[{\[]([^\]}]+)[}\]]", page.splitlines()[0])
        assert all(p.isupper() for p in placeholders), (words, page.splitlines()[0])
        # Argument names in their own section, and the value an option takes.
        names = re.findall(r"^  (\S+) <\w+>  ", page.split("Options:")[0], re.M)
        names += re.findall(r"^  --[a-z-]+ (\S+)  ", page.split("Options:")[-1], re.M)
        assert all(re.fullmatch(r"\+?[A-Z][A-Z0-9]*", n) for n in names), (words, names)


def test_version_prints_the_package_version() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    version = pyproject["project"]["version"]

    text = subprocess.run(
        [str(CONSOLE_SCRIPT), "--version"],
        env=_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    as_json = subprocess.run(
        [str(CONSOLE_SCRIPT), "--json", "--version"],
        env=_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert (text.returncode, text.stdout) == (0, f"tapprove {version}\n"), text.stderr
    assert as_json.returncode == 0, as_json.stderr
    assert CliRun(0, as_json.stdout, "").only_object() == {"version": version}


def test_the_readme_lists_every_command_with_options_it_has() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## CLI\n", 1)[1].split("\n## ", 1)[0]
    documented: dict[tuple[str, ...], str] = {}
    for usage in re.findall(r"^\| `(tapprove [^`]+)`", section, re.M):
        words = tuple(re.findall(r"(?<= )[a-z][a-z-]*(?= |$)", usage.split(" -", 1)[0]))
        documented[words] = usage
    commands = cli_commands()

    assert sorted(documented) == sorted(commands)
    for words, usage in documented.items():
        params = commands[words].params
        options = {opt for param in params for opt in param.opts if opt.startswith("-")}
        assert set(re.findall(r"--[a-z][a-z-]*", usage)) <= options, (words, usage)
        arguments = [param.metavar for param in params if not param.opts[0].startswith("-")]
        assert [w for w in usage.split() if w in arguments] == arguments, (words, usage)
