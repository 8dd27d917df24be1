"""A deployment as the Procfile describes it: two `web` processes and one `worker`, started
with the Procfile's own command lines, on real Redis and PostgreSQL.

A sign-in starts on web process A while the phone holds its socket on web process B. B is
stopped with SIGTERM (a deploy): it closes the phone's socket with 1012, the phone
reconnects to A, still receives the pending approval, and approves; the browser's stream on
A reports `approved`. B finishes its shutdown. One request id follows the sign-in through the JSON
logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from mobile_stub import Backoff, Decision, EnrollTarget, PhoneClient, enroll
from mobile_stub.client import Approval, Event
from mobile_stub.protocol import device_ws_url
from tests.fixtures.app import free_port
from tests.fixtures.processes import Deployment

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

PROCFILE = Path(__file__).resolve().parents[2] / "Procfile"
ORIGIN = "http://tapprove.test"
PASSWORD = "a long enough password"
# Generous: a loaded two-core machine runs several test sessions at once.
WAIT = 60.0


def procfile() -> dict[str, str]:
    """Process type -> command line, as Heroku/foreman/honcho read the Procfile."""
    found: dict[str, str] = {}
    for line in PROCFILE.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


class Procfile:
    """Starts Procfile process types the way a process manager does: `sh -c`, with PORT set."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.commands = procfile()
        # `tapprove` is the installed console script of this virtualenv.
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**deployment.env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def start(
        self, kind: str, name: str, port: int | None = None, **extra_env: str
    ) -> subprocess.Popen[bytes]:
        env = {**self.env, **extra_env}
        if port is not None:
            env["PORT"] = str(port)
        log = open(self.deployment.workdir / f"{name}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            ["/bin/sh", "-c", f"exec {self.commands[kind]}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.deployment.processes.append(process)
        return process

    def web(self, name: str) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        process = self.start("web", name, port)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + WAIT
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return url, process
            assert process.poll() is None, self.log(name)
            assert time.monotonic() < deadline, f"{name} did not become ready: {self.log(name)}"
            time.sleep(0.1)

    def log(self, name: str) -> str:
        return (self.deployment.workdir / f"{name}.log").read_text(errors="replace")[-4000:]

    def json_log(self, name: str) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_lines(name):
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        return lines

    def log_lines(self, name: str) -> Iterator[str]:
        yield from (self.deployment.workdir / f"{name}.log").read_text().splitlines()


def test_the_procfile_runs_tapprove_web_without_worker_and_a_separate_worker() -> None:
    commands = procfile()

    assert set(commands) == {"web", "worker"}
    web = shlex.split(commands["web"])
    assert web[:2] == ["tapprove", "serve"] and "--no-worker" in web
    assert "${PORT" in commands["web"]
    assert shlex.split(commands["worker"]) == ["tapprove", "worker"]


class Numbers:
    """The number the browser shows, handed to the phone's decider once the test knows it."""

    def __init__(self) -> None:
        self.future: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def decide(self, approval: Approval) -> Decision:
        return Decision.approve(await self.future)


async def test_a_phone_on_a_stopping_process_reconnects_elsewhere_and_approves(
    deployment: Deployment,
) -> None:
    deployment.env["TAPPROVE_PUBLIC_URL"] = ORIGIN
    procs = Procfile(deployment)
    web_a, _ = await asyncio.to_thread(procs.web, "web-a")
    web_b, process_b = await asyncio.to_thread(procs.web, "web-b")
    worker_port = free_port()
    procs.start("worker", "worker", TAPPROVE_METRICS_PORT=str(worker_port))

    await asyncio.to_thread(
        deployment.cli, "user", "add", "deploy@example.com", "--password", PASSWORD, "--verified"
    )
    code = await asyncio.to_thread(deployment.cli, "device", "enroll-code", "deploy@example.com")
    state = await enroll(EnrollTarget(web_b, code["code"]), name="deploy phone", platform="android")

    # The phone app's server list: after a close it tries the next address.
    addresses = [device_ws_url(web_b), device_ws_url(web_a)]
    holder: list[PhoneClient] = []

    def on_event(event: Event) -> None:
        if event["event"] == "disconnected" and holder:
            addresses.append(addresses.pop(0))
            holder[0].ws_url = addresses[0]

    numbers = Numbers()
    phone = PhoneClient(state, on_event=on_event, backoff=Backoff(0.05, 0.5))
    holder.append(phone)
    async with phone, phone.running(numbers.decide):
        first_connection = await phone.wait_for("connected", timeout=WAIT)
        assert first_connection["url"] == device_ws_url(web_b)
        await phone.wait_for("ready", timeout=WAIT)

        # No idle keep-alive connections: uvicorn may close one just as it is reused.
        async with httpx.AsyncClient(
            base_url=web_a,
            headers={"Origin": ORIGIN},
            timeout=30,
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as browser:
            started = await browser.post(
                "/api/login",
                json={"email": "deploy@example.com", "password": PASSWORD},
                headers={"X-Request-Id": "deploy-signin-1"},
            )
            assert started.status_code == 202, started.text
            approval_id = started.json()["approval_id"]
            assert started.json()["channels"] == ["websocket"]  # B holds the phone's socket
            cookie = browser.cookies["tapprove_login"]
            async with websockets.connect(
                f"ws{web_a[4:]}/ws/login/{approval_id}",
                origin=ORIGIN,  # type: ignore[arg-type]
                additional_headers={"Cookie": f"tapprove_login={cookie}"},
            ) as stream:
                first = json.loads(await asyncio.wait_for(stream.recv(), WAIT))
                assert first["type"] == "status" and first["status"] == "pending"
                offered = await phone.wait_for("approval_request", id=approval_id, timeout=WAIT)
                assert offered["repeat"] is False

                process_b.send_signal(signal.SIGTERM)  # a deploy stops B
                gone = await phone.wait_for("disconnected", timeout=WAIT)
                assert gone.get("code") == 1012, gone
                again = await phone.wait_for("connected", timeout=WAIT)
                assert again["url"] == device_ws_url(web_a)
                await phone.wait_for("ready", timeout=WAIT)
                replayed = await phone.wait_for("approval_request", id=approval_id, timeout=WAIT)
                assert replayed["repeat"] is True  # the same approval, not lost

                numbers.future.set_result(started.json()["number"])
                result = await phone.wait_for("decision_result", id=approval_id, timeout=WAIT)
                assert result["status"] == "approved"
                frames = []
                while not frames or frames[-1]["type"] != "result":
                    frames.append(json.loads(await asyncio.wait_for(stream.recv(), WAIT)))
                assert frames[-1] == {"type": "result", "status": "approved", "reason": "device"}

            completed = await browser.post(f"/api/login/{approval_id}/complete")
            assert completed.status_code == 200, completed.text
            assert completed.json() == {"status": "authenticated"}

    # uvicorn shuts down gracefully, then re-raises SIGTERM so its parent sees why it ended.
    assert await asyncio.to_thread(process_b.wait, WAIT) in (0, -signal.SIGTERM)
    b_log = procs.json_log("web-b")
    assert any(line["msg"] == "Application shutdown complete." for line in b_log), b_log
    assert any(
        line.get("path") == "/ws/device" and line.get("close_code") == 1012 for line in b_log
    ), b_log

    # One request id follows the sign-in through A's JSON log: created, then decided.
    traced = {
        line["msg"].split()[2]: line.get("request_id")
        for line in procs.json_log("web-a")
        if line.get("approval_id") == approval_id and line["msg"].startswith("approval ")
    }
    assert traced.get("created") == traced.get("approved") == "deploy-signin-1", traced
    assert not any(PASSWORD in line for line in procs.log_lines("web-a"))

    # The worker serves its own metrics.
    worker_metrics = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=10)
    assert worker_metrics.status_code == 200
    assert "tapprove_delivery_attempts_total" in worker_metrics.text
