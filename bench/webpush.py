"""`python -m bench.webpush`: how long from a relying party's create to the push service's
request for Web Push, beside create → the phone's WebSocket frame, in one run.

    python -m bench.webpush            # 300 approvals per channel, one at a time (≈ 1 min)
    python -m bench.webpush --count 50

The same processes as `python -m bench` (private redis-server, a scratch PostgreSQL database,
`tapprove worker` and `tapprove serve --no-worker`), in test mode so the server sends Web
Push over plain http to the fake push service (tests/fakes/webpush.py) in this process,
which checks the VAPID token and decrypts every message as a browser would. Each approval
is for a user of its own (no supersede, no push-fatigue wait) and the next starts when the
last arrived, so the figures are latency with nothing queued, not throughput. Both clocks
are this process's `time.time()`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec

from bench import procs
from bench.population import populate_tapprove
from bench.runner import ORIGIN, log
from bench.stats import summarize
from tests.fakes.webpush import FakePushService

HERE = Path(__file__).resolve().parent


def vapid_key() -> str:
    scalar = ec.generate_private_key(ec.SECP256R1()).private_numbers().private_value
    return base64.urlsafe_b64encode(scalar.to_bytes(32)).rstrip(b"=").decode()


async def create(http: aiohttp.ClientSession, url: str, api_key: str, email: str) -> str:
    async with http.post(
        url + "/api/v1/approvals",
        json={"user": email},
        headers={"Authorization": f"Bearer {api_key}"},
    ) as response:
        body = await response.json()
        if response.status != 201:
            raise RuntimeError(f"create failed: {response.status} {body}")
        approval_id: str = body["approval_id"]
        return approval_id


async def web_push_latencies(
    http: aiohttp.ClientSession,
    url: str,
    api_key: str,
    phones: list[dict[str, Any]],
    fake: FakePushService,
) -> list[float]:
    key = (await (await http.get(url + "/api/webpush/key")).json())["public_key"]
    for phone in phones:
        subscription = fake.subscribe(key)
        async with http.patch(
            url + "/api/devices/me",
            json={"push": {"provider": "webpush", "subscription": subscription.to_json()}},
            headers={"Authorization": f"Bearer {phone['token']}"},
        ) as response:
            if response.status != 200:
                raise RuntimeError(f"subscription refused: {await response.text()}")
    latencies = []
    for phone in phones:
        seen = len(fake.requests)
        started = time.time()
        approval_id = await create(http, url, api_key, phone["email"])
        deadline = time.monotonic() + 30
        while len(fake.requests) == seen:
            if time.monotonic() > deadline:
                raise RuntimeError("no push arrived in 30 s")
            await asyncio.sleep(0.0005)
        push = fake.requests[seen]
        if push.refused or not push.payload or push.payload["approval_id"] != approval_id:
            raise RuntimeError(f"unexpected push: {push.refused} {push.payload}")
        latencies.append(push.arrived - started)
    return latencies


async def websocket_latencies(
    http: aiohttp.ClientSession, url: str, api_key: str, phones: list[dict[str, Any]]
) -> list[float]:
    latencies = []
    ws_url = "ws" + url.removeprefix("http") + "/ws/device"
    for phone in phones:
        async with http.ws_connect(ws_url, origin=ORIGIN) as ws:
            await ws.send_json({"type": "auth", "token": phone["token"]})
            ready = await ws.receive_json(timeout=10)
            assert ready["type"] == "ready", ready
            started = time.time()
            approval_id = await create(http, url, api_key, phone["email"])
            while True:
                frame = await ws.receive_json(timeout=30)
                if frame.get("type") == "approval_request":
                    break
            latencies.append(time.time() - started)
            assert frame["approval"]["id"] == approval_id
            await ws.send_json({"type": "ack", "id": approval_id})
    return latencies


async def run(count: int, workdir: Path) -> dict[str, Any]:
    fake = FakePushService()
    await fake.start()
    redis = procs.PrivateRedis.start(workdir / "redis")
    db = await procs.ScratchDatabase.create()
    children: list[procs.Child] = []
    try:
        url = f"http://127.0.0.1:{procs.free_port()}"
        env = {
            **procs.tapprove_env(
                redis_url=redis.url,
                database_url=db.url,
                public_url=url,
                origin=ORIGIN,
                data_dir=workdir / "data",
            ),
            "TAPPROVE_TEST_MODE": "true",
            "TAPPROVE_WEBPUSH_TEST_ENDPOINTS": fake.test_endpoint,
            "TAPPROVE_VAPID_PRIVATE_KEY": vapid_key(),
            "TAPPROVE_VAPID_SUBJECT": "mailto:bench@tapprove.test",
        }
        procs.run_cli(["db", "upgrade"], env)
        children.append(procs.spawn("worker", [procs.TAPPROVE, "worker"], workdir / "w.log", env))
        port = url.rsplit(":", 1)[1]
        argv = [procs.TAPPROVE, "serve", "--no-worker", "--host", "127.0.0.1", "--port", port]
        server = procs.spawn("server", argv, workdir / "server.log", env)
        children.append(server)
        await asyncio.to_thread(procs.wait_http, url + "/healthz", server)
        population = await populate_tapprove(db.url, url, 2 * count, 0)
        async with aiohttp.ClientSession() as http:
            log(f"web push: {count} approvals")
            push = await web_push_latencies(
                http, url, population.api_key, population.phones[:count], fake
            )
            log(f"websocket: {count} approvals")
            socket = await websocket_latencies(
                http, url, population.api_key, population.phones[count:]
            )
        return {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "count": count,
            "loadavg": procs.loadavg(),
            "create_to_push_service": summarize(push),
            "create_to_websocket_frame": summarize(socket),
        }
    finally:
        for child in reversed(children):
            child.stop()
        redis.child.stop()
        await db.drop()
        await fake.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.webpush", description=__doc__)
    parser.add_argument("--count", type=int, default=300, help="approvals per channel")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args(argv)
    workdir = args.out / f"webpush-{int(time.time())}"
    result = asyncio.run(run(args.count, workdir))
    (args.out / "webpush-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    for name in ("create_to_websocket_frame", "create_to_push_service"):
        s = result[name]
        print(f"{name:<28} n={s['count']}  p50 {s['p50']} ms  p90 {s['p90']} ms  p99 {s['p99']} ms")
    print(f"load average {result['loadavg']}")


if __name__ == "__main__":
    main()
