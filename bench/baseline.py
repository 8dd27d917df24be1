"""The bare baseline: the least this stack (Starlette on uvicorn, redis.asyncio pub/sub) can do.

It answers the same routes with the same messages as tapprove, so the load generator drives
both unchanged, but with no authentication (a device "token" is just the user's name), no
signature check, no SQL and no audit log. What it keeps: one process-wide Redis subscriber
fanned out to local queues (as tapprove does), a short-lived Redis key with each result so
a long-poll that subscribes after the decision still sees it, and argon2id on the password
login path (with app's parameters), because that cost is what the browser figure is about.

Run: `python -m bench.baseline --port P --redis-url redis://...` (uvicorn, the same flags as
`tapprove serve`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
import uvicorn
from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from bench import PASSWORD as BENCH_PASSWORD

RESULT_KEEP = 300
RESULT_APPROVED = b'{"type":"result","status":"approved"}'
PENDING = '{"type":"status","status":"pending","channels":["websocket"]}'
TTL = 120

_hasher = PasswordHasher()
_PASSWORD_HASH = _hasher.hash(BENCH_PASSWORD)


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Bus:
    """One Redis pub/sub connection per process, fanned out to local queues per channel."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.pubsub = redis.pubsub()
        self.listeners: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self.confirm: dict[str, asyncio.Future[None]] = {}
        self.reader: asyncio.Task[None] | None = None
        # redis-py's PubSub opens its connection on first use; concurrent first uses race.
        self.lock = asyncio.Lock()

    async def _read(self) -> None:
        while True:
            if not self.pubsub.subscribed:
                await asyncio.sleep(0.05)
                continue
            message = await self.pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            if message["type"] == "subscribe":
                future = self.confirm.pop(channel, None)
                if future is not None and not future.done():
                    future.set_result(None)
            elif message["type"] == "message":
                event = orjson.loads(message["data"])
                for queue in self.listeners.get(channel, ()):
                    queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def listen(self, channel: str) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        if self.reader is None:
            self.reader = asyncio.create_task(self._read())
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        listeners = self.listeners.setdefault(channel, set())
        listeners.add(queue)
        if len(listeners) == 1:
            future = asyncio.get_running_loop().create_future()
            self.confirm[channel] = future
            async with self.lock:
                await self.pubsub.subscribe(channel)
            await asyncio.wait_for(future, 5)
        try:
            yield queue
        finally:
            listeners.discard(queue)
            if not listeners:
                del self.listeners[channel]
                with contextlib.suppress(Exception):
                    async with self.lock:
                        await self.pubsub.unsubscribe(channel)


def user_channel(user: str) -> str:
    return f"b:ev:user:{user}"


def approval_channel(aid: str) -> str:
    return f"b:ev:approval:{aid}"


def result_key(aid: str) -> str:
    return f"b:result:{aid}"


def bus(conn: Request | WebSocket) -> Bus:
    found: Bus = conn.app.state.bus
    return found


async def _start(user: str, request: Request) -> dict[str, Any]:
    """Make up an approval and publish it to the user's devices."""
    now = time.time()
    approval = {
        "id": secrets.token_hex(16),
        "status": "pending",
        "created_at": _rfc3339(now),
        "expires_at": _rfc3339(now + TTL),
        "context": {"ip": request.client.host if request.client else "", "user_agent": "",
                    "browser": "Unknown", "os": "Unknown"},
        "match": {"mode": "typed", "digits": 2},
        "challenge": base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode(),
    }
    event = orjson.dumps({"type": "approval_request", "approval": approval})
    await bus(request).redis.publish(user_channel(user), event)
    return approval


async def create(request: Request) -> Response:
    body = orjson.loads(await request.body())
    approval = await _start(str(body["user"]), request)
    number = f"{secrets.randbelow(100):02d}"
    return _json(
        {"approval_id": approval["id"], "number": number, "expires_at": approval["expires_at"]},
        201,
    )


async def status(request: Request) -> Response:
    aid = request.path_params["approval_id"]
    wait = float(request.query_params.get("wait") or 0)
    async with bus(request).listen(approval_channel(aid)) as queue:
        found = await bus(request).redis.get(result_key(aid))
        if found is None and wait > 0:
            deadline = asyncio.get_running_loop().time() + wait
            while found is None:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    event = await asyncio.wait_for(queue.get(), remaining)
                    if event.get("type") == "result":
                        found = event["status"]
    if isinstance(found, bytes):
        found = found.decode()
    return _json({"approval_id": aid, "status": found or "pending"})


