"""A fake APNs provider API: raw HTTP/2 (h2) over TLS with a throwaway CA, or cleartext.

Answers the way aioapns parses them: success is one HEADERS frame (`:status 200`,
`apns-id`) ending the stream; an error is HEADERS, then one DATA frame `{"reason": ...}`
ending the stream.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import H2Error

from tests.fakes import Reply, ReplyScript
from tests.fixtures import tls

# Answers, shaped like Apple's (Handling notification responses from APNs)


def ok(*, delay: float = 0.0) -> Reply:
    """200, no body (the default answer)."""
    return Reply(200, delay=delay)


def bad_device_token() -> Reply:
    return Reply(400, {"reason": "BadDeviceToken"})


def device_token_not_for_topic() -> Reply:
    return Reply(400, {"reason": "DeviceTokenNotForTopic"})


def unregistered(timestamp_ms: int | None = None) -> Reply:
    """410 Unregistered with the time (ms) APNs learned the token went invalid."""
    stamp = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    return Reply(410, {"reason": "Unregistered", "timestamp": stamp})


def invalid_provider_token() -> Reply:
    return Reply(403, {"reason": "InvalidProviderToken"})


def too_many_requests(retry_after: int | None = None) -> Reply:
    headers = {} if retry_after is None else {"retry-after": str(retry_after)}
    return Reply(429, {"reason": "TooManyRequests"}, headers=headers)


def service_unavailable(retry_after: int | None = None) -> Reply:
    headers = {} if retry_after is None else {"retry-after": str(retry_after)}
    return Reply(503, {"reason": "ServiceUnavailable"}, headers=headers)


def internal_server_error() -> Reply:
    return Reply(500, {"reason": "InternalServerError"})


def slow(delay: float) -> Reply:
    """A success that comes only after `delay` seconds (to make the client time out)."""
    return ok(delay=delay)


# Test PKI


@dataclass(frozen=True)
class ThrowawayCa:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost, as PEM files."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(["h2"])
        return context


def make_test_ca(directory: Path) -> ThrowawayCa:
    """A CA and a server certificate for localhost and 127.0.0.1 (tests/fixtures/tls.py)."""
    files = tls.make_test_ca(directory, ip="127.0.0.1")
    return ThrowawayCa(files.ca, files.cert, files.key)


@dataclass(frozen=True)
class ApnsKey:
    """An APNs auth key (.p8, P-256) written for a test, with the ids that go with it."""

    path: Path
    key_id: str
    team_id: str
    public_key_pem: bytes


def write_apns_key(path: Path, *, team_id: str = "TEAM123456") -> ApnsKey:
    """Write a fresh P-256 private key as Apple ships it (.p8: PKCS#8 PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ApnsKey(path, secrets.token_hex(5).upper(), team_id, public_pem)


# The server


@dataclass(frozen=True)
class ApnsRequest:
    """One POST /3/device/<token> as the fake received it."""

    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def device_token(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def payload(self) -> Any:
        return json.loads(self.body)

    @property
    def bearer(self) -> str:
        """The provider token (JWT) from `authorization: bearer <jwt>`."""
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        assert scheme.lower() == "bearer", self.headers.get("authorization")
        return token

    def jwt_header(self) -> dict[str, Any]:
        header: dict[str, Any] = jwt.get_unverified_header(self.bearer)
        return header

    def jwt_claims(self, public_key_pem: bytes) -> dict[str, Any]:
        """The provider token's claims, checking its ES256 signature with the key."""
        claims: dict[str, Any] = jwt.decode(self.bearer, public_key_pem, algorithms=["ES256"])
        return claims


@dataclass
class _Stream:
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)


class _H2ServerProtocol(asyncio.Protocol):
    def __init__(self, fake: FakeApns) -> None:
        self.fake = fake
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.streams: dict[int, _Stream] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.fake._connections.add(self)
        self.conn.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake._connections.discard(self)

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except H2Error:
            self.close()
            return
        for event in events:
            if isinstance(event, RequestReceived) and event.stream_id is not None:
                headers = {str(k): str(v) for k, v in event.headers or []}
                self.streams[event.stream_id] = _Stream(headers)
            elif isinstance(event, DataReceived) and event.stream_id is not None:
                self.streams[event.stream_id].body.extend(event.data or b"")
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length or 0, event.stream_id
                )
            elif isinstance(event, StreamEnded) and event.stream_id is not None:
                stream = self.streams.pop(event.stream_id)
                self.fake._handle(self, event.stream_id, stream)
            elif isinstance(event, StreamReset) and event.stream_id is not None:
                self.streams.pop(event.stream_id, None)
            elif isinstance(event, ConnectionTerminated):
                self.close()
        self.flush()

    def respond(self, stream_id: int, apns_id: str, reply: Reply) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        headers = [(":status", str(reply.status)), ("apns-id", apns_id)]
        headers += [(k.lower(), v) for k, v in reply.headers.items()]
        body = reply.payload()
        try:
            if body is None:
                self.conn.send_headers(stream_id, headers, end_stream=True)
            else:
                headers.append(("content-type", "application/json"))
                self.conn.send_headers(stream_id, headers)
                self.conn.send_data(stream_id, body, end_stream=True)
        except H2Error:  # the client reset or gave up on the stream
            return
        self.flush()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class FakeApns:
    """HTTP/2 APNs stand-in; `tls=None` for cleartext (aioapns with `ssl_context=None`).

    Records every request in `requests`; answers from `replies`, else 200.
    """

    def __init__(self, tls: ThrowawayCa | None = None) -> None:
        self.tls = tls
        self.replies = ReplyScript()
        self.requests: list[ApnsRequest] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[_H2ServerProtocol] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        """The value for TAPPROVE_APNS_ENDPOINT."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def reply(self, *replies: Reply) -> None:
        """Queue answers for the next requests, in order."""
        self.replies.add(*replies)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _H2ServerProtocol(self),
            "127.0.0.1",
            0,
            ssl=self.tls.server_context() if self.tls else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._connections):
            conn.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def drop_connections(self) -> None:
        """Close every client connection (as APNs does after an idle period or a GOAWAY)."""
        for conn in list(self._connections):
            conn.close()

    def _handle(self, conn: _H2ServerProtocol, stream_id: int, stream: _Stream) -> None:
        request = ApnsRequest(stream.headers.get(":path", ""), stream.headers, bytes(stream.body))
        self.requests.append(request)
        apns_id = stream.headers.get("apns-id") or secrets.token_hex(16)
        reply = self.replies.next() or ok()
        if reply.delay <= 0:
            conn.respond(stream_id, apns_id, reply)
            return

        async def later() -> None:
            await asyncio.sleep(reply.delay)
            conn.respond(stream_id, apns_id, reply)

        task = asyncio.get_running_loop().create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
