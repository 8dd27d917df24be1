"""The benchmark harness still runs end to end, so it cannot rot between benchmark runs.

`python -m bench --smoke` starts its own redis-server, a scratch PostgreSQL database, a real
`tapprove serve` and `tapprove worker`, and a separate load generator, for a few seconds of
each scenario. Nothing here asserts a timing: benchmark figures are not test results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PHASES = {
    "rp-c2-paced",
    "rp-c2",
    "browser",
    "logins-only",
    "rp-c2-paced-argon2",
    "rp-c2-argon2",
    "duo-c2-paced",
    "duo-c2",
}
FIGURES = {
    "light.create_to_phone.p99",
    "light.decision_to_phone_result.p99",
    "light.decision_to_rp_result.p99",
    "light.decision_to_duo_result.p99",
    "b2b.decision_to_phone_result.p99",
    "argon2.p99_increase",
    "sat.rp_flows_per_s_per_process",
    "sat.cpu_ms_per_flow.server",
    "idle.sockets",
    "idle.rss_per_socket_kib",
    "storm.phones",
    "storm.all_ready_s",
    "storm.create_to_phone.p99",
}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_smoke_runs_every_scenario_and_writes_the_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| figure |" in result.stdout

    data = json.loads((tmp_path / "latest.json").read_text())
    assert {"meta", "plan", "loadavg", "targets", "summary", "seconds"} <= set(data)
    assert len(data["loadavg"]["start"]) == 3
    assert data["meta"]["versions"]["uvicorn"]
    assert set(data["targets"]) == {"tapprove"}  # --smoke skips the baseline

    tapprove = data["targets"]["tapprove"]
    phases = {p["name"]: p for p in tapprove["flows"]["phases"]}
    assert set(phases) == PHASES
    for phase in phases.values():
        assert {"flows", "flows_per_s", "errors", "latency_ms", "cpu_s", "loadavg"} <= set(phase)
        assert "server" in phase["cpu_s"]
    for name in ("rp-c2", "rp-c2-paced"):
        rp = phases[name]
        assert rp["flows"] > 0, rp
        assert not rp["errors"], rp["errors"]
        assert {"create_to_phone", "decision_to_phone_result", "decision_to_rp_result"} <= set(
            rp["latency_ms"]
        )
    assert phases["rp-c2-paced"]["think_ms"] > phases["rp-c2"]["think_ms"]
    for name in ("duo-c2", "duo-c2-paced"):
        duo = phases[name]
        assert duo["flows"] > 0, duo
        assert not duo["errors"], duo["errors"]
        assert "decision_to_duo_result" in duo["latency_ms"]

    idle = tapprove["idle"]
    assert idle["connected"] == idle["requested"] == 20
    assert idle["failed"] == 0
    assert idle["flow_phase"]["flows"] > 0

    # The reconnect storm: the server restarted under its idle phones, every one came back
    # (with the reference client's backoff), and sign-ins went through meanwhile.
    storm = idle["storm"]
    assert storm["phones"] == 20
    assert storm["not_ready"] == 0
    assert storm["attempts_per_phone"] >= 1
    assert storm["all_ready_s"] >= storm["restart_s"] > 0
    assert storm["listen_overflows"] >= 0  # machine-wide, so no exact figure
    signins = storm["flow_phase"]
    assert signins["name"] == "signins-during-storm"
    assert signins["flows"] > 0, signins
    assert not signins["errors"], signins["errors"]
    assert "create_to_phone" in signins["latency_ms"]

    assert set(data["summary"]["tapprove"]) >= FIGURES


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_enumeration_timing_probe_runs() -> None:
    """`python -m bench.enumeration` measures what test_enumeration checks structurally."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.enumeration", "--pairs", "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for line in ("failed sign-in (4 interleaved pairs", "registration (4 interleaved pairs"):
        assert line in result.stdout, result.stdout
    assert result.stdout.count("ratio of medians") == 2, result.stdout
