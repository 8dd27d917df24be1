"""One benchmark run: start a target (tapprove or the baseline) with its own Redis, drive it
with the load generator through every scenario, and collect the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import PASSWORD, procs
from bench.cluster import PrivateCluster
from bench.population import (
    Population,
    baseline_population,
    insert_idle_devices,
    populate_tapprove,
    wait_outbox_drained,
)

ORIGIN = "http://bench.invalid"
# Sockets per holder process, well under a default 20k open-file limit and the ~28k
# ephemeral ports of one source address.
PER_HOLDER = 12_000
FD_MARGIN = 500
# Paced phases draw each think time from 0.5 to 1.5 times the plan's (loadgen.run_phase).
PACED_JITTER = 0.5


@dataclass
class Plan:
    """How long and how hard each scenario runs (see `plans()` for the presets)."""

    name: str
    levels: list[int]  # relying-party flows in flight, one phase each
    light: int  # the "light load" level (10 flows in flight)
    warmup: float
    duration: float
    light_duration: float
    think_ms: float  # back to back: the phone answers this soon after the request arrives
    # Light load: the phone answers this long after the request arrives, so 10 flows in
    # flight leave the server mostly idle (a person takes seconds; this is far quicker).
    paced_think_ms: float
    browser_concurrency: int
    browser_duration: float
    login_load: int  # concurrent password logins that keep argon2id busy
    argon2_duration: float
    sockets: int
    idle_flow_duration: float
    idle_cpu_window: float
    connect_deadline: float  # idle sockets not connected by then are reported as not tried
    # The reconnect storm (the idle sockets, after a server restart): how long the phones
    # get to come back before the rest are reported as not ready.
    storm_deadline: float
    max_warmup: float = 12.0  # a phase waits up to this long for every worker to finish once
    servers: int = 1
    baseline: bool = True
    scenarios: list[str] = field(
        default_factory=lambda: [
            "light", "saturation", "browser", "argon2", "idle", "duo", "storm"
        ]
    )

    @property
    def phones(self) -> int:
        return max([*self.levels, self.light, self.browser_concurrency])


def plans() -> dict[str, Plan]:
    return {
        "full": Plan(
            name="full",
            levels=[1, 5, 10, 25, 50, 100],
            light=10,
            warmup=2.0,
            duration=6.0,
            light_duration=12.0,
            think_ms=10,
            paced_think_ms=250,
            browser_concurrency=12,
            browser_duration=10.0,
            login_load=8,
            argon2_duration=10.0,
            sockets=10_000,
            idle_flow_duration=6.0,
            idle_cpu_window=5.0,
            connect_deadline=120.0,
            storm_deadline=300.0,
        ),
        "quick": Plan(
            name="quick",
            levels=[1, 10, 50],
            light=10,
            warmup=1.0,
            duration=2.5,
            light_duration=5.0,
            think_ms=10,
            paced_think_ms=250,
            browser_concurrency=8,
            browser_duration=2.5,
            login_load=8,
            argon2_duration=3.0,
            sockets=1_000,
            idle_flow_duration=2.0,
            idle_cpu_window=1.0,
            connect_deadline=15.0,
            storm_deadline=60.0,
            max_warmup=5.0,
        ),
        "smoke": Plan(
            name="smoke",
            levels=[2],
            light=2,
            warmup=1.0,
            duration=2.0,
            light_duration=2.0,
            think_ms=5,
            paced_think_ms=50,
            browser_concurrency=1,
            browser_duration=1.5,
            login_load=1,
            argon2_duration=1.5,
            sockets=20,
            idle_flow_duration=1.0,
            idle_cpu_window=0.5,
            connect_deadline=20.0,
            storm_deadline=30.0,
            max_warmup=5.0,
            baseline=False,
        ),
    }


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Target:
    """A started system under test: its servers, helpers and everything to stop afterwards."""

    kind: str  # "tapprove" | "tapprove-cluster" | "baseline"
    urls: list[str]
    pids: dict[str, list[int]]
    population: Population
    children: list[procs.Child]
    redis: procs.PrivateRedis | PrivateCluster
    db: procs.ScratchDatabase | None = None
    setup_s: dict[str, float] = field(default_factory=dict)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.redis.child.stop()


async def start_tapprove(
    plan: Plan, workdir: Path, idle: int, *, cluster: bool = False
) -> Target:
    """Private Redis (or a private 3-master cluster), a fresh database, `tapprove worker` and
    N `tapprove serve --no-worker`."""
    timings: dict[str, float] = {}
    began = time.monotonic()
    redis: procs.PrivateRedis | PrivateCluster = (
        PrivateCluster.start(workdir / "redis") if cluster
        else procs.PrivateRedis.start(workdir / "redis")
    )
    db = await procs.ScratchDatabase.create()
    ports = [procs.free_port() for _ in range(plan.servers)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    env = procs.tapprove_env(
        redis_url=redis.url,
        database_url=db.url,
        public_url=urls[0],
        origin=ORIGIN,
        data_dir=workdir / "data",
    )
    if cluster:
        env["TAPPROVE_REDIS_CLUSTER"] = "true"
    children: list[procs.Child] = []
    kind = "tapprove-cluster" if cluster else "tapprove"
    target = Target(kind, urls, {}, Population("", [], []), children, redis, db)
    try:
        procs.run_cli(["db", "upgrade"], env)
        timings["migrate"] = round(time.monotonic() - began, 2)
        children.append(
            procs.spawn("worker", [procs.TAPPROVE, "worker"], workdir / "worker.log", env)
        )
        for i, port in enumerate(ports):
            argv = [procs.TAPPROVE, "serve", "--no-worker", "--host", "127.0.0.1",
                    "--port", str(port)]
            children.append(procs.spawn(f"server-{i}", argv, workdir / f"server-{i}.log", env))
        for child, url in zip(children[1:], urls, strict=True):
            await asyncio.to_thread(procs.wait_http, url + "/healthz", child)
        timings["start"] = round(time.monotonic() - began, 2)
        t = time.monotonic()
        login_users = max(plan.login_load * 4, 4)
        target.population = await populate_tapprove(db.url, urls[0], plan.phones, login_users)
        if "duo" in plan.scenarios:
            keys = json.loads(procs.run_cli(["integration", "create", "bench-duo"], env))
            target.population.duo = {
                "ikey": keys["ikey"], "skey": keys["skey"], "host": "127.0.0.1"
            }
        timings["populate"] = round(time.monotonic() - t, 2)
        if idle:
            t = time.monotonic()
            target.population.idle_seed = await insert_idle_devices(db.url, idle)
            target.population.idle_count = idle
            timings["idle_devices_insert"] = round(time.monotonic() - t, 2)
        left = await wait_outbox_drained(db.url)
        if left:
            log(f"warning: {left} enrollment notices still queued")
        target.pids = {
            "server": [c.pid for c in children if c.name.startswith("server")],
            "worker": [children[0].pid],
            "redis": redis.masters if isinstance(redis, PrivateCluster) else [redis.child.pid],
            "postgres": await db.backends(),
        }
        timings["total"] = round(time.monotonic() - began, 2)
        target.setup_s = timings
        return target
    except BaseException:
        target.stop()
        await db.drop()
        raise


async def start_baseline(plan: Plan, workdir: Path) -> Target:
    """Private Redis and N baseline processes (bench/baseline.py)."""
    began = time.monotonic()
    redis = procs.PrivateRedis.start(workdir / "redis")
    ports = [procs.free_port() for _ in range(plan.servers)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    children: list[procs.Child] = []
    population = baseline_population(plan.phones, max(plan.login_load * 4, 4))
    target = Target("baseline", urls, {}, population, children, redis)
    try:
        for i, port in enumerate(ports):
            argv = [sys.executable, "-m", "bench.baseline", "--port", str(port),
                    "--redis-url", redis.url]
            children.append(
                procs.spawn(f"baseline-{i}", argv, workdir / f"baseline-{i}.log")
            )
        for child, url in zip(children, urls, strict=True):
            await asyncio.to_thread(procs.wait_http, url + "/healthz", child)
        target.pids = {"server": [c.pid for c in children], "redis": [redis.child.pid]}
        target.setup_s = {"total": round(time.monotonic() - began, 2)}
        return target
    except BaseException:
        target.stop()
        raise


def paced(plan: Plan) -> str:
    """The name of the light-load phase: `light` flows in flight at the paced think time."""
    return f"rp-c{plan.light}-paced"


def flow_phases(plan: Plan) -> list[dict[str, Any]]:
    """The phases one load-generator run goes through, in order."""
    phases: list[dict[str, Any]] = []
    wanted = set(plan.scenarios)
    if "light" in wanted:
        phases.append(
            {
                "name": paced(plan),
                "path": "rp",
                "concurrency": plan.light,
                "think_ms": plan.paced_think_ms,
                "think_jitter": PACED_JITTER,
                "warmup": plan.warmup,
                "max_warmup": plan.max_warmup + plan.paced_think_ms / 1000,
                "duration": plan.light_duration,
            }
        )
    # Back to back: the same light level with the short think time, then the sweep.
    levels = sorted(set(plan.levels) | {plan.light}) if "saturation" in wanted else []
    for level in levels:
        phases.append(
            {
                "name": f"rp-c{level}",
                "path": "rp",
                "concurrency": level,
                "think_ms": plan.think_ms,
                "warmup": plan.warmup,
                "max_warmup": plan.max_warmup,
                "duration": plan.light_duration if level == plan.light else plan.duration,
            }
        )
    if "browser" in wanted:
        phases.append(
            {
                "name": "browser",
                "path": "browser",
                "concurrency": plan.browser_concurrency,
                "think_ms": 0,
                "warmup": plan.warmup,
                "max_warmup": plan.max_warmup,
                "duration": plan.browser_duration,
            }
        )
    if "duo" in wanted:
        # The Duo face beside the RP API: the same light and back-to-back paces.
        phases.append(
            {
                "name": f"duo-c{plan.light}-paced",
                "path": "duo",
                "concurrency": plan.light,
                "think_ms": plan.paced_think_ms,
                "think_jitter": PACED_JITTER,
                "warmup": plan.warmup,
                "max_warmup": plan.max_warmup + plan.paced_think_ms / 1000,
                "duration": plan.light_duration,
            }
        )
        phases.append(
            {
                "name": f"duo-c{plan.light}",
                "path": "duo",
                "concurrency": plan.light,
                "think_ms": plan.think_ms,
                "warmup": plan.warmup,
                "max_warmup": plan.max_warmup,
                "duration": plan.light_duration,
            }
        )
    if "argon2" in wanted:
        phases.append(
            {
                "name": "logins-only",
                "concurrency": 0,
                "login_load": plan.login_load,
                "warmup": plan.warmup,
                "max_warmup": plan.max_warmup,
                "duration": plan.argon2_duration / 2,
            }
        )
        # The light-load flows again, with password logins running flat out beside them;
        # then the same at the back-to-back pace.
        paces = ((paced(plan), plan.paced_think_ms), (f"rp-c{plan.light}", plan.think_ms))
        for name, think in paces:
            phases.append(
                {
                    "name": f"{name}-argon2",
                    "path": "rp",
                    "concurrency": plan.light,
                    "think_ms": think,
                    "think_jitter": PACED_JITTER if think == plan.paced_think_ms else 0.0,
                    "login_load": plan.login_load,
                    "warmup": plan.warmup,
                    "max_warmup": plan.max_warmup + think / 1000,
                    "duration": plan.argon2_duration,
                }
            )
    return phases


def run_loadgen(config: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    """Run the load generator as its own process and return the JSON it prints."""
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    stderr_path = workdir / f"{name}.log"
    with stderr_path.open("wb") as stderr:
        result = subprocess.run(
            [sys.executable, "-m", "bench.loadgen", str(path)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=str(procs.REPO),
            check=False,
        )
    if result.returncode != 0:
        tail = stderr_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"load generator {name} failed ({result.returncode}):\n{tail}")
    found: dict[str, Any] = json.loads(result.stdout.decode().strip().splitlines()[-1])
    return found


def loadgen_config(target: Target, phases: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "mode": "flows",
        "target": target.kind,
        "servers": target.urls,
        "origin": ORIGIN,
        "api_key": target.population.api_key,
        "password": PASSWORD,
        "phones": target.population.phones,
        "login_users": target.population.login_users,
        "pids": target.pids,
        "database": target.db.name if target.db is not None else None,
        "redis_url": target.redis.url,
        "duo": target.population.duo,
        "phases": phases,
    }


@dataclass
class Holder:
    """A holder process (bench.loadgen `hold` mode) and how many sockets it holds."""

    child: subprocess.Popen[bytes]
    count: int

    async def next_report(self, workdir: Path) -> dict[str, Any]:
        """The next JSON line the holder prints (after connecting, after a storm)."""
        assert self.child.stdout is not None
        line = await asyncio.to_thread(self.child.stdout.readline)
        if not line:
            raise RuntimeError(f"idle holder exited early (see {workdir}/holder-*.log)")
        report: dict[str, Any] = json.loads(line)
        return report


def idle_capacity(requested: int) -> tuple[int, str]:
    """How many idle sockets one server process can hold under this machine's fd limit."""
    limit = procs.raise_nofile()
    if requested + FD_MARGIN <= limit:
        return requested, ""
    capped = max(0, limit - FD_MARGIN)
    return capped, (
        f"requested {requested} sockets, capped to {capped}: RLIMIT_NOFILE is {limit} here "
        "and cannot be raised (no CAP_SYS_RESOURCE); raise the hard limit (ulimit -Hn) to "
        "run more on one process"
    )


