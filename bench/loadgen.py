"""The load-generating process: phones on /ws/device, relying parties, browsers, idle sockets.

Runs apart from the servers it measures (`python -m bench.loadgen CONFIG.json`), on uvloop
with aiohttp for HTTP and WebSockets. Two modes:

- `flows`: connect one phone socket per flow worker, then run each phase of the config in
  turn (closed loop: `concurrency` flows in flight, optionally with flat-out password
  logins beside them) and print one JSON object with every phase's figures.
- `hold`: open `count` idle device sockets (auth, wait for `ready`), print one JSON line,
  keep them open (answering pings) until stdin closes.

All timestamps come from this process's `time.perf_counter()`, so "create -> phone" and
"decision -> result" compare clocks of one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import hmac
import math
import os
import random
import sys
import time
from base64 import b64encode
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from bench import procs
from bench.jws import DeviceSigner
from bench.population import idle_token
from bench.stats import summarize
from mobile_stub.protocol import Backoff

now = time.perf_counter
FLOW_TIMEOUT = 15.0
JSON_HEADERS = {"Content-Type": "application/json"}


class FlowError(Exception):
    """A flow that did not end as expected; `kind` is what the report counts."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def ws_url(http_url: str) -> str:
    return "ws" + http_url[len("http") :]


async def _error_code(response: aiohttp.ClientResponse) -> str:
    try:
        body = orjson.loads(await response.read())
        return f"{response.status}_{body.get('error', '')}"
    except (orjson.JSONDecodeError, AttributeError, aiohttp.ClientError):
        return str(response.status)


# --- phones -----------------------------------------------------------------------------


