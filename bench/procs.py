"""The processes a benchmark run owns: a private redis-server, a throw-away PostgreSQL
database, `tapprove serve` / `tapprove worker` (or the bare baseline), and what /proc says
about them (CPU seconds, RSS).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parent.parent
TAPPROVE = str(Path(sys.executable).with_name("tapprove"))
PG_ADMIN_DSN = os.environ.get(
    "TAPPROVE_BENCH_PG_DSN",
    os.environ.get("TAPPROVE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"),
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    for wanted in (1_048_576, target):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
            break
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- /proc ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may hold spaces; fields are counted after its closing parenthesis.
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc/<pid>/status (VmRSS); 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat, for a busy fraction."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return float(total - idle), float(total)


def listen_overflows() -> int:
    """Connections the kernel dropped because a listening socket's queue was full (all
    sockets of the machine: /proc/net/netstat, TcpExt ListenOverflows)."""
    try:
        lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    except OSError:
        return 0
    for names, values in itertools.pairwise(lines):
        if names[0] == "TcpExt:" and values[0] == "TcpExt:" and "ListenOverflows" in names:
            return int(values[names.index("ListenOverflows")])
    return 0


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def process_counters(pid: int) -> dict[str, int]:
    """Read/write syscalls (/proc/<pid>/io) and context switches (/proc/<pid>/status).

    Per flow, these count round trips whatever the machine's load: every message to Redis,
    PostgreSQL or a client is a write, and every wait for an answer a voluntary switch.
    """
    found: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("syscr", "syscw"):
                found[key] = int(value)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                found[key] = int(value)
    except OSError:
        pass
    return found


@dataclass
class Snapshot:
    """CPU seconds per pid of each named group, syscall counters of some, and the machine."""

    cpu: dict[str, dict[int, float]]
    counters: dict[str, dict[int, dict[str, int]]]
    machine_busy: float
    machine_total: float
    wall: float


def cpu_snapshot(
    pids: Mapping[str, Iterable[int]], counted: Iterable[str] = ("server",)
) -> Snapshot:
    """CPU seconds of every pid by group; syscalls and switches for the `counted` groups."""
    busy, total = machine_cpu()
    wanted = set(counted)
    return Snapshot(
        cpu={name: {p: cpu_seconds(p) for p in group} for name, group in pids.items()},
        counters={
            name: {p: process_counters(p) for p in group}
            for name, group in pids.items()
            if name in wanted
        },
        machine_busy=busy,
        machine_total=total,
        wall=time.monotonic(),
    )


def cpu_delta(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds used per group between two snapshots (pids alive at both), the machine's
    busy share, and the wall time between them."""
    out: dict[str, float] = {}
    for name, first in before.cpu.items():
        last = after.cpu.get(name, {})
        out[name] = round(sum(last[p] - first[p] for p in first if last.get(p)), 3)
    total = after.machine_total - before.machine_total
    out["machine_busy_fraction"] = round(
        (after.machine_busy - before.machine_busy) / total if total else 0.0, 3
    )
    out["wall"] = round(after.wall - before.wall, 3)
    return out


def counter_delta(before: Snapshot, after: Snapshot) -> dict[str, dict[str, int]]:
    """Syscalls and context switches per counted group between two snapshots."""
    out: dict[str, dict[str, int]] = {}
    for name, first in before.counters.items():
        last = after.counters.get(name, {})
        sums: dict[str, int] = {}
        for pid, values in first.items():
            for key, value in values.items():
                if key in last.get(pid, {}):
                    sums[key] = sums.get(key, 0) + last[pid][key] - value
        out[name] = sums
    return out


# --- child processes --------------------------------------------------------------------


@dataclass
class Child:
    """One subprocess we started; stopped by its own pid only."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)
    env: Mapping[str, str] | None = None

    def respawn(self) -> Child:
        """The same command started again (after `stop`), its output appended to the log."""
        return spawn(self.name, self.argv, self.log_path, self.env, append=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    *,
    append: bool = False,
) -> Child:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab" if append else "wb")
    proc = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=str(REPO),
    )
    log.close()
    return Child(name, proc, log_path, argv, env)


def wait_http(url: str, child: Child, timeout: float = 30.0) -> None:
    """Poll `url` until it answers 200; fail with the child's log if it dies or is slow."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited early:\n{child.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} did not answer {url} in {timeout:.0f} s:\n{child.log_tail()}")