async def device_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        auth = orjson.loads(await asyncio.wait_for(websocket.receive_text(), 5))
    except (TimeoutError, WebSocketDisconnect, orjson.JSONDecodeError):
        with contextlib.suppress(Exception):
            await websocket.close(4401)
        return
    user = str(auth.get("token"))
    the_bus = bus(websocket)
    async with the_bus.listen(user_channel(user)) as queue:
        await websocket.send_text(orjson.dumps({"type": "ready", "device_id": user[:64]}).decode())

        async def relay() -> None:
            while True:
                event = await queue.get()
                await websocket.send_text(orjson.dumps(event).decode())

        relaying = asyncio.create_task(relay())
        try:
            while True:
                frame = orjson.loads(await websocket.receive_text())
                kind = frame.get("type")
                if kind == "ack":
                    await the_bus.redis.publish(
                        approval_channel(frame["id"]), b'{"type":"delivered","channel":"websocket"}'
                    )
                elif kind == "decision":
                    aid = frame["id"]
                    async with the_bus.redis.pipeline(transaction=False) as pipe:
                        pipe.set(result_key(aid), "approved", ex=RESULT_KEEP)
                        pipe.publish(approval_channel(aid), RESULT_APPROVED)
                        pipe.publish(
                            user_channel(user),
                            orjson.dumps(
                                {"type": "approval_resolved", "id": aid, "status": "approved"}
                            ),
                        )
                        await pipe.execute()
                    await websocket.send_text(
                        f'{{"type":"decision_result","id":"{aid}","status":"approved"}}'
                    )
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            relaying.cancel()


async def login(request: Request) -> Response:
    body = orjson.loads(await request.body())
    try:
        await asyncio.to_thread(_hasher.verify, _PASSWORD_HASH, str(body.get("password")))
    except VerifyMismatchError:
        return _json({"error": "invalid_credentials", "message": "wrong"}, 401)
    approval = await _start(str(body["email"]), request)
    number = f"{secrets.randbelow(100):02d}"
    response = _json(
        {
            "status": "approval_required",
            "approval_id": approval["id"],
            "number": number,
            "match": approval["match"],
            "expires_at": approval["expires_at"],
            "channels": ["websocket"],
            "stream": f"/ws/login/{approval['id']}",
        },
        202,
    )
    response.set_cookie("tapprove_login", secrets.token_urlsafe(32), httponly=True,
                        samesite="strict")
    return response


async def login_stream(websocket: WebSocket) -> None:
    aid = websocket.path_params["approval_id"]
    await websocket.accept()
    the_bus = bus(websocket)
    async with the_bus.listen(approval_channel(aid)) as queue:
        found = await the_bus.redis.get(result_key(aid))
        if found is None:
            await websocket.send_text(PENDING)
            while found is None:
                event = await queue.get()
                if event.get("type") == "delivered":
                    await websocket.send_text(orjson.dumps(event).decode())
                elif event.get("type") == "result":
                    found = event["status"]
        status_text = found.decode() if isinstance(found, bytes) else found
        await websocket.send_text(orjson.dumps({"type": "result", "status": status_text}).decode())
        await websocket.close(1000)


async def complete(request: Request) -> Response:
    found = await bus(request).redis.get(result_key(request.path_params["approval_id"]))
    if found not in (b"approved", "approved"):
        return _json({"error": "not_approved", "message": "not approved"}, 409)
    return _json({"status": "authenticated"})


async def healthz(request: Request) -> Response:
    return _json({"status": "ok"})


def create_app(redis_url: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # redis-py 8 caps a pool at 100 connections and then raises at once.
        redis = aioredis.Redis.from_url(redis_url, max_connections=10_000)
        app.state.bus = Bus(redis)
        try:
            yield
        finally:
            await redis.aclose()

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/api/v1/approvals", create, methods=["POST"]),
            Route("/api/v1/approvals/{approval_id}", status),
            Route("/api/login", login, methods=["POST"]),
            Route("/api/login/{approval_id}/complete", complete, methods=["POST"]),
            WebSocketRoute("/ws/device", device_socket),
            WebSocketRoute("/ws/login/{approval_id}", login_stream),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    from bench.procs import raise_nofile

    raise_nofile()
    # The same server settings as app/server.py's run_server (kept in step by hand).
    uvicorn.run(
        create_app(args.redis_url),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        ws_max_size=64 * 1024,
        ws_ping_interval=20.0,
        ws_ping_timeout=40.0,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=10,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