# The reference client's reconnect policy (mobile_stub.protocol.Backoff, docs/protocol-
# additions.md): full jitter over min(cap, base * 2^n) seconds, reset by `ready`.
RECONNECT_BACKOFF = {"base": 0.5, "cap": 30.0}


async def start_holders(
    target: Target, plan: Plan, count: int, workdir: Path
) -> tuple[list[Holder], list[dict[str, Any]]]:
    """Holder processes with `count` idle device sockets on the first server, and their
    first reports (once every socket is ready or the connect deadline passed)."""
    seed = target.population.idle_seed or "baseline-idle"
    holders: list[Holder] = []
    reports: list[dict[str, Any]] = []
    first = 0
    k = 0
    while first < count:
        n = min(PER_HOLDER, count - first)
        config = {
            "mode": "hold",
            "server": target.urls[0],
            "seed": seed,
            "first": first,
            "count": n,
            "local_addr": f"127.0.0.{2 + k}",
            "connect_concurrency": 100,
            "connect_deadline": plan.connect_deadline,
            "reconnect": "storm" in plan.scenarios,
            "backoff": RECONNECT_BACKOFF,
            "storm_deadline": plan.storm_deadline,
        }
        path = workdir / f"holder-{k}.json"
        path.write_text(json.dumps(config))
        with (workdir / f"holder-{k}.log").open("wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen", str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=str(procs.REPO),
            )
        holders.append(Holder(child, n))
        first += n
        k += 1
    for holder in holders:
        reports.append(await holder.next_report(workdir))
    return holders, reports


