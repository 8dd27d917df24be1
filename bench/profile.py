"""`python -m bench --profile`: where a tapprove server process spends its CPU under saturated
relying-party load, sampled with py-spy (no code change in the server), summarised by area
and by function from py-spy's collapsed stacks.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from bench import procs
from bench.runner import (
    Plan,
    flow_phases,
    loadgen_config,
    log,
    run_loadgen,
    start_holders,
    start_tapprove,
    stop_holders,
)

# (area, pattern on a frame's "function (file:line)"), first match wins for a frame.
AREAS: list[tuple[str, re.Pattern[str]]] = [
    ("signature (pyjwt/cryptography)", re.compile(r"[(/](jwt|cryptography)/|signatures\.py")),
    ("SQL (SQLAlchemy/asyncpg/sqlmodel)", re.compile(r"[(/](sqlalchemy|asyncpg|sqlmodel)/")),
    ("Redis client (redis-py)", re.compile(r"[(/]redis/")),
    ("pydantic", re.compile(r"[(/]pydantic(_core)?/")),
    ("email_validator", re.compile(r"[(/]email_validator/")),
    ("JSON (json/orjson)", re.compile(r"[(/]json/|orjson")),
    ("logging", re.compile(r"[(/]logging/|[(/]structlog/|app/logs\.py")),
    ("WebSocket protocol (websockets)", re.compile(r"[(/]websockets/")),
    ("HTTP/ASGI (uvicorn/starlette)", re.compile(r"[(/](uvicorn|starlette|httptools)/")),
    ("prometheus", re.compile(r"[(/]prometheus_client/")),
    ("asyncio/uvloop", re.compile(r"[(/]asyncio/|uvloop")),
]
APP_FRAME = re.compile(r"\((?:.*/)?(app/[\w/]+\.py):\d+\)")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
# The event loop's own frames: whatever sits directly on them is the part actually running.
LOOP_FRAMES = ("Runner.run (asyncio/runners.py", "run_until_complete", "uvloop")


def area_of(frame: str) -> str | None:
    for name, pattern in AREAS:
        if pattern.search(frame):
            return name
    return None


def summarise(collapsed: Path, top: int = 25) -> str:
    """Markdown: inclusive share by area and by app function, self share by function."""
    total = 0
    inclusive: Counter[str] = Counter()
    app_inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    leaf_area: Counter[str] = Counter()
    resumed: Counter[str] = Counter()
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        areas = {a for a in (area_of(f) for f in frames) if a}
        for a in areas:
            inclusive[a] += count
        for f in {f for f in frames if APP_FRAME.search(f)}:
            match = FRAME.match(f)
            name = f"{match['func']} ({APP_FRAME.search(f)[1]})" if match else f  # type: ignore[index]
            app_inclusive[name] += count
        below = [i for i, f in enumerate(frames) if f.startswith(LOOP_FRAMES)]
        if below and below[-1] + 1 < len(frames):
            resumed[frames[below[-1] + 1]] += count
        elif below:
            resumed["(the loop itself: uvloop, I/O, callbacks)"] += count
        last = frames[-1]
        match = FRAME.match(last)
        leaf[f"{match['func']} ({Path(match['file']).name})" if match else last] += count
        leaf_area[area_of(last) or "other (C / interpreter)"] += count
    if not total:
        return "no samples\n"

    def pct(n: int) -> str:
        return f"{100 * n / total:.1f}%"

    out = [f"{total} samples (CPU only, idle excluded).", "",
           "| area (inclusive: on the stack) | share |", "| --- | ---: |"]
    out += [f"| {a} | {pct(n)} |" for a, n in inclusive.most_common()]
    out += ["", "| area of the innermost frame (self time) | share |", "| --- | ---: |"]
    out += [f"| {a} | {pct(n)} |" for a, n in leaf_area.most_common()]
    out += ["", "| first frame under the event loop (what was resumed) | share |",
            "| --- | ---: |"]
    out += [f"| `{f}` | {pct(n)} |" for f, n in resumed.most_common(top)]
    out += ["", "| app function (inclusive) | share |", "| --- | ---: |"]
    out += [f"| `{f}` | {pct(n)} |" for f, n in app_inclusive.most_common(top)]
    out += ["", "| innermost function (self) | share |", "| --- | ---: |"]
    out += [f"| `{f}` | {pct(n)} |" for f, n in leaf.most_common(top)]
    return "\n".join(out) + "\n"


async def profile_connect(plan: Plan, args: argparse.Namespace) -> None:
    """py-spy on the server while `plan.sockets` idle phones connect (auth → ready)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy (the `bench` extra)")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir: Path = args.out / f"profile-connect-{stamp}"
    workdir.mkdir(parents=True, exist_ok=True)
    plan.scenarios = ["idle"]
    target = await start_tapprove(plan, workdir, plan.sockets)
    raw = workdir / "server.collapsed"
    try:
        server = target.pids["server"][0]
        log(f"py-spy on server pid {server} while {plan.sockets} phones connect")
        spy_process = subprocess.Popen(
            [spy, "record", "--pid", str(server), "--rate", "100", "--gil",
             "--format", "raw", "-o", str(raw)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(1.0)
        cpu_before = procs.cpu_seconds(server)
        holders, reports = await start_holders(target, plan, plan.sockets, workdir)
        cpu = procs.cpu_seconds(server) - cpu_before
        spy_process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        await asyncio.to_thread(spy_process.wait)
        stop_holders(holders)
    finally:
        target.stop()
        if target.db is not None:
            await target.db.drop()
    ok = sum(r["ok"] for r in reports)
    seconds = max(r["seconds"] for r in reports)
    text = "\n".join([
        f"Profile: {ok} phones connected (auth → ready) in {seconds} s, "
        f"{ok / seconds:.0f}/s, 100 at a time; server CPU {1000 * cpu / max(1, ok):.2f} ms "
        "per connect (py-spy's sampling included).",
        "",
        summarise(raw),
    ])  # fmt: skip
    (workdir / "profile.md").write_text(text)
    sys.stdout.write(text)
    log(f"collapsed stacks and profile.md in {workdir}")


async def profile(plan: Plan, args: argparse.Namespace) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy (the `bench` extra)")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir: Path = args.out / f"profile-{stamp}"
    workdir.mkdir(parents=True, exist_ok=True)
    target = await start_tapprove(plan, workdir, 0)
    seconds = float(args.profile_seconds)
    plan.levels = [args.profile_concurrency]
    plan.light = args.profile_concurrency
    plan.light_duration = seconds + 2
    plan.warmup = 2.0
    plan.scenarios = ["saturation"]  # back to back: one rp-c<concurrency> phase
    try:
        config = loadgen_config(target, flow_phases(plan))
        load = asyncio.create_task(asyncio.to_thread(run_loadgen, config, workdir, "profile"))
        await asyncio.sleep(plan.warmup + 1)
        outputs = []
        spies = []
        watched = (("server", target.pids["server"][:1]), ("worker", target.pids["worker"]))
        for name, pids in watched:
            raw = workdir / f"{name}.collapsed"
            log(f"py-spy on {name} pid {pids[0]} for {seconds:.0f} s")
            spies.append(
                subprocess.Popen(
                    [spy, "record", "--pid", str(pids[0]), "--duration", str(int(seconds)),
                     "--rate", "100", "--gil", "--format", "raw", "-o", str(raw)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            outputs.append((name, raw))
        for process in spies:
            await asyncio.to_thread(process.wait)
        result = await load
    finally:
        target.stop()
        if target.db is not None:
            await target.db.drop()
    phase = result["phases"][0]
    lines = [
        f"Profile: {phase['concurrency']} RP flows in flight, {phase['flows_per_s']} flows/s, "
        f"server CPU {phase.get('cpu_ms_per_flow', {}).get('server')} ms/flow, "
        f"load average {phase['loadavg']}.",
        "",
    ]
    for name, raw in outputs:
        lines += [f"### {name}", "", summarise(raw)]
    text = "\n".join(lines)
    (workdir / "profile.md").write_text(text)
    sys.stdout.write(text)
    log(f"collapsed stacks and profile.md in {workdir}")
