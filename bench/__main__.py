"""`python -m bench`: measure tapprove and the bare baseline, print a table, write JSON.

    python -m bench                  # the full run (≈ 6-8 min on 2 cores)
    python -m bench --quick          # the same scenarios, shorter, 1,000 sockets (≈ 2 min)
    python -m bench --quick --repeat 3   # three runs: median and range of every figure
    python -m bench --smoke          # seconds: 1 server, a few flows, no baseline (CI)
    python -m bench --sockets 50000  # more idle phone sockets
    python -m bench --publish        # also rewrite bench/RESULTS.md's table and bench/latency.png
    python -m bench --profile        # py-spy on the server under saturated RP load instead
    python -m bench --profile-connect --sockets 3000   # py-spy while idle phones connect
    python -m bench --trace          # Redis commands, SQL transactions, syscalls per RP flow
    python -m bench --redis cluster  # tapprove on one Redis and on a local 3-master cluster
    python -m bench --render bench/out/latest.json [--publish]   # re-print a saved run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import procs, report
from bench.runner import Plan, log, plan_json, plans, run_target

HERE = Path(__file__).resolve().parent
SCENARIOS = ("light", "saturation", "browser", "argon2", "idle", "duo", "storm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter phases, 1,000 idle sockets")
    mode.add_argument("--smoke", action="store_true", help="a few seconds; for the test suite")
    parser.add_argument("--sockets", type=int, help="idle phone sockets (default 10,000)")
    parser.add_argument("--servers", type=int, default=1, help="tapprove serve processes")
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare baseline")
    parser.add_argument(
        "--redis",
        choices=("single", "cluster"),
        default="single",
        help="cluster: run tapprove on one Redis and again on a local 3-master cluster",
    )
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}"
    )
    parser.add_argument("--out", type=Path, default=HERE / "out", help="where JSON goes")
    parser.add_argument(
        "--publish", action="store_true", help="rewrite bench/RESULTS.md's block and latency.png"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the server under saturated RP load"
    )
    parser.add_argument(
        "--profile-connect",
        action="store_true",
        help="py-spy the server while the idle phones connect (--sockets of them)",
    )
    parser.add_argument(
        "--trace", action="store_true", help="count Redis/SQL round trips of one RP flow"
    )
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="print (and --publish) a saved run again"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="N",
        help="run everything N times; the table gives each figure's median and range",
    )
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument("--profile-concurrency", type=int, default=50)
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = plans()["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.sockets is not None:
        plan.sockets = args.sockets
    plan.servers = max(1, args.servers)
    if args.no_baseline:
        plan.baseline = False
    plan.scenarios = [s.strip() for s in args.only.split(",") if s.strip() in SCENARIOS]
    return plan


async def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = make_plan(args)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = args.out / f"run-{stamp}"
    workdir.mkdir(parents=True, exist_ok=True)
    meta = report.machine_meta()
    meta["command"] = "python -m bench" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    meta["started_at"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta["redis_server"] = procs.PrivateRedis.version_text()
    meta["postgres"] = await procs.postgres_version()
    began = time.monotonic()
    results: dict[str, Any] = {
        "meta": meta,
        "plan": plan_json(plan),
        "loadavg": {"start": procs.loadavg()},
        "targets": {},
        "workdir": str(workdir),
    }
    log(f"plan {plan.name}; load average {results['loadavg']['start']}; logs in {workdir}")
    kinds = ["tapprove"] + (["tapprove-cluster"] if args.redis == "cluster" else [])
    kinds += ["baseline"] if plan.baseline else []
    for kind in kinds:
        results["targets"][kind] = await run_target(kind, plan, workdir / kind)
    results["loadavg"]["end"] = procs.loadavg()
    results["seconds"] = round(time.monotonic() - began, 1)
    results["summary"] = {
        kind: report.figures(target, results["plan"])
        for kind, target in results["targets"].items()
    }
    return results


def save(results: dict[str, Any], args: argparse.Namespace) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    name = Path(results["workdir"]).name.removeprefix("run-")
    text = json.dumps(results, indent=1)
    (out / f"bench-{name}.json").write_text(text)
    (out / "latest.json").write_text(text)
    plot_path = out / f"latency-{name}.png"
    if results["plan"]["name"] != "smoke" and "saturation" in results["plan"]["scenarios"]:
        report.plot(results.get("runs", [results])[-1], plot_path)
    (out / f"bench-{name}.md").write_text(report.markdown(results, plot_path.name) + "\n")
    if args.publish:
        if plot_path.exists():
            shutil.copyfile(plot_path, HERE / "latency.png")
        report.publish(HERE / "RESULTS.md", report.markdown(results, "latency.png"))
        log("published bench/RESULTS.md and bench/latency.png")
    log(f"JSON: {out / f'bench-{name}.json'}")


def main() -> None:
    args = parse_args()
    procs.raise_nofile()
    if args.profile_connect:
        from bench.profile import profile_connect

        asyncio.run(profile_connect(make_plan(args), args))
        return
    if args.profile:
        from bench.profile import profile

        asyncio.run(profile(make_plan(args), args))
        return
    if args.trace:
        from bench.trace import trace

        asyncio.run(trace(make_plan(args), args))
        return
    if args.render:
        results = json.loads(args.render.read_text())
        report.print_summary(results)
        if args.publish:
            plot_path = args.out / "latency-render.png"
            args.out.mkdir(parents=True, exist_ok=True)
            report.plot(results.get("runs", [results])[-1], plot_path)
            shutil.copyfile(plot_path, HERE / "latency.png")
            report.publish(HERE / "RESULTS.md", report.markdown(results, "latency.png"))
            log("published bench/RESULTS.md and bench/latency.png")
        return
    if args.repeat > 1:
        runs = []
        for i in range(args.repeat):
            log(f"run {i + 1} of {args.repeat}")
            runs.append(asyncio.run(run(args)))
        results = report.repeated(runs)
    else:
        results = asyncio.run(run(args))
    report.print_summary(results)
    save(results, args)


if __name__ == "__main__":
    main()