def stop_holders(holders: list[Holder]) -> None:
    for holder in holders:
        if holder.child.stdin is not None:
            with contextlib.suppress(OSError):
                holder.child.stdin.close()
    for holder in holders:
        try:
            holder.child.wait(30)
        except subprocess.TimeoutExpired:
            holder.child.kill()


async def run_idle(target: Target, plan: Plan, count: int, workdir: Path) -> dict[str, Any]:
    """Connect `count` idle device sockets to the first server; RSS, connect rate, a flow
    phase while they stay connected, and (scenario `storm`) a reconnect storm."""
    server_pid = target.pids["server"][0]
    await asyncio.sleep(1.0)
    rss_before = procs.rss_bytes(server_pid)
    load_before = procs.loadavg()
    began = time.monotonic()
    holders: list[Holder] = []
    out: dict[str, Any] = {}
    watched = {"server": [server_pid], "redis": target.pids["redis"]}
    try:
        cpu_before = procs.cpu_snapshot(watched)
        sql_before = await sql_backends_cpu(target)
        holders, reports = await start_holders(target, plan, count, workdir)
        connected_s = time.monotonic() - began
        connect_cpu = procs.cpu_delta(cpu_before, procs.cpu_snapshot(watched))
        if target.db is not None:
            # Backends the pool opened meanwhile count from zero.
            sql_after = await sql_backends_cpu(target)
            watched["postgres"] = list(sql_after)
            connect_cpu["postgres"] = sum(
                cpu - sql_before.get(pid, 0.0) for pid, cpu in sql_after.items()
            )
        ok = sum(r["ok"] for r in reports)
        await asyncio.sleep(2.0)
        rss_after = procs.rss_bytes(server_pid)
        out = {
            "requested": count,
            "connected": ok,
            "failed": sum(r["failed"] for r in reports),
            "not_tried_before_deadline": sum(
                r.get("not_tried_before_deadline", 0) for r in reports
            ),
            "errors": [r["errors"] for r in reports if r["errors"]],
            "holders": len(holders),
            "connect_s": round(connected_s, 2),
            "connects_per_s": round(ok / connected_s, 1) if connected_s else None,
            # CPU milliseconds per connect while they connected: steadier than the rate on
            # a shared machine.
            "cpu_ms_per_connect": {
                group: round(1000 * connect_cpu[group] / ok, 3)
                for group in watched
                if ok and group in connect_cpu
            },
            "handshake_ms": [r["handshake_ms"] for r in reports],
            "server_rss_before_mib": round(rss_before / 2**20, 1),
            "server_rss_after_mib": round(rss_after / 2**20, 1),
            "rss_per_socket_kib": round((rss_after - rss_before) / max(1, ok) / 1024, 2),
            "client_rss_per_socket_kib": [r["client_rss_per_socket_kib"] for r in reports],
            "loadavg": load_before,
        }
        if "idle" in plan.scenarios:
            out.update(await idle_figures(target, plan, workdir))
        if "storm" in plan.scenarios:
            out["storm"] = await run_storm(target, plan, holders, workdir)
    finally:
        stop_holders(holders)
    return out