class Phone:
    """A bench phone: one /ws/device socket; acks each request on receipt, like the app."""

    def __init__(self, spec: dict[str, Any], server: str) -> None:
        self.email: str = spec["email"]
        self.token: str = spec["token"]
        self.signer = DeviceSigner(int(spec["scalar"], 16), spec["device_id"])
        self.server = server
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.seen: dict[str, tuple[dict[str, Any], float]] = {}
        self.request_waiters: dict[str, asyncio.Future[tuple[dict[str, Any], float]]] = {}
        self.result_waiters: dict[str, asyncio.Future[tuple[float, str]]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.stray_frames = 0

    async def connect(self, session: aiohttp.ClientSession, retry: Backoff | None = None) -> None:
        """Connect and wait for `ready`; with `retry`, try again after its delays until then."""
        attempt = 0
        while True:
            try:
                await self._connect(session)
                return
            except (FlowError, aiohttp.ClientError, TimeoutError, OSError):
                if retry is None or attempt > 30:
                    raise
            await asyncio.sleep(retry.delay(attempt))
            attempt += 1

    async def _connect(self, session: aiohttp.ClientSession) -> None:
        if self.ws is not None:
            await self.ws.close()
        self.ws = await session.ws_connect(ws_url(self.server) + "/ws/device", max_msg_size=1 << 20)
        await self.ws.send_str(orjson.dumps({"type": "auth", "token": self.token}).decode())
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 15)
            if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                raise FlowError(f"phone_auth_failed_{msg.type.name}_{msg.data}")
            if orjson.loads(msg.data).get("type") == "ready":
                break
        self.reader = asyncio.create_task(self._read_forever())

    async def _read_forever(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            at = now()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            frame = orjson.loads(msg.data)
            kind = frame.get("type")
            if kind == "approval_request":
                approval = frame["approval"]
                aid = approval["id"]
                await self.ws.send_str(f'{{"type":"ack","id":"{aid}"}}')
                waiter = self.request_waiters.pop(aid, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result((approval, at))
                else:
                    if len(self.seen) > 64:
                        self.seen.clear()
                    self.seen[aid] = (approval, at)
            elif kind == "decision_result":
                waiter_r = self.result_waiters.pop(frame.get("id", ""), None)
                if waiter_r is not None and not waiter_r.done():
                    waiter_r.set_result((at, frame.get("status", "")))
            elif kind == "error":
                waiter_r = self.result_waiters.pop(frame.get("id", ""), None)
                if waiter_r is not None and not waiter_r.done():
                    waiter_r.set_exception(FlowError(f"phone_error_{frame.get('error')}"))
                else:
                    self.stray_frames += 1
        for waiters in (self.request_waiters, self.result_waiters):
            for future in waiters.values():
                if not future.done():
                    future.set_exception(FlowError("phone_socket_closed"))
            waiters.clear()

    async def request(self, aid: str) -> tuple[dict[str, Any], float]:
        """The `approval_request` for `aid` and when it arrived (it may have come already)."""
        if aid in self.seen:
            return self.seen.pop(aid)
        if self.reader is None or self.reader.done():
            raise FlowError("phone_socket_closed")
        future = asyncio.get_running_loop().create_future()
        self.request_waiters[aid] = future
        try:
            return await asyncio.wait_for(future, FLOW_TIMEOUT)
        except TimeoutError:
            raise FlowError("phone_request_timeout") from None
        finally:
            self.request_waiters.pop(aid, None)

    def expect_result(self, aid: str) -> asyncio.Future[tuple[float, str]]:
        future: asyncio.Future[tuple[float, str]] = asyncio.get_running_loop().create_future()
        self.result_waiters[aid] = future
        return future

    async def decide(self, approval: dict[str, Any], number: str | None) -> tuple[
        float, asyncio.Future[tuple[float, str]]
    ]:
        """Sign and send an approve decision; returns when it was sent and its result future."""
        assert self.ws is not None
        aid = approval["id"]
        jws = self.signer.decide(approval, number)
        future = self.expect_result(aid)
        sent = now()
        await self.ws.send_str(
            orjson.dumps({"type": "decision", "id": aid, "jws": jws}).decode()
        )
        return sent, future


async def _await_result(future: asyncio.Future[tuple[float, str]]) -> tuple[float, str]:
    try:
        return await asyncio.wait_for(future, FLOW_TIMEOUT)
    except TimeoutError:
        raise FlowError("decision_result_timeout") from None


# --- flows ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DuoKeys:
    """A Duo integration, signing requests as duo_client 5.x does (signature v5)."""

    ikey: str
    skey: str
    host: str  # the API host name signed over (the server's public URL's)

    def sign(
        self, method: str, path: str, params: dict[str, str]
    ) -> tuple[str, bytes, dict[str, str]]:
        """The path with its query, the body and the headers of a signed request."""
        date = email.utils.formatdate()
        query = "&".join(f"{quote(k, '~')}={quote(v, '~')}" for k, v in sorted(params.items()))
        body = orjson.dumps(params, option=orjson.OPT_SORT_KEYS) if method == "POST" else b""
        canon = "\n".join([
            date, method, self.host, path, "" if method == "POST" else query,
            hashlib.sha512(body).hexdigest(), hashlib.sha512(b"").hexdigest(),
        ])  # fmt: skip
        digest = hmac.new(self.skey.encode(), canon.encode(), hashlib.sha512).hexdigest()
        headers = {
            "Authorization": "Basic " + b64encode(f"{self.ikey}:{digest}".encode()).decode(),
            "Date": date,
        }
        if method == "POST":
            return path, body, {**headers, **JSON_HEADERS}
        return f"{path}?{query}", body, headers


@dataclass
class Context:
    http: aiohttp.ClientSession
    servers: list[str]
    origin: str
    api_key: str
    password: str
    duo: DuoKeys | None = None
    rp_headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rp_headers = {"Authorization": f"Bearer {self.api_key}", **JSON_HEADERS}


async def _rp_wait(ctx: Context, server: str, aid: str) -> tuple[float, str]:
    url = f"{server}/api/v1/approvals/{aid}?wait=30"
    async with ctx.http.get(url, headers=ctx.rp_headers) as response:
        raw = await response.read()
        if response.status != 200:
            raise FlowError(f"rp_wait_{await _error_code(response)}")
    return now(), orjson.loads(raw)["status"]


async def rp_flow(ctx: Context, phone: Phone, server: str, think: float) -> dict[str, float]:
    """RP creates an approval, long-polls it; the phone gets it, acks and approves."""
    body = orjson.dumps({"user": phone.email})
    t0 = now()
    async with ctx.http.post(
        server + "/api/v1/approvals", data=body, headers=ctx.rp_headers
    ) as response:
        raw = await response.read()
        if response.status != 201:
            raise FlowError(f"create_{await _error_code(response)}")
    t_created = now()
    created = orjson.loads(raw)
    aid = created["approval_id"]
    poll = asyncio.create_task(_rp_wait(ctx, server, aid))
    try:
        approval, t_phone = await phone.request(aid)
        if think:
            await asyncio.sleep(think)
        t_decided, result = await phone.decide(approval, created.get("number"))
        t_result, status = await _await_result(result)
        try:
            t_rp, rp_status = await asyncio.wait_for(asyncio.shield(poll), FLOW_TIMEOUT)
        except TimeoutError:
            raise FlowError("rp_wait_timeout") from None
    finally:
        if not poll.done():
            poll.cancel()
    if status != "approved" or rp_status != "approved":
        raise FlowError(f"not_approved_{status}_{rp_status}")
    return {
        "create_rtt": t_created - t0,
        "create_to_phone": t_phone - t0,
        "decision_to_phone_result": t_result - t_decided,
        "decision_to_rp_result": t_rp - t_decided,
        "flow": t_rp - t0,
    }


async def _duo_call(ctx: Context, server: str, method: str, path: str,
                    params: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    assert ctx.duo is not None
    target, body, headers = ctx.duo.sign(method, path, params)
    url = URL(server + target, encoded=True)
    async with ctx.http.request(method, url, data=body or None, headers=headers) as response:
        raw = await response.read()
        if response.status != 200:
            raise FlowError(f"duo_{path.rsplit('/', 1)[1]}_{response.status}")
    found: dict[str, Any] = orjson.loads(raw)["response"]
    return found


async def _duo_wait(ctx: Context, server: str, txid: str) -> tuple[float, str]:
    """auth_status until it is no longer `waiting` (each call is held by the server)."""
    while True:
        status = await _duo_call(ctx, server, "GET", "/auth/v2/auth_status", {"txid": txid})
        if status["result"] != "waiting":
            return now(), status["result"]


async def duo_flow(ctx: Context, phone: Phone, server: str, think: float) -> dict[str, float]:
    """A Duo client's async auth and its long-polled auth_status (duo_client's calls, signed
    v5); the phone gets the approval and confirms it (phone-only: its one choice)."""
    params = {"async": "1", "device": "auto", "factor": "push", "username": phone.email}
    t0 = now()
    txid = (await _duo_call(ctx, server, "POST", "/auth/v2/auth", params))["txid"]
    t_created = now()
    poll = asyncio.create_task(_duo_wait(ctx, server, txid))
    try:
        approval, t_phone = await phone.request(txid)
        if think:
            await asyncio.sleep(think)
        t_decided, result = await phone.decide(approval, approval["number_choices"][0])
        t_result, status = await _await_result(result)
        try:
            t_duo, duo_result = await asyncio.wait_for(asyncio.shield(poll), FLOW_TIMEOUT)
        except TimeoutError:
            raise FlowError("duo_wait_timeout") from None
    finally:
        if not poll.done():
            poll.cancel()
    if status != "approved" or duo_result != "allow":
        raise FlowError(f"not_allowed_{status}_{duo_result}")
    return {
        "create_rtt": t_created - t0,
        "create_to_phone": t_phone - t0,
        "decision_to_phone_result": t_result - t_decided,
        "decision_to_duo_result": t_duo - t_decided,
        "flow": t_duo - t0,
    }


async def browser_flow(ctx: Context, phone: Phone, server: str, think: float) -> dict[str, float]:
    """Password login (argon2id), the /ws/login stream, the phone's approval, then complete."""
    headers = {"Origin": ctx.origin, **JSON_HEADERS}
    body = orjson.dumps({"email": phone.email, "password": ctx.password})
    t0 = now()
    async with ctx.http.post(server + "/api/login", data=body, headers=headers) as response:
        raw = await response.read()
        if response.status != 202:
            raise FlowError(f"login_{await _error_code(response)}")
        morsel = response.cookies.get("tapprove_login")
    t_login = now()
    if morsel is None:
        raise FlowError("login_no_cookie")
    started = orjson.loads(raw)
    aid = started["approval_id"]
    cookie = {"Origin": ctx.origin, "Cookie": f"tapprove_login={morsel.value}"}
    stream = await ctx.http.ws_connect(ws_url(server) + started["stream"], headers=cookie)
    try:
        first = await asyncio.wait_for(stream.receive(), FLOW_TIMEOUT)
        if first.type is not aiohttp.WSMsgType.TEXT:
            raise FlowError(f"stream_{first.type.name}")
        approval, t_phone = await phone.request(aid)
        if think:
            await asyncio.sleep(think)
        t_decided, result = await phone.decide(approval, started.get("number"))
        while True:
            msg = await asyncio.wait_for(stream.receive(), FLOW_TIMEOUT)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise FlowError(f"stream_closed_{msg.type.name}")
            frame = orjson.loads(msg.data)
            if frame.get("type") == "result":
                t_result = now()
                if frame.get("status") != "approved":
                    raise FlowError(f"browser_result_{frame.get('status')}")
                break
    finally:
        await stream.close()
    async with ctx.http.post(
        f"{server}/api/login/{aid}/complete", headers={**cookie, **JSON_HEADERS}
    ) as response:
        await response.read()
        if response.status != 200:
            raise FlowError(f"complete_{await _error_code(response)}")
    t_done = now()
    await _await_result(result)
    return {
        "login_rtt": t_login - t0,
        "create_to_phone": t_phone - t0,
        "decision_to_browser_result": t_result - t_decided,
        "complete_rtt": t_done - t_result,
        "flow": t_done - t0,
    }


async def password_login(ctx: Context, email: str, server: str) -> float:
    """One login of a user without a device (argon2id, then `enrollment_required`)."""
    headers = {"Origin": ctx.origin, **JSON_HEADERS}
    body = orjson.dumps({"email": email, "password": ctx.password})
    t0 = now()
    async with ctx.http.post(server + "/api/login", data=body, headers=headers) as response:
        await response.read()
        if response.status not in (200, 202):
            raise FlowError(f"login_{await _error_code(response)}")
    return now() - t0


FLOWS = {"rp": rp_flow, "browser": browser_flow, "duo": duo_flow}


async def _counters(
    redis_url: str | None, postgres: procs.ScratchDatabase | None
) -> dict[str, dict[str, int]]:
    """Redis calls per command and PostgreSQL transaction/row counters, where available."""
    found: dict[str, dict[str, int]] = {}
    with contextlib.suppress(Exception):
        if redis_url:
            found["redis_calls"] = await procs.redis_commands(redis_url)
        if postgres is not None:
            found["postgres"] = await postgres.counters()
    return found


# --- phases -----------------------------------------------------------------------------


@dataclass
class Window:
    """The measured part of a phase. It opens once every worker has finished a flow (so a
    closed loop that started all at once is past its first, synchronised round) and after
    the configured warm-up; until then it is at infinity and nothing counts."""

    start: float = math.inf
    end: float = math.inf
    done: int = 0  # flows and logins finished so far, in or out of the window
    warmed: set[int] = field(default_factory=set)

    def inside(self, at: float) -> bool:
        return self.start <= at <= self.end


async def run_phase(
    ctx: Context,
    phones: list[Phone],
    login_users: list[str],
    pids: dict[str, list[int]],
    phase: dict[str, Any],
    postgres: procs.ScratchDatabase | None = None,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """One closed-loop measurement: warm up, then count and time everything in the window."""
    path = phase.get("path", "rp")
    concurrency = int(phase.get("concurrency", 0))
    logins = int(phase.get("login_load", 0))
    think = float(phase.get("think_ms", 0)) / 1000
    # Paced phases: each answer comes after think * U(1 - jitter, 1 + jitter), and workers
    # start at random offsets, so flows in flight do not march in step (identical think
    # times would keep them arriving as one burst). Seeded: runs repeat.
    jitter = float(phase.get("think_jitter", 0))
    pace = random.Random(f"{phase['name']}-{concurrency}")
    duration = float(phase["duration"])
    warmup = float(phase.get("warmup", 1.0))
    max_warmup = max(warmup, float(phase.get("max_warmup", 4 * warmup)))
    begin = now()
    window = Window()
    workers = concurrency + logins
    steady = asyncio.Event()
    samples: dict[str, list[float]] = defaultdict(list)
    login_samples: list[float] = []
    errors: Counter[str] = Counter()
    counts = {"flows": 0, "logins": 0}
    flow = FLOWS[path]

    def finished(worker: int) -> None:
        window.done += 1
        if worker not in window.warmed:
            window.warmed.add(worker)
            if len(window.warmed) == workers:
                steady.set()

    def failed(worker: int, kind: str) -> None:
        finished(worker)
        if now() >= window.start:
            errors[kind] += 1

    async def flow_worker(index: int) -> None:
        phone = phones[index]
        turn = index
        if jitter:
            await asyncio.sleep(pace.uniform(0, think))
        while now() < window.end:
            server = ctx.servers[turn % len(ctx.servers)]
            turn += 1
            wait = think * pace.uniform(1 - jitter, 1 + jitter) if jitter else think
            try:
                record = await flow(ctx, phone, server, wait)
            except FlowError as exc:
                failed(index, exc.kind)
                if "429" in exc.kind:
                    await asyncio.sleep(1.0)
                continue
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                failed(index, type(exc).__name__)
                await asyncio.sleep(0.05)
                continue
            finished(index)
            # Every flow that ends inside the window counts, however long it took: keeping only
            # flows that also started inside it would favour the fast ones.
            if window.inside(now()):
                counts["flows"] += 1
                for name, value in record.items():
                    samples[name].append(value)

    async def login_worker(index: int) -> None:
        turn = index
        me = concurrency + index
        while now() < window.end:
            email = login_users[turn % len(login_users)]
            server = ctx.servers[turn % len(ctx.servers)]
            turn += logins
            try:
                took = await password_login(ctx, email, server)
            except FlowError as exc:
                failed(me, exc.kind)
                continue
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                failed(me, type(exc).__name__)
                await asyncio.sleep(0.05)
                continue
            finished(me)
            if window.inside(now()):
                counts["logins"] += 1
                login_samples.append(took)

    pids = {**pids, "loadgen": [os.getpid()]}
    tasks = [asyncio.create_task(flow_worker(i)) for i in range(concurrency)]
    tasks += [asyncio.create_task(login_worker(i)) for i in range(logins)]
    await asyncio.sleep(warmup)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(steady.wait(), max(0.0, begin + max_warmup - now()))
    if postgres is not None:
        # The pool opens connections as load grows, so its backends are looked up now.
        with contextlib.suppress(Exception):
            pids["postgres"] = await postgres.backends()
    counters_before = await _counters(redis_url, postgres)
    done_before = window.done
    before = procs.cpu_snapshot(pids)
    window.start = now()
    window.end = window.start + duration
    load_before = procs.loadavg()
    until = phase.get("until_exists")
    if until:
        # A phase during a reconnect storm ends with it (the runner writes the file), or at
        # `duration` at the latest.
        while now() < window.end and not os.path.exists(until):
            await asyncio.sleep(0.05)
        window.end = min(window.end, now())
        duration = window.end - window.start
    else:
        await asyncio.sleep(duration)
    after = procs.cpu_snapshot(pids)
    counters_after = await _counters(redis_url, postgres)
    done_between = window.done - done_before
    finished_tasks, pending = await asyncio.wait(tasks, timeout=FLOW_TIMEOUT)
    for task in pending:
        task.cancel()
    for task in finished_tasks:
        if task.exception() is not None:
            errors[f"worker_{type(task.exception()).__name__}"] += 1
    cpu = procs.cpu_delta(before, after)
    out: dict[str, Any] = {
        "name": phase["name"],
        "path": path if concurrency else None,
        "concurrency": concurrency,
        "think_ms": phase.get("think_ms", 0),
        "think_jitter": jitter,
        "login_load": logins,
        "warmup_s": round(window.start - begin, 2),
        "steady": steady.is_set(),
        "duration": round(duration, 3),
        "flows": counts["flows"],
        "flows_per_s": round(counts["flows"] / duration, 2),
        "errors": dict(errors),
        "latency_ms": {name: summarize(values) for name, values in sorted(samples.items())},
        "cpu_s": cpu,
        "loadavg": load_before,
    }
    if logins:
        out["logins"] = counts["logins"]
        out["logins_per_s"] = round(counts["logins"] / duration, 2)
        out["login_latency_ms"] = summarize(login_samples)
    per_window = counts["flows"] + counts["logins"]
    counters: dict[str, dict[str, float]] = {}
    if per_window:
        for group, values in procs.counter_delta(before, after).items():
            counters[f"{group}_process"] = {
                key: round(value / per_window, 2) for key, value in sorted(values.items())
            }
    if done_between and counters_before and counters_after:
        # Per flow (or login) finished between the two reads, which bracket the window.
        for group in counters_before:
            if group not in counters_after:
                continue
            keys = sorted(set(counters_before[group]) | set(counters_after[group]))
            deltas = {
                key: counters_after[group].get(key, 0) - counters_before[group].get(key, 0)
                for key in keys
            }
            counters[group] = {
                key: round(delta / done_between, 2) for key, delta in deltas.items() if delta
            }
    if counters:
        out["per_flow_counters"] = counters
    if counts["flows"]:
        out["cpu_ms_per_flow"] = {
            name: round(1000 * seconds / counts["flows"], 3)
            for name, seconds in cpu.items()
            if name in pids
        }
    return out


async def run_flows(config: dict[str, Any]) -> dict[str, Any]:
    servers: list[str] = config["servers"]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
    ) as http:
        duo = DuoKeys(**config["duo"]) if config.get("duo") else None
        ctx = Context(http, servers, config["origin"], config.get("api_key", ""),
                      config["password"], duo)
        needed = max([int(p.get("concurrency", 0)) for p in config["phases"]] + [0])
        phones = [
            Phone(spec, servers[i % len(servers)])
            for i, spec in enumerate(config["phones"][:needed])
        ]
        if len(phones) < needed:
            raise SystemExit(f"config has {len(phones)} phones, phases need {needed}")
        connect_started = now()
        retry = Backoff(**config["connect_backoff"]) if config.get("connect_backoff") else None
        for start in range(0, len(phones), 50):
            await asyncio.gather(*(p.connect(http, retry) for p in phones[start : start + 50]))
        connected_in = now() - connect_started
        results = []
        for phase in config["phases"]:
            print(f"loadgen: phase {phase['name']} ...", file=sys.stderr, flush=True)
            result = await run_phase(
                ctx, phones, config.get("login_users", []), config.get("pids", {}), phase,
                procs.ScratchDatabase(config["database"], "") if config.get("database") else None,
                config.get("redis_url"),
            )
            print(
                f"loadgen: phase {phase['name']}: {result['flows_per_s']} flows/s"
                + (f", {result.get('logins_per_s')} logins/s" if result["login_load"] else "")
                + (f", errors {result['errors']}" if result["errors"] else ""),
                file=sys.stderr,
                flush=True,
            )
            results.append(result)
        for phone in phones:
            if phone.ws is not None:
                await phone.ws.close()
        return {
            "phones": len(phones),
            "phone_connect_s": round(connected_in, 3),
            "stray_phone_frames": sum(p.stray_frames for p in phones),
            "phases": results,
        }


# --- idle sockets -----------------------------------------------------------------------


async def hold(config: dict[str, Any]) -> None:
    """Open `count` idle device sockets, report, and keep them until stdin closes.

    With `reconnect`, a socket the server drops comes back the way the reference client
    (mobile_stub) does it: after full-jitter capped exponential backoff, reset by `ready`.
    A `storm` line on stdin starts watching for the next drop of every socket (a server
    restart); once every one of them is ready again, one JSON line reports how long it took.
    """
    url = ws_url(config["server"]) + "/ws/device"
    seed, first, count = config["seed"], int(config["first"]), int(config["count"])
    local = config.get("local_addr")
    connector = aiohttp.TCPConnector(limit=0, local_addr=(local, 0) if local else None)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    gate = asyncio.Semaphore(int(config.get("connect_concurrency", 100)))
    backoff = Backoff(**config["backoff"]) if config.get("reconnect") else None
    rand = random.Random(f"{seed}-{first}").random
    sockets: dict[int, aiohttp.ClientWebSocketResponse] = {}
    lives: list[asyncio.Task[None]] = []
    errors: Counter[str] = Counter()
    handshake: list[float] = []
    rss_before = procs.rss_bytes(os.getpid())
    storm = Storm()

    async def open_one(session: aiohttp.ClientSession, index: int) -> str | None:
        """Connect, authenticate and wait for `ready`; None when ready, else what failed."""
        started = now()
        try:
            ws = await session.ws_connect(url, max_msg_size=1 << 16)
            auth = {"type": "auth", "token": idle_token(seed, index)}
            await ws.send_str(orjson.dumps(auth).decode())
            msg = await asyncio.wait_for(ws.receive(), 30)
            if msg.type is not aiohttp.WSMsgType.TEXT or b'"ready"' not in msg.data.encode():
                await ws.close()
                return f"not_ready_{msg.type.name}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return type(exc).__name__
        handshake.append(now() - started)
        sockets[index] = ws
        return None

    async def life(session: aiohttp.ClientSession, index: int) -> None:
        """Read until the server drops the socket; then, with `reconnect`, come back."""
        while True:
            ws = sockets[index]
            async for _ in ws:  # aiohttp answers the server's pings while we read
                pass
            storm.dropped(index)
            if backoff is None:
                return
            attempt = 0
            while True:
                await asyncio.sleep(backoff.delay(attempt, rand))
                attempt += 1
                storm.attempts += 1
                failure = await open_one(session, index)
                if failure is None:
                    storm.ready(index)
                    break
                storm.errors[failure] += 1

    deadline = now() + float(config.get("connect_deadline", 600))
    skipped: list[int] = []

    async def first_connect(session: aiohttp.ClientSession, index: int) -> None:
        async with gate:
            if now() > deadline:
                skipped.append(index)
                return
            failure = await open_one(session, index)
        if failure is not None:
            errors[failure] += 1
            return
        lives.append(asyncio.create_task(life(session, index)))

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        began = now()
        await asyncio.gather(*(first_connect(session, first + i) for i in range(count)))
        took = now() - began
        report = {
            "event": "connected",
            "ok": len(sockets),
            "failed": sum(errors.values()),
            "errors": dict(errors),
            "not_tried_before_deadline": len(skipped),
            "seconds": round(took, 3),
            "connects_per_s": round(len(sockets) / took, 1) if took else None,
            "handshake_ms": summarize(handshake),
            "client_rss_per_socket_kib": round(
                (procs.rss_bytes(os.getpid()) - rss_before) / max(1, len(sockets)) / 1024, 2
            ),
        }
        print(orjson.dumps(report).decode(), flush=True)
        loop = asyncio.get_running_loop()
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "storm":
            handshake.clear()
            storm.watch(set(sockets))
            # The runner stops the server only after this line: no drop goes unwatched.
            print(orjson.dumps({"event": "watching"}).decode(), flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(storm.done.wait(), float(config.get("storm_deadline", 300)))
            print(orjson.dumps(storm.report(handshake)).decode(), flush=True)
        still_open = sum(1 for ws in sockets.values() if not ws.closed)
        print(orjson.dumps({"event": "closing", "still_open": still_open}).decode(), flush=True)
        for task in lives:
            task.cancel()
    # Leaving without a close handshake per socket; the server sees the resets at once.
    os._exit(0)


@dataclass
class Storm:
    """A reconnect storm seen by one holder: every watched socket dropped and came back."""

    watched: set[int] = field(default_factory=set)
    waiting: set[int] = field(default_factory=set)  # dropped since `watch`, not ready again
    started: float = 0.0
    first_drop: float = 0.0
    last_drop: float = 0.0
    readies: list[float] = field(default_factory=list)
    attempts: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def watch(self, sockets: set[int]) -> None:
        self.watched, self.waiting = set(sockets), set()
        self.started, self.first_drop, self.last_drop = now(), 0.0, 0.0
        self.readies, self.attempts = [], 0
        self.errors.clear()
        self.done.clear()

    def dropped(self, index: int) -> None:
        if index in self.watched:
            self.watched.discard(index)
            self.waiting.add(index)
            self.first_drop = self.first_drop or now()
            self.last_drop = now()

    def ready(self, index: int) -> None:
        if index in self.waiting:
            self.waiting.discard(index)
            self.readies.append(now())
            if not self.waiting and not self.watched:
                self.done.set()

    def report(self, handshake: list[float]) -> dict[str, Any]:
        """Times from the first drop (the server going away) to the n-th socket ready."""
        readies = sorted(self.readies)

        def after_drop(share: float) -> float | None:
            if not readies:
                return None
            return round(readies[max(0, math.ceil(share * len(readies)) - 1)] - self.first_drop, 3)

        return {
            "event": "storm",
            "sockets": len(readies),
            "first_drop": self.first_drop,
            "drops_s": round(self.last_drop - self.first_drop, 3),
            "half_ready_s": after_drop(0.5),
            "p90_ready_s": after_drop(0.9),
            "all_ready_s": after_drop(1.0),
            "first_ready_at": readies[0] if readies else None,
            "all_ready_at": readies[-1] if readies else None,
            "not_ready": len(self.waiting) + len(self.watched),
            "attempts": self.attempts,
            "errors": dict(self.errors),
            "handshake_ms": summarize(handshake),
        }


def main() -> None:
    procs.raise_nofile()
    with open(sys.argv[1], "rb") as handle:
        config = orjson.loads(handle.read())
    import uvloop

    if config["mode"] == "hold":
        uvloop.run(hold(config))
        return
    result = uvloop.run(run_flows(config))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
