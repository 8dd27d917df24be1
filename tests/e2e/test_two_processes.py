"""End to end across real processes: two `tapprove serve` on one Redis and one PostgreSQL,
a `tapprove worker`, the reference phone (mobile_stub) on one process and the browser on
the other. Every event has to cross processes through Redis. Each test runs on a single
Redis and again on a Redis Cluster (three masters, three replicas; sharded pub/sub).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis
import websockets

from tests.fixtures.cluster import LocalCluster, cluster_env
from tests.fixtures.processes import Deployment

pytestmark = pytest.mark.timeout(180)

ORIGIN = "http://tapprove.test"
PASSWORD = "a long enough password"


def enroll_phone(deployment: Deployment, email: str, server: str, state: Path) -> None:
    code = deployment.cli("device", "enroll-code", email)
    assert code["uri"].startswith("tapprove://enroll?url=http%3A%2F%2Ftapprove.test&code=")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mobile_stub",
            "enroll",
            code["code"],
            "--server",
            server,
            "--state",
            str(state),
            "--name",
            "e2e phone",
            "--json",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["user"] == {"email": email}


def run_phone(state: Path, auto: str, number_file: Path | None = None) -> subprocess.Popen[bytes]:
    number = ["--number-from", str(number_file)] if number_file else []
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mobile_stub",
            "run",
            "--state",
            str(state),
            "--auto",
            auto,
            *number,
            "--once",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def phone_events(
    process: subprocess.Popen[bytes], seen: list[dict[str, object]]
) -> list[dict[str, object]]:
    out, _ = process.communicate(timeout=60)
    return seen + [json.loads(line) for line in out.decode().splitlines() if line.strip()]


async def wait_until_ready(process: subprocess.Popen[bytes]) -> list[dict[str, object]]:
    """Read the phone's events until its socket is authenticated (`ready`)."""
    assert process.stdout is not None
    seen: list[dict[str, object]] = []
    while True:
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
        if not line:
            raise AssertionError(
                f"phone exited: {process.stderr.read().decode()}"
                if process.stderr
                else "phone exited"
            )
        seen.append(json.loads(line))
        if seen[-1]["event"] == "ready":
            return seen


@pytest.fixture(params=["redis", "cluster"])
def two_servers(
    request: pytest.FixtureRequest, deployment: Deployment
) -> tuple[Deployment, str, str]:
    if request.param == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        deployment.env.update(cluster_env(cluster))
        deployment.cluster = cluster
    deployment.env["TAPPROVE_PUBLIC_URL"] = ORIGIN
    first, second = deployment.serve(), deployment.serve()
    deployment.worker()
    return deployment, first, second


async def test_phone_on_one_process_approves_a_browser_on_another(
    two_servers: tuple[Deployment, str, str], tmp_path: Path
) -> None:
    deployment, phone_server, browser_server = two_servers
    deployment.cli("user", "add", "e2e@example.com", "--password", PASSWORD, "--verified")
    state, number_file = tmp_path / "phone.json", tmp_path / "number.txt"
    number_file.write_text("")
    enroll_phone(deployment, "e2e@example.com", phone_server, state)
    phone = run_phone(state, "approve", number_file)
    seen = await wait_until_ready(phone)

    async with httpx.AsyncClient(base_url=browser_server, headers={"Origin": ORIGIN}) as browser:
        started = await browser.post(
            "/api/login", json={"email": "e2e@example.com", "password": PASSWORD}
        )
        assert started.status_code == 202, started.text
        body = started.json()
        assert body["channels"] == ["websocket"]
        cookie = browser.cookies["tapprove_login"]
        stream_url = browser_server.replace("http", "ws") + body["stream"]
        async with websockets.connect(
            stream_url,
            origin=ORIGIN,  # type: ignore[arg-type]
            additional_headers={"Cookie": f"tapprove_login={cookie}"},
        ) as stream:
            frames = [json.loads(await asyncio.wait_for(stream.recv(), 10))]
            number_file.write_text(body["number"])
            while frames[-1]["type"] != "result":
                frames.append(json.loads(await asyncio.wait_for(stream.recv(), 20)))
        assert frames[0]["type"] == "status" and frames[0]["status"] == "pending"
        assert {"type": "delivered", "channel": "websocket"} in frames
        assert frames[-1] == {"type": "result", "status": "approved", "reason": "device"}
        done = await browser.post(f"/api/login/{body['approval_id']}/complete")
        assert done.status_code == 200 and done.json() == {"status": "authenticated"}
        session = browser.cookies["tapprove_session"]

    events = phone_events(phone, seen)
    assert phone.returncode == 0, events
    request = next(e for e in events if e["event"] == "approval_request")
    approval = request["approval"]
    assert isinstance(approval, dict) and approval["id"] == body["approval_id"]
    assert {"event": "decision_result", "id": body["approval_id"], "status": "approved"} in events

    # The session lives in Redis, so the other process knows it too.
    async with httpx.AsyncClient(
        base_url=phone_server, cookies={"tapprove_session": session}
    ) as other:
        account = await other.get("/api/account")
    assert account.status_code == 200 and account.json()["email"] == "e2e@example.com"
    if deployment.cluster is not None:
        prefix = deployment.env["TAPPROVE_REDIS_PREFIX"]
        for address in deployment.cluster.masters():
            host, port = address.rsplit(":", 1)
            with redis.Redis(host=host, port=int(port)) as node:
                assert next(node.scan_iter(match=f"{prefix}*", count=1000), None), address


async def test_relying_party_waits_on_one_process_while_the_phone_denies_on_another(
    two_servers: tuple[Deployment, str, str], tmp_path: Path
) -> None:
    deployment, phone_server, rp_server = two_servers
    deployment.cli("user", "add", "rp-e2e@example.com", "--password", PASSWORD, "--verified")
    api_key = deployment.cli("apikey", "create", "ssh")["api_key"]
    state = tmp_path / "phone.json"
    enroll_phone(deployment, "rp-e2e@example.com", phone_server, state)
    phone = run_phone(state, "deny")
    seen = await wait_until_ready(phone)

    async with httpx.AsyncClient(
        base_url=rp_server, timeout=40, headers={"Authorization": f"Bearer {api_key}"}
    ) as rp:
        created = await rp.post("/api/v1/approvals", json={"user": "rp-e2e@example.com"})
        assert created.status_code == 201, created.text
        approval_id = created.json()["approval_id"]
        result = await rp.get(f"/api/v1/approvals/{approval_id}", params={"wait": 25})
    events = phone_events(phone, seen)
    assert result.status_code == 200 and result.json()["status"] == "denied", events
    assert {"event": "decision_result", "id": approval_id, "status": "denied"} in events