async def sql_backends_cpu(target: Target) -> dict[int, float]:
    """CPU seconds of each backend of the target's scratch database (none for the baseline)."""
    if target.db is None:
        return {}
    return {pid: procs.cpu_seconds(pid) for pid in await target.db.backends()}


async def idle_figures(target: Target, plan: Plan, workdir: Path) -> dict[str, Any]:
    """The server's CPU while the sockets idle, then a flow phase beside them."""
    server_pid = target.pids["server"][0]
    watched = {"server": [server_pid], "redis": target.pids["redis"]}
    before = procs.cpu_snapshot(watched)
    await asyncio.sleep(plan.idle_cpu_window)
    after = procs.cpu_snapshot(watched)
    idle_cpu = procs.cpu_delta(before, after)
    idle_counters = procs.counter_delta(before, after)["server"]
    phase = {
        "name": f"rp-c{plan.light}-with-idle",
        "path": "rp",
        "concurrency": plan.light,
        "think_ms": plan.think_ms,
        "warmup": min(1.0, plan.warmup),
        "duration": plan.idle_flow_duration,
    }
    flows = await asyncio.to_thread(
        run_loadgen, loadgen_config(target, [phase]), workdir, f"{target.kind}-idle-flows"
    )
    return {
        "server_rss_after_flows_mib": round(procs.rss_bytes(server_pid) / 2**20, 1),
        "idle_cpu": idle_cpu,
        "idle_server_syscalls": idle_counters,
        "idle_server_core_fraction": round(idle_cpu["server"] / idle_cpu["wall"], 4)
        if idle_cpu.get("wall")
        else None,
        "flow_phase": flows["phases"][0],
    }


