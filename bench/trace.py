"""`python -m bench --trace`: what one relying-party flow costs in round trips, counted rather
than timed (so a busy machine does not change the answer).

Starts tapprove as `python -m bench` does, watches its private Redis with MONITOR (each
command attributed to the server or the worker by its client port), runs sequential RP flows
from this process, subtracts the background rate measured while idle, and prints per flow:
Redis commands by name, PostgreSQL transactions and rows, and the server's syscalls and
context switches; plus the ordered list of Redis commands the server sent for one flow.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench import PASSWORD, procs
from bench.loadgen import Context, Phone, rp_flow
from bench.runner import ORIGIN, Plan, log, start_tapprove

FLOWS = 30
IDLE_SECONDS = 4.0
_KEY_IDS = re.compile(r"[0-9a-f]{32}")


def _socket_owner(redis_port: int, pids: dict[str, list[int]]) -> dict[int, str]:
    """Local port of each connection to Redis -> the named process that holds it."""
    inode_port: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, inode = parts[1], parts[2], parts[9]
        if int(remote.split(":")[1], 16) == redis_port:
            inode_port[inode] = int(local.split(":")[1], 16)
    owners: dict[int, str] = {}
    for name, group in pids.items():
        name = f"the {name}"
        for pid in group:
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        link = os.readlink(f"/proc/{pid}/fd/{fd}")
                        inode = link[len("socket:[") : -1] if link.startswith("socket:[") else ""
                        if inode in inode_port:
                            owners[inode_port[inode]] = name
    return owners


class Monitor:
    """Collects (time, client port, command words) from Redis MONITOR."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.lines: list[tuple[float, int, list[str]]] = []
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ready = asyncio.Event()

        async def run() -> None:
            async with self.client.monitor() as monitor:
                ready.set()
                async for item in monitor.listen():
                    port = int(item.get("client_port") or 0)
                    command = str(item.get("command", "")).split()
                    self.lines.append((time.monotonic(), port, command))

        self.task = asyncio.create_task(run())
        await asyncio.wait_for(ready.wait(), 5)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        await self.client.aclose()


def _count(
    lines: list[tuple[float, int, list[str]]], owners: dict[int, str], start: float, end: float
) -> dict[str, Counter[str]]:
    found: dict[str, Counter[str]] = {}
    for at, port, words in lines:
        if start <= at <= end and words and words[0].strip('"').lower() != "echo":
            # MONITOR shows commands run inside a Lua script with no client port.
            owner = owners.get(port, "other client") if port else "Lua scripts (inside EVALSHA)"
            found.setdefault(owner, Counter())[words[0].lower()] += 1
    return found


async def trace(plan: Plan, args: argparse.Namespace) -> None:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir: Path = args.out / f"trace-{stamp}"
    plan.levels, plan.light, plan.browser_concurrency, plan.login_load = [1], 1, 1, 1
    target = await start_tapprove(plan, workdir, 0)
    monitor = Monitor(target.redis.url)
    assert target.db is not None
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            ctx = Context(http, target.urls, ORIGIN, target.population.api_key, PASSWORD)
            phone = Phone(target.population.phones[0], target.urls[0])
            await phone.connect(http)
            for _ in range(3):  # warm caches and pools
                await rp_flow(ctx, phone, target.urls[0], 0.0)
            await monitor.start()
            await asyncio.sleep(1.0)
            pids = {"server": target.pids["server"], "worker": target.pids["worker"]}
            marker = aioredis.Redis.from_url(target.redis.url)
            server = target.pids["server"][:1]

            async def measure(flows: int) -> dict[str, Any]:
                pg0 = await target.db.counters()  # type: ignore[union-attr]
                snap0 = procs.cpu_snapshot({"server": server})
                began = time.monotonic()
                if flows:
                    for k in range(flows):
                        await marker.echo(f"bench-flow-{k}")  # a boundary in MONITOR's output
                        await rp_flow(ctx, phone, target.urls[0], 0.0)
                    await marker.echo("bench-flows-done")
                else:
                    await asyncio.sleep(IDLE_SECONDS)
                ended = time.monotonic()
                await asyncio.sleep(1.2)  # pg_stat_database is flushed about once a second
                pg1 = await target.db.counters()  # type: ignore[union-attr]
                snap1 = procs.cpu_snapshot({"server": server})
                return {
                    "start": began,
                    "end": ended,
                    "seconds": ended - began,
                    "pg": {k: pg1[k] - pg0.get(k, 0) for k in pg1},
                    "proc": procs.counter_delta(snap0, snap1)["server"],
                }

            idle = await measure(0)
            busy = await measure(FLOWS)
            owners = _socket_owner(target.redis.port, pids)
            await marker.aclose()
            await monitor.stop()
    finally:
        target.stop()
        await target.db.drop()

    scale = busy["seconds"] / idle["seconds"]
    idle_redis = _count(monitor.lines, owners, idle["start"], idle["end"])
    busy_redis = _count(monitor.lines, owners, busy["start"], busy["end"])
    out = [
        f"Trace: {FLOWS} sequential RP flows (no think time) in {busy['seconds']:.2f} s, "
        f"after {IDLE_SECONDS:.0f} s idle to measure background work; load average "
        f"{procs.loadavg()}.",
        "",
        "Per flow, background subtracted:",
        "",
        "| what | per flow |",
        "| --- | ---: |",
    ]
    for process in sorted(set(idle_redis) | set(busy_redis)):
        names = set(busy_redis.get(process, {})) | set(idle_redis.get(process, {}))
        total = 0.0
        for name in sorted(names):
            value = (
                busy_redis.get(process, Counter())[name]
                - idle_redis.get(process, Counter())[name] * scale
            ) / FLOWS
            if abs(value) >= 0.05:
                out.append(f"| Redis `{name}` from {process} | {value:.2f} |")
                total += value
        out.append(f"| **Redis commands from {process}** | **{total:.1f}** |")
    for key in ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_fetched"):
        value = (busy["pg"].get(key, 0) - idle["pg"].get(key, 0) * scale) / FLOWS
        out.append(f"| PostgreSQL {key} | {value:.2f} |")
    for key in ("syscr", "syscw", "voluntary_ctxt_switches"):
        value = (busy["proc"].get(key, 0) - idle["proc"].get(key, 0) * scale) / FLOWS
        out.append(f"| server {key} | {value:.1f} |")
    # The commands between two markers, from the server or run by its scripts.
    middle_flow = f"bench-flow-{FLOWS // 2}"
    sample: list[list[str]] = []
    inside = False
    for _at, port, words in monitor.lines:
        clean = [w.strip('"') for w in words]
        if clean[:1] in (["ECHO"], ["echo"]):
            if inside:
                break
            inside = clean[1:2] == [middle_flow]
            continue
        if inside and owners.get(port) in ("the server", None):
            sample.append(clean if port else ["  (lua)", *clean])
    out += ["", f"Redis commands of one flow (number {FLOWS // 2}): sent by the server, and "
            "(lua) run inside its scripts; ids elided:",
            "", "```"]
    for words in sample:
        shown = [_KEY_IDS.sub("<id>", w) for w in words[:6]]
        out.append(" ".join(w if len(w) < 48 else w[:45] + "..." for w in shown))
    out.append("```")
    text = "\n".join(out) + "\n"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "trace.md").write_text(text)
    sys.stdout.write(text)
    log(f"trace in {workdir / 'trace.md'}")