@dataclass
class PrivateRedis:
    """A redis-server of our own on a random port, with no persistence."""

    child: Child
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, workdir: Path) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server)")
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        argv = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            # Enough clients for every socket's server-side and pub/sub connections.
            "--maxclients", "20000",
            "--protected-mode", "no",
        ]  # fmt: skip
        child = spawn("redis", argv, workdir / "redis.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"redis-server exited:\n{child.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return cls(child, port, workdir)
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @staticmethod
    def version_text() -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            return "redis-server not found"
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
        return out.stdout.strip()


@dataclass
class ScratchDatabase:
    """A PostgreSQL database created for one run and dropped at its end."""

    name: str
    url: str  # SQLAlchemy async URL
    server_version: str = ""
    backend_pids: list[int] = field(default_factory=list)

    @classmethod
    async def create(cls) -> ScratchDatabase:
        name = f"tapprove_bench_{secrets.token_hex(5)}"
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
            version = str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()
        base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        return cls(name, f"{base}/{name}", version)

    async def backends(self) -> list[int]:
        """Pids of the PostgreSQL backends connected to this database right now."""
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.name
            )
        finally:
            await conn.close()
        return [int(r["pid"]) for r in rows]

    async def counters(self) -> dict[str, int]:
        """This database's transaction and row counters (pg_stat_database; flushed ~1 s late)."""
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            row = await conn.fetchrow(
                "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, "
                "tup_updated, tup_deleted FROM pg_stat_database WHERE datname = $1",
                self.name,
            )
        finally:
            await conn.close()
        return {key: int(value) for key, value in dict(row or {}).items()}

    async def drop(self) -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await conn.close()


async def postgres_version() -> str:
    try:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
    except (OSError, asyncpg.PostgresError) as exc:
        return f"unreachable ({type(exc).__name__})"
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def redis_commands(url: str) -> dict[str, int]:
    """Calls per command from INFO commandstats (commands run inside Lua scripts count too);
    on a Redis Cluster, summed over its masters (a replica's copies are not work asked)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        nodes = [client]
        if (await client.info("cluster")).get("cluster_enabled"):
            slots = await client.execute_command("CLUSTER SLOTS")
            masters = {(row[2][0], int(row[2][1])) for row in slots}
            nodes = [
                aioredis.Redis(host=host.decode() if isinstance(host, bytes) else host, port=port)
                for host, port in masters
            ]
        found: dict[str, int] = {}
        for node in nodes:
            stats = await node.info("commandstats")
            for name, value in stats.items():
                if isinstance(value, dict) and "calls" in value:
                    key = name.removeprefix("cmdstat_")
                    found[key] = found.get(key, 0) + int(value["calls"])
            if node is not client:
                await node.aclose()
    finally:
        await client.aclose()
    return found


def tapprove_env(
    *, redis_url: str, database_url: str, public_url: str, origin: str, data_dir: Path
) -> dict[str, str]:
    """The TAPPROVE_* environment every tapprove process of a run shares."""
    return {
        "TAPPROVE_REDIS_URL": redis_url,
        "TAPPROVE_DATABASE_URL": database_url,
        "TAPPROVE_REDIS_PREFIX": "tapprove:",
        "TAPPROVE_PUBLIC_URL": public_url,
        "TAPPROVE_ALLOWED_ORIGINS": origin,
        "TAPPROVE_LOG_FORMAT": "json",
        "TAPPROVE_DATA_DIR": str(data_dir),
        "TAPPROVE_APPROVAL_TTL": "120",
    }


def run_cli(args: list[str], env: Mapping[str, str], stdin: bytes | None = None) -> str:
    """Run `tapprove ARGS --json` and return its stdout (raises with stderr on failure)."""
    result = subprocess.run(
        [TAPPROVE, *args, "--json"],
        input=stdin,
        capture_output=True,
        env={**os.environ, **env},
        cwd=str(REPO),
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"tapprove {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout.decode(errors='replace')}\n{result.stderr.decode(errors='replace')}"
        )
    return result.stdout.decode()