async def run_storm(
    target: Target, plan: Plan, holders: list[Holder], workdir: Path
) -> dict[str, Any]:
    """Restart the first server (SIGTERM, as a deploy does) under its idle phones; they come
    back with the reference client's backoff. Sign-ins run at the paced light load from the
    moment the new process answers until the last phone is ready."""
    index = next(i for i, c in enumerate(target.children) if c.pid == target.pids["server"][0])
    old = target.children[index]
    for holder in holders:
        assert holder.child.stdin is not None
        holder.child.stdin.write(b"storm\n")
        holder.child.stdin.flush()
    for holder in holders:
        await holder.next_report(workdir)  # {"event": "watching"}
    load_before = procs.loadavg()
    overflows = procs.listen_overflows()
    sigterm = time.monotonic()
    await asyncio.to_thread(old.stop)
    stopped = time.monotonic()
    new = old.respawn()
    target.children[index] = new
    target.pids["server"][0] = new.pid
    await asyncio.to_thread(procs.wait_http, target.urls[0] + "/healthz", new, 60.0)
    up = time.monotonic()
    over = workdir / f"{target.kind}-storm.over"
    phase = {
        "name": "signins-during-storm",
        "path": "rp",
        "concurrency": plan.light,
        "think_ms": plan.paced_think_ms,
        "think_jitter": PACED_JITTER,
        "warmup": 0.0,
        "max_warmup": 0.0,
        "duration": plan.storm_deadline,
        "until_exists": str(over),
    }
    config = loadgen_config(target, [phase])
    config["connect_backoff"] = RECONNECT_BACKOFF
    signins = asyncio.create_task(
        asyncio.to_thread(run_loadgen, config, workdir, f"{target.kind}-storm-flows")
    )
    try:
        reports = [await holder.next_report(workdir) for holder in holders]
    finally:
        over.touch()
    flows = await signins
    overflows = procs.listen_overflows() - overflows
    ready_at = [r["all_ready_at"] for r in reports if r["all_ready_at"] is not None]
    last = max(ready_at) if ready_at else None
    return {
        "phones": sum(r["sockets"] for r in reports),
        "not_ready": sum(r["not_ready"] for r in reports),
        "stop_s": round(stopped - sigterm, 2),
        "restart_s": round(up - sigterm, 2),
        "all_ready_s": round(last - sigterm, 2) if last is not None else None,
        "all_ready_after_up_s": round(last - up, 2) if last is not None else None,
        # Machine-wide, so other programs' count too; on a quiet machine, the storm's.
        "listen_overflows": overflows,
        "attempts_per_phone": round(
            sum(r["attempts"] for r in reports) / max(1, sum(r["sockets"] for r in reports)), 2
        ),
        "holders": reports,
        "loadavg": load_before,
        "flow_phase": flows["phases"][0],
    }


