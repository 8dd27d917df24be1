"""Turning a run's raw figures into the summary table, the JSON file, RESULTS.md and the plot."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import procs

BEGIN = "<!-- BEGIN GENERATED: python -m bench --publish rewrites this block -->"
END = "<!-- END GENERATED -->"
PACKAGES = [
    "uvicorn", "starlette", "websockets", "httptools", "uvloop", "redis", "hiredis",
    "sqlalchemy", "sqlmodel", "asyncpg", "cryptography", "pyjwt", "argon2-cffi", "orjson",
    "pydantic", "aiohttp", "matplotlib",
]  # fmt: skip


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=str(procs.REPO), check=False
        )
    except OSError:
        return ""
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return math.nan


def machine_meta() -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "nofile_limit": procs.raise_nofile(),
        "versions": versions,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": len([x for x in _git("status", "--porcelain").splitlines() if x]),
    }


# --- figures ----------------------------------------------------------------------------


def _phases(target: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in target.get("flows", {}).get("phases", [])}


def _lat(phase: dict[str, Any] | None, name: str, pct: str) -> float | None:
    if not phase:
        return None
    value = phase.get("latency_ms", {}).get(name, {}).get(pct)
    return None if value is None else float(value)


def figures(target: dict[str, Any], plan: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of one target, keyed the same way for tapprove and the baseline."""
    phases = _phases(target)
    servers = max(1, int(plan.get("servers", 1)))
    out: dict[str, float | None] = {}
    light = phases.get(f"rp-c{plan['light']}-paced")
    back_to_back = phases.get(f"rp-c{plan['light']}")
    for metric in ("create_to_phone", "decision_to_phone_result", "decision_to_rp_result"):
        for pct in ("p50", "p90", "p99"):
            out[f"light.{metric}.{pct}"] = _lat(light, metric, pct)
            out[f"b2b.{metric}.{pct}"] = _lat(back_to_back, metric, pct)
    duo_light = phases.get(f"duo-c{plan['light']}-paced")
    duo_b2b = phases.get(f"duo-c{plan['light']}")
    for pct in ("p50", "p90", "p99"):
        out[f"light.decision_to_duo_result.{pct}"] = _lat(duo_light, "decision_to_duo_result", pct)
        out[f"b2b.decision_to_duo_result.{pct}"] = _lat(duo_b2b, "decision_to_duo_result", pct)
    out["light.duo_flows_per_s"] = duo_light["flows_per_s"] if duo_light else None
    out["b2b.duo_flows_per_s"] = duo_b2b["flows_per_s"] if duo_b2b else None
    out["light.flows_per_s"] = light["flows_per_s"] if light else None
    out["light.machine_busy"] = light["cpu_s"].get("machine_busy_fraction") if light else None
    out["b2b.flows_per_s"] = back_to_back["flows_per_s"] if back_to_back else None
    # Counts per flow come from the back-to-back phase: many flows, little idle background.
    counters = (back_to_back or {}).get("per_flow_counters", {})
    server = counters.get("server_process", {})
    if server:
        out["rt.server_syscalls"] = round(server.get("syscr", 0) + server.get("syscw", 0), 1)
        out["rt.server_writes"] = server.get("syscw")
        out["rt.server_switches"] = server.get("voluntary_ctxt_switches")
    redis_calls = counters.get("redis_calls", {})
    if redis_calls:
        out["rt.redis_commands"] = round(
            sum(v for k, v in redis_calls.items() if k not in ("info", "hello")), 1
        )
        out["rt.redis_scripts"] = redis_calls.get("evalsha", 0) + redis_calls.get("eval", 0)
    postgres = counters.get("postgres", {})
    if postgres:
        out["rt.sql_transactions"] = round(
            postgres.get("xact_commit", 0) + postgres.get("xact_rollback", 0), 1
        )
        out["rt.sql_rollbacks"] = postgres.get("xact_rollback", 0)
        out["rt.sql_rows_written"] = round(
            sum(postgres.get(k, 0) for k in ("tup_inserted", "tup_updated", "tup_deleted")), 2
        )

    sweep = [p for n, p in phases.items() if n.startswith("rp-c") and n[4:].isdigit()]
    if sweep:
        best = max(sweep, key=lambda p: p["flows_per_s"])
        out["sat.rp_flows_per_s"] = best["flows_per_s"]
        out["sat.rp_flows_per_s_per_process"] = round(best["flows_per_s"] / servers, 1)
        out["sat.rp_concurrency"] = best["concurrency"]
        per_flow = best.get("cpu_ms_per_flow", {})
        for group in ("server", "worker", "redis", "postgres", "loadgen"):
            out[f"sat.cpu_ms_per_flow.{group}"] = per_flow.get(group)
        out["sat.machine_busy"] = best["cpu_s"].get("machine_busy_fraction")
        out["sat.decision_to_phone_result.p99"] = _lat(best, "decision_to_phone_result", "p99")
    browser = phases.get("browser")
    if browser:
        out["browser.flows_per_s"] = browser["flows_per_s"]
        out["browser.flows_per_s_per_process"] = round(browser["flows_per_s"] / servers, 1)
        out["browser.cpu_ms_per_flow.server"] = browser.get("cpu_ms_per_flow", {}).get("server")
        out["browser.login_rtt.p50"] = _lat(browser, "login_rtt", "p50")
        out["browser.decision_to_browser_result.p50"] = _lat(
            browser, "decision_to_browser_result", "p50"
        )
        out["browser.decision_to_browser_result.p99"] = _lat(
            browser, "decision_to_browser_result", "p99"
        )
    logins = phases.get("logins-only")
    if logins:
        out["argon2.logins_per_s"] = logins.get("logins_per_s")
        cpu = logins["cpu_s"].get("server")
        count = logins.get("logins") or 0
        out["argon2.cpu_ms_per_login.server"] = round(1000 * cpu / count, 2) if count else None
    for prefix, name, base in (
        ("argon2", f"rp-c{plan['light']}-paced-argon2", "light"),
        ("argon2_b2b", f"rp-c{plan['light']}-argon2", "b2b"),
    ):
        under = phases.get(name)
        if not under:
            continue
        for pct in ("p50", "p99"):
            out[f"{prefix}.decision_to_phone_result.{pct}"] = _lat(
                under, "decision_to_phone_result", pct
            )
        out[f"{prefix}.decision_to_rp_result.p99"] = _lat(under, "decision_to_rp_result", "p99")
        out[f"{prefix}.logins_per_s_during"] = under.get("logins_per_s")
        quiet = out.get(f"{base}.decision_to_phone_result.p99")
        loud = out.get(f"{prefix}.decision_to_phone_result.p99")
        out[f"{prefix}.p99_increase"] = round(loud / quiet, 2) if quiet and loud else None
    idle = target.get("idle")
    if idle:
        out["idle.sockets"] = idle["connected"]
        out["idle.failed"] = idle["failed"]
        out["idle.not_tried"] = idle.get("not_tried_before_deadline")
        out["idle.connects_per_s"] = idle["connects_per_s"]
        for group, value in idle.get("cpu_ms_per_connect", {}).items():
            out[f"idle.cpu_ms_per_connect.{group}"] = value
        out["idle.rss_per_socket_kib"] = idle["rss_per_socket_kib"]
        out["idle.server_core_fraction"] = idle.get("idle_server_core_fraction")
        flow = idle.get("flow_phase")
        for metric in ("create_to_phone", "decision_to_phone_result", "decision_to_rp_result"):
            for pct in ("p50", "p99"):
                out[f"idle.{metric}.{pct}"] = _lat(flow, metric, pct)
        out["idle.flows_per_s"] = flow["flows_per_s"] if flow else None
    storm = (idle or {}).get("storm")
    if storm:
        out["storm.phones"] = storm["phones"]
        out["storm.not_ready"] = storm["not_ready"]
        out["storm.restart_s"] = storm["restart_s"]
        out["storm.all_ready_s"] = storm["all_ready_s"]
        out["storm.all_ready_after_up_s"] = storm["all_ready_after_up_s"]
        out["storm.attempts_per_phone"] = storm["attempts_per_phone"]
        out["storm.listen_overflows"] = storm.get("listen_overflows")
        flow = storm["flow_phase"]
        for pct in ("p50", "p99", "max"):
            out[f"storm.create_to_phone.{pct}"] = _lat(flow, "create_to_phone", pct)
        out["storm.signins"] = flow["flows"]
    return out


