"""`python -m bench.enumeration`: do failed sign-ins and registrations take the same time
whether or not the address has an account? (SECURITY.md: no account enumeration.)

    python -m bench.enumeration               # 30 interleaved pairs of each (≈ 1 min)
    python -m bench.enumeration --pairs 100

Starts a private redis-server, a scratch PostgreSQL database and one `tapprove serve`, adds
one user with `tapprove user add` (a real-cost argon2 hash), then times, in interleaved
pairs so that drift in the machine's load hits both sides alike:

- `POST /api/login` with a wrong password: the user's address against an unknown one;
- `POST /api/register`: the user's (taken) address against a new one.

It prints the median, quartiles and the ratio of medians of each pair. Rate-limit counters
are deleted after each request (the Redis is private), so the limits never answer in the
server's place. Nothing here asserts: wall times on a shared machine are not test results.
The test suite checks the structural reason the times match instead (each side does the
same argon2 work: tests/fixtures/hashing.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from bench import procs

PASSWORD = "correct horse battery staple"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.enumeration", description=__doc__)
    parser.add_argument("--pairs", type=int, default=30, help="timed pairs of each kind")
    return parser.parse_args(argv)


def summary(name: str, samples: list[float]) -> str:
    q1, median, q3 = statistics.quantiles(samples, n=4)
    return f"  {name:<28} median {median * 1000:7.1f} ms   IQR {q1 * 1000:7.1f}-{q3 * 1000:.1f} ms"


async def timed_pairs(
    pairs: int,
    first: Callable[[int], Awaitable[None]],
    second: Callable[[int], Awaitable[None]],
) -> tuple[list[float], list[float]]:
    """`pairs` timings of each, interleaved (and which goes first alternates)."""
    times: tuple[list[float], list[float]] = ([], [])
    await first(-1)  # warm-up, not counted
    await second(-1)
    for i in range(pairs):
        order = ((0, first), (1, second)) if i % 2 == 0 else ((1, second), (0, first))
        for side, call in order:
            started = time.perf_counter()
            await call(i)
            times[side].append(time.perf_counter() - started)
    return times


async def measure(url: str, redis_url: str, known: str, pairs: int) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    run = secrets.token_hex(3)

    async def forget_limits() -> None:
        async for key in redis.scan_iter(match="tapprove:rl:*", count=1000):
            await redis.delete(key)

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def post(path: str, body: dict[str, str], expected: int) -> None:
            response = await client.post(path, json=body)
            await forget_limits()
            if response.status_code != expected:
                raise RuntimeError(f"{path}: {response.status_code} {response.text}")

        async def login_known(i: int) -> None:
            await post("/api/login", {"email": known, "password": "wrong password"}, 401)

        async def login_unknown(i: int) -> None:
            email = f"nobody-{run}-{i}@example.com"
            await post("/api/login", {"email": email, "password": "wrong password"}, 401)

        async def register_taken(i: int) -> None:
            await post("/api/register", {"email": known, "password": PASSWORD}, 202)

        async def register_new(i: int) -> None:
            email = f"new-{run}-{i + 1}@example.com"
            await post("/api/register", {"email": email, "password": PASSWORD}, 202)

        for title, (a_name, a), (b_name, b) in (
            ("failed sign-in", ("known address", login_known), ("unknown address", login_unknown)),
            ("registration", ("taken address", register_taken), ("new address", register_new)),
        ):
            a_times, b_times = await timed_pairs(pairs, a, b)
            ratio = statistics.median(a_times) / statistics.median(b_times)
            print(f"{title} ({pairs} interleaved pairs, load {procs.loadavg()}):")
            print(summary(a_name, a_times))
            print(summary(b_name, b_times))
            print(f"  ratio of medians            {ratio:.3f}")
    await redis.aclose()


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="tapprove-bench-enum-"))
    redis = procs.PrivateRedis.start(workdir / "redis")
    db = await procs.ScratchDatabase.create()
    server: procs.Child | None = None
    try:
        port = procs.free_port()
        url = f"http://127.0.0.1:{port}"
        env = procs.tapprove_env(
            redis_url=redis.url,
            database_url=db.url,
            public_url=url,
            origin=url,
            data_dir=workdir / "data",
        )
        procs.run_cli(["db", "upgrade"], env)
        known = f"known-{secrets.token_hex(3)}@example.com"
        added = json.loads(
            procs.run_cli(["user", "add", known, "--password", PASSWORD, "--verified"], env)
        )
        assert added["email"] == known, added
        argv = [procs.TAPPROVE, "serve", "--host", "127.0.0.1", "--port", str(port)]
        server = procs.spawn("server", argv, workdir / "server.log", env)
        await asyncio.to_thread(procs.wait_http, url + "/healthz", server)
        await measure(url, redis.url, known, args.pairs)
    finally:
        if server is not None:
            server.stop()
        redis.child.stop()
        await db.drop()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