async def run_target(kind: str, plan: Plan, workdir: Path) -> dict[str, Any]:
    """Everything for one target; its processes are stopped whatever happens."""
    workdir.mkdir(parents=True, exist_ok=True)
    wants_idle = bool({"idle", "storm"} & set(plan.scenarios)) and plan.sockets > 0
    sockets, note = idle_capacity(plan.sockets) if wants_idle else (0, "")
    if note:
        log(note)
    log(f"{kind}: starting")
    target = (
        await start_tapprove(plan, workdir, sockets, cluster=kind == "tapprove-cluster")
        if kind.startswith("tapprove")
        else await start_baseline(plan, workdir)
    )
    out: dict[str, Any] = {"kind": kind, "servers": target.urls, "setup_s": target.setup_s}
    try:
        log(f"{kind}: up in {target.setup_s.get('total')} s; flows")
        # The baseline has no Duo face.
        phases = [
            p for p in flow_phases(plan) if kind.startswith("tapprove") or p.get("path") != "duo"
        ]
        if phases:
            result = await asyncio.to_thread(
                run_loadgen, loadgen_config(target, phases), workdir, f"{kind}-flows"
            )
            out["flows"] = result
        if sockets:
            log(f"{kind}: {sockets} idle sockets")
            out["idle"] = await run_idle(target, plan, sockets, workdir)
            if note:
                out["idle"]["note"] = note
        out["server_rss_end_mib"] = round(procs.rss_bytes(target.pids["server"][0]) / 2**20, 1)
        for child in target.children:
            if not child.alive():
                raise RuntimeError(f"{child.name} died during the run:\n{child.log_tail()}")
    finally:
        target.stop()
        if target.db is not None:
            await target.db.drop()
    log(f"{kind}: done")
    return out


def plan_json(plan: Plan) -> dict[str, Any]:
    data = asdict(plan)
    data["phones"] = plan.phones
    return data