# (key, label, unit, goal from issue 6 or "")
ROWS: list[tuple[str, str, str, str]] = [
    ("light.create_to_phone.p50", "light (10 in flight, paced): create → phone p50", "ms", ""),
    ("light.create_to_phone.p90", "light: create → phone p90", "ms", ""),
    ("light.create_to_phone.p99", "light: create → phone p99", "ms", "≤ 5"),
    ("light.decision_to_phone_result.p50", "light: decision → phone result p50", "ms", ""),
    ("light.decision_to_phone_result.p99", "light: decision → phone result p99", "ms", "≤ 5"),
    ("light.decision_to_rp_result.p50", "light: decision → RP long-poll result p50", "ms", ""),
    ("light.decision_to_rp_result.p90", "light: decision → RP long-poll result p90", "ms", ""),
    ("light.decision_to_rp_result.p99", "light: decision → RP long-poll result p99", "ms", "≤ 5"),
    ("light.flows_per_s", "  flows/s meanwhile", "/s", ""),
    ("light.machine_busy", "  machine busy (both cores) meanwhile", "", ""),
    ("light.decision_to_duo_result.p50",
     "light, Duo face: decision → waiting auth_status result p50", "ms", ""),
    ("light.decision_to_duo_result.p90", "  … p90", "ms", ""),
    ("light.decision_to_duo_result.p99", "  … p99", "ms", "few ms"),
    ("light.duo_flows_per_s", "  Duo flows/s meanwhile", "/s", ""),
    ("b2b.create_to_phone.p99", "10 in flight back to back: create → phone p99", "ms", ""),
    ("b2b.decision_to_phone_result.p99", "  decision → phone result p99", "ms", ""),
    ("b2b.decision_to_rp_result.p99", "  decision → RP long-poll result p99", "ms", ""),
    ("b2b.flows_per_s", "  flows/s meanwhile", "/s", ""),
    ("b2b.decision_to_duo_result.p99", "  Duo face back to back: decision → auth_status p99",
     "ms", ""),
    ("b2b.duo_flows_per_s", "  Duo flows/s back to back", "/s", ""),
    ("rt.server_syscalls", "  server read+write syscalls per flow", "", ""),
    ("rt.redis_commands", "  Redis commands per flow (incl. inside Lua)", "", ""),
    ("rt.redis_scripts", "  … of which Lua script calls", "", ""),
    ("rt.sql_transactions", "  PostgreSQL transactions per flow", "", ""),
    ("rt.sql_rollbacks", "  … of which rolled back (read-only sessions)", "", ""),
    ("rt.sql_rows_written", "  PostgreSQL rows written per flow", "", ""),
    ("sat.rp_flows_per_s_per_process", "saturated RP flows/s per server process", "/s",
     "≥ 50% of baseline"),
    ("sat.rp_concurrency", "  … reached at flows in flight", "", ""),
    ("sat.cpu_ms_per_flow.server", "  server CPU per RP flow", "ms", ""),
    ("sat.cpu_ms_per_flow.worker", "  worker CPU per RP flow", "ms", ""),
    ("sat.cpu_ms_per_flow.redis", "  redis-server CPU per RP flow", "ms", ""),
    ("sat.cpu_ms_per_flow.postgres", "  PostgreSQL backends CPU per RP flow", "ms", ""),
    ("sat.cpu_ms_per_flow.loadgen", "  load generator CPU per RP flow", "ms", ""),
    ("sat.machine_busy", "  machine busy (both cores) during it", "", ""),
    ("browser.flows_per_s_per_process", "browser login flows/s per process (argon2id)", "/s", ""),
    ("browser.cpu_ms_per_flow.server", "  server CPU per browser flow", "ms", ""),
    ("browser.login_rtt.p50", "  POST /api/login p50", "ms", ""),
    ("browser.decision_to_browser_result.p99", "  decision → browser stream result p99", "ms", ""),
    ("argon2.logins_per_s", "password logins/s alone (argon2id)", "/s", ""),
    ("argon2.cpu_ms_per_login.server", "  server CPU per login", "ms", ""),
    ("argon2.decision_to_phone_result.p99", "decision → phone result p99 under argon2 load", "ms",
     ""),
    ("argon2.p99_increase", "  … ÷ the light-load p99", "x", "< 2"),
    ("argon2.logins_per_s_during", "  logins/s meanwhile", "/s", ""),
    ("argon2_b2b.decision_to_phone_result.p99", "  the same, flows back to back", "ms", ""),
    ("argon2_b2b.p99_increase", "  … ÷ the back-to-back p99", "x", ""),
    ("argon2_b2b.logins_per_s_during", "  logins/s meanwhile", "/s", ""),
    ("idle.sockets", "idle phone sockets on one process", "", "10k and 50k"),
    ("idle.failed", "  sockets that failed", "", "0"),
    ("idle.not_tried", "  sockets not connected before the deadline", "", ""),
    ("idle.connects_per_s", "  connect rate (auth → ready)", "/s", ""),
    ("idle.cpu_ms_per_connect.server", "  server CPU per connect", "ms", ""),
    ("idle.cpu_ms_per_connect.redis", "  redis-server CPU per connect", "ms", ""),
    ("idle.cpu_ms_per_connect.postgres",
     "  PostgreSQL backends CPU per connect (backends alive at the end only)", "ms", ""),
    ("idle.rss_per_socket_kib", "  server RSS per idle socket", "KiB", "≤ 24"),
    ("idle.server_core_fraction", "  server CPU while they idle (share of a core)", "", ""),
    ("idle.create_to_phone.p99", "  create → phone p99 meanwhile (10 in flight)", "ms", ""),
    ("idle.decision_to_phone_result.p99", "  decision → phone result p99 meanwhile", "ms", ""),
    ("idle.decision_to_rp_result.p99", "  decision → RP long-poll result p99 meanwhile", "ms",
     ""),
    ("idle.flows_per_s", "  flows/s meanwhile", "/s", ""),
    ("storm.phones", "reconnect storm: idle phones back after a server restart", "", ""),
    ("storm.not_ready", "  phones not ready by the deadline", "", "0"),
    ("storm.restart_s", "  SIGTERM → new process answers", "s", ""),
    ("storm.all_ready_s", "  SIGTERM → last phone ready", "s", ""),
    ("storm.all_ready_after_up_s", "  new process up → last phone ready", "s", ""),
    ("storm.attempts_per_phone", "  connect attempts per phone (backoff, full jitter)", "", ""),
    ("storm.listen_overflows", "  connections dropped by a full accept queue (machine-wide)",
     "", ""),
    ("storm.create_to_phone.p50", "  sign-in during the storm: create → phone p50", "ms", ""),
    ("storm.create_to_phone.p99", "  … p99", "ms", ""),
    ("storm.create_to_phone.max", "  … max", "ms", ""),
    ("storm.signins", "  sign-ins measured during the storm", "", ""),
]


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 100):
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(results: dict[str, Any]) -> str:
    """The summary as a Markdown table: tapprove, baseline and their ratio for each figure."""
    plan = results["plan"]
    tap = figures(results["targets"].get("tapprove", {}), plan)
    base = figures(results["targets"]["baseline"], plan) if "baseline" in results["targets"] else {}
    lines = [
        "| figure | unit | tapprove | baseline | tapprove ÷ baseline | goal (issue 6) |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for key, label, unit, goal in ROWS:
        t, b = tap.get(key), base.get(key)
        if t is None and b is None:
            continue
        ratio = "-"
        if (
            isinstance(t, int | float)
            and isinstance(b, int | float)
            and b
            and (unit not in ("", "x") or key.startswith("rt."))
        ):
            ratio = f"{t / b:.2f}"
        lines.append(f"| {label} | {unit} | {_fmt(t)} | {_fmt(b)} | {ratio} | {goal} |")
    return "\n".join(lines)


def cluster_table(results: dict[str, Any]) -> str:
    """tapprove on one Redis beside tapprove on the 3-master cluster (`--redis cluster`)."""
    if "tapprove-cluster" not in results["targets"]:
        return ""
    plan = results["plan"]
    single = figures(results["targets"].get("tapprove", {}), plan)
    cluster = figures(results["targets"]["tapprove-cluster"], plan)
    lines = [
        "| figure | unit | one Redis | Redis Cluster (3 masters, 3 replicas) | cluster ÷ one |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for key, label, unit, _goal in ROWS:
        s, c = single.get(key), cluster.get(key)
        if s is None and c is None:
            continue
        numbers = isinstance(s, int | float) and isinstance(c, int | float) and s
        ratio = f"{c / s:.2f}" if numbers else "-"  # type: ignore[operator]
        lines.append(f"| {label} | {unit} | {_fmt(s)} | {_fmt(c)} | {ratio} |")
    return "\n".join(lines)


def repeated(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several whole runs as one result: each run kept, and every figure's values listed."""
    last = runs[-1]
    return {
        "meta": {**last["meta"], "started_at": runs[0]["meta"]["started_at"]},
        "plan": last["plan"],
        "loadavg": {"start": runs[0]["loadavg"]["start"], "end": last["loadavg"]["end"]},
        "seconds": round(sum(r["seconds"] for r in runs), 1),
        "workdir": last["workdir"],
        "runs": runs,
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def _spread(values: list[float]) -> str:
    """`median (min to max)` of the runs' values."""
    if not values:
        return "-"
    median = _median(values)
    if len(values) == 1:
        return _fmt(median)
    return f"{_fmt(median)} ({_fmt(min(values))} to {_fmt(max(values))})"


# A figure "reproduces" when its runs' ratios to the baseline stay within this much of their
# median (back-to-back runs of the same code differ by about ±7 % in flows/s here).
REPRODUCES_WITHIN = 0.10


def repeat_table(results: dict[str, Any]) -> str:
    """Median and range over the runs: tapprove, baseline, and the same-run ratios."""
    runs = results["runs"]
    per_run = []
    for run in runs:
        targets = run["targets"]
        tap = figures(targets.get("tapprove", {}), run["plan"])
        base = figures(targets["baseline"], run["plan"]) if "baseline" in targets else {}
        per_run.append((tap, base))
    lines = [
        f"| figure | unit | tapprove: median (range), {len(runs)} runs | baseline | "
        "ratio of each run's pair: median (range) | reproduces |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for key, label, unit, _goal in ROWS:
        taps = [t[key] for t, _ in per_run if isinstance(t.get(key), int | float)]
        bases = [b[key] for _, b in per_run if isinstance(b.get(key), int | float)]
        if not taps and not bases:
            continue
        ratios = [
            t[key] / b[key]
            for t, b in per_run
            if isinstance(t.get(key), int | float)
            and isinstance(b.get(key), int | float)
            and b[key]
            and (unit not in ("", "x") or key.startswith("rt."))
        ]
        ratio = "-"
        verdict = ""
        if ratios:
            ratio = f"{_median(ratios):.2f} ({min(ratios):.2f} to {max(ratios):.2f})"
            half = (max(ratios) - min(ratios)) / 2 / _median(ratios)
            verdict = "yes" if half <= REPRODUCES_WITHIN else f"no (±{100 * half:.0f} %)"
        lines.append(
            f"| {label} | {unit} | {_spread(taps)} | {_spread(bases)} | {ratio} | {verdict} |"
        )
    return "\n".join(lines)


def phase_table(results: dict[str, Any]) -> str:
    """Every load-generator phase of every target, one line each."""
    lines = [
        "| target | phase | in flight | flows/s | logins/s | create→phone p50 / p99 | "
        "decision→result p50 / p99 (phone) | server CPU ms/flow | machine busy | "
        "load avg (1 min) | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for kind, target in results["targets"].items():
        phases = list(target.get("flows", {}).get("phases", []))
        idle = target.get("idle") or {}
        if idle.get("flow_phase"):
            phases.append(idle["flow_phase"])
        if idle.get("storm"):
            phases.append(idle["storm"]["flow_phase"])
        for p in phases:
            lat = p.get("latency_ms", {})
            c2p = lat.get("create_to_phone", {})
            dec = lat.get("decision_to_phone_result", {})
            lines.append(
                f"| {kind} | {p['name']} | {p['concurrency']} | {_fmt(p['flows_per_s'])} | "
                f"{_fmt(p.get('logins_per_s'))} | "
                f"{_fmt(c2p.get('p50'))} / {_fmt(c2p.get('p99'))} | "
                f"{_fmt(dec.get('p50'))} / {_fmt(dec.get('p99'))} | "
                f"{_fmt(p.get('cpu_ms_per_flow', {}).get('server'))} | "
                f"{_fmt(p['cpu_s'].get('machine_busy_fraction'))} | {p['loadavg'][0]} | "
                f"{', '.join(f'{k}: {v}' for k, v in p['errors'].items()) or '-'} |"
            )
    return "\n".join(lines)


def markdown(results: dict[str, Any], plot_name: str | None) -> str:
    if "runs" in results:
        return markdown_repeated(results, plot_name)
    meta = results["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    load = results["loadavg"]
    parts = [
        f"Command: `{meta['command']}` ({results['plan']['name']} plan), "
        f"{meta['started_at']}, {results['seconds']:.0f} s, commit {meta['git_commit']}"
        + (f" + {meta['git_dirty_files']} uncommitted files" if meta["git_dirty_files"] else "")
        + ".",
        "",
        f"Machine: {meta['nproc']} cores (`nproc` = {meta['nproc']}), {meta['cpu']}, "
        f"{meta['memory_gib']} GiB, Linux {meta['kernel']}, open-file limit "
        f"{meta['nofile_limit']}. Load average (1/5/15 min) at start {load['start']}, at end "
        f"{load['end']}; each phase's 1-minute figure is in the phase table. "
        f"{results['plan']['servers']} server process(es), the load generator on the same "
        "machine.",
        "",
        f"Versions: {versions}; {meta.get('redis_server', '')}; "
        f"PostgreSQL {meta.get('postgres', '')}.",
        "",
        table(results),
        "",
        *([cluster_table(results), ""] if cluster_table(results) else []),
        "Per phase (closed loop; *in flight* = concurrent flows; the phone answers "
        f"{results['plan']['think_ms']} ms after each request arrives, "
        f"{results['plan'].get('paced_think_ms', '-')} ms in the *-paced* phases):",
        "",
        phase_table(results),
    ]
    if plot_name:
        parts += ["", f"![latency percentiles against load]({plot_name})"]
    for kind, target in results["targets"].items():
        note = target.get("idle", {}).get("note")
        if note:
            parts += ["", f"Note ({kind}): {note}."]
    return "\n".join(parts)


def markdown_repeated(results: dict[str, Any], plot_name: str | None) -> str:
    """The block for `--repeat N`: medians and ranges first, then each run's phases."""
    meta = results["meta"]
    runs = results["runs"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    loads = "; ".join(
        f"run {i + 1} ({r['meta']['started_at'][11:]}) {r['loadavg']['start']} → "
        f"{r['loadavg']['end']}"
        for i, r in enumerate(runs)
    )
    parts = [
        f"Command: `{meta['command']}` ({results['plan']['name']} plan, {len(runs)} runs back "
        f"to back, each tapprove then the baseline), {meta['started_at']}, "
        f"{results['seconds']:.0f} s, commit {meta['git_commit']}"
        + (f" + {meta['git_dirty_files']} uncommitted files" if meta["git_dirty_files"] else "")
        + ".",
        "",
        f"Machine: {meta['nproc']} cores, {meta['cpu']}, {meta['memory_gib']} GiB, Linux "
        f"{meta['kernel']}, open-file limit {meta['nofile_limit']}. Load average (1/5/15 min) "
        f"at the start and end of each run: {loads}.",
        "",
        f"Versions: {versions}; {meta.get('redis_server', '')}; "
        f"PostgreSQL {meta.get('postgres', '')}.",
        "",
        repeat_table(results),
        "",
        f"*Reproduces*: the runs' ratios stay within ±{100 * REPRODUCES_WITHIN:.0f} % of "
        "their median.",
    ]
    for i, run in enumerate(runs):
        parts += ["", f"Run {i + 1}, per phase:", "", phase_table(run)]
    if plot_name:
        parts += ["", f"![latency percentiles against load, last run]({plot_name})"]
    return "\n".join(parts)


def publish(results_md: Path, block: str) -> None:
    """Replace the generated block of RESULTS.md (or append one), keeping the prose around it."""
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n\n"
    new = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + new + tail
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    results_md.write_text(text)


def _sweep(target: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not target:
        return []
    return sorted(
        (
            p
            for p in target.get("flows", {}).get("phases", [])
            if p["name"].startswith("rp-c") and p["name"][4:].isdigit()
        ),
        key=lambda p: p["concurrency"],
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput and latency percentiles against flows in flight; baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("create_to_phone", "create → phone receives"),
        ("decision_to_phone_result", "decision → result on the phone socket"),
        ("decision_to_rp_result", "decision → RP long-poll returns"),
    ]
    colors = {"p50": "#1b7837", "p90": "#2166ac", "p99": "#b2182b"}
    styles = {"tapprove": "-", "baseline": "--"}
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    ax = axes[0]
    for kind, style in styles.items():
        sweep = _sweep(results["targets"].get(kind))
        if sweep:
            ax.plot([p["concurrency"] for p in sweep], [p["flows_per_s"] for p in sweep], style,
                    marker="o", markersize=3, color="black", label=kind)
    ax.set_title("complete RP flows/s", fontsize=9)
    ax.set_ylabel("flows/s", fontsize=8)
    ax.legend(fontsize=7)
    for ax, (metric, title) in zip(axes[1:], metrics, strict=True):
        for kind, style in styles.items():
            sweep = _sweep(results["targets"].get(kind))
            xs = [p["concurrency"] for p in sweep]
            for pct, color in colors.items():
                ys = [p["latency_ms"].get(metric, {}).get(pct) for p in sweep]
                ax.plot(xs, ys, style, marker="o", markersize=3, color=color,
                        label=f"{kind} {pct}")
        ax.set_title(title, fontsize=9)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)", fontsize=8)
    axes[-1].legend(fontsize=6, ncol=2)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("RP flows in flight (closed loop)", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    load = results["loadavg"]["start"]
    fig.suptitle(
        f"tapprove (solid) vs bare baseline (dashed); {results['meta']['nproc']} cores shared "
        f"with the load generator, load average at start {load[0]}; "
        f"{results['meta']['started_at']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def print_summary(results: dict[str, Any]) -> None:
    if "runs" in results:
        sys.stdout.write(markdown_repeated(results, None) + "\n")
    else:
        clustered = cluster_table(results)
        sys.stdout.write(
            table(results) + "\n\n" + (clustered + "\n\n" if clustered else "")
            + phase_table(results) + "\n"
        )
    sys.stdout.flush()
