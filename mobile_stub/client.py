"""The device's HTTP and WebSocket conversation with a tapprove server (docs/protocol.md §3).

`enroll()` registers a new device. `PhoneClient` then lists and answers approvals over HTTP,
or holds the device WebSocket with `run()`: it acks every request at once, asks a `decide`
callback, signs the answer, reconnects with jittered backoff, and records every step as an
event that tests can await (`wait_for`, `events`) or a CLI can print (`on_event`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from mobile_stub.keys import DeviceKey
from mobile_stub.protocol import (
    CLOSE_UNAUTHORIZED,
    Approval,
    Backoff,
    Decision,
    EnrollTarget,
    close_is_fatal,
    decision_claims,
    device_ws_url,
    passcode_seed,
)
from mobile_stub.state import DeviceState

USER_AGENT = "tapprove-mobile-stub/0.1"
HTTP_TIMEOUT = 10.0

Event = dict[str, Any]
"""One thing that happened: `{"event": <name>, ...fields}` (see `PhoneClient.run`)."""
Decider = Callable[[Approval], Awaitable[Decision | None]]
"""Chooses the answer to one approval; None leaves it unanswered."""
EventHandler = Callable[[Event], None]
SeedKeeper = Callable[[DeviceState], None]
"""Stores the state with a newly received passcode seed before the server is told."""

_T = TypeVar("_T")


class ApiError(Exception):
    """The server answered with a PROTOCOL error body `{"error","message"}` (or no JSON at all)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code} (HTTP {status}): {message}")
        self.status = status
        self.code = code
        self.message = message


class DeviceAuthError(Exception):
    """The server closed the device socket with 4401: the token is revoked or invalid."""


class SessionEnded(Exception):
    """The device socket ended in a way that reconnecting cannot fix (the reason is given)."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def always(decision: Decision) -> Decider:
    """A decider that gives the same answer to every approval (e.g. `always(Decision.deny())`)."""

    async def decide(approval: Approval) -> Decision:
        return decision

    return decide


async def _json_or_raise(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json() if response.content else None
    code, message = f"http_{response.status_code}", response.reason_phrase
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = str(body.get("error", code))
        message = str(body.get("message", message))
    raise ApiError(response.status_code, code, message)


async def enroll(
    target: EnrollTarget,
    *,
    name: str,
    platform: str,
    push: Mapping[str, str] | None = None,
    key: DeviceKey | None = None,
    http: httpx.AsyncClient | None = None,
) -> DeviceState:
    """Register a new device key with a one-time enrollment code; returns the state to save."""
    key = key or DeviceKey.generate()
    body: dict[str, Any] = {
        "code": target.code,
        "name": name,
        "platform": platform,
        "public_key": key.public_jwk(),
    }
    if push is not None:
        body["push"] = dict(push)
    async with contextlib.AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(
                httpx.AsyncClient(timeout=HTTP_TIMEOUT, headers={"User-Agent": USER_AGENT})
            )
        answer = await _json_or_raise(
            await http.post(f"{target.server_url}/api/devices", json=body)
        )
    try:
        device_id, token = answer["device_id"], answer["device_token"]
        email = answer["user"]["email"]
    except (TypeError, KeyError):
        raise ApiError(201, "bad_response", f"unexpected enrollment answer: {answer!r}") from None
    if not all(isinstance(v, str) and v for v in (device_id, token, email)):
        raise ApiError(201, "bad_response", f"unexpected enrollment answer: {answer!r}")
    return DeviceState(
        server_url=target.server_url,
        device_id=device_id,
        device_token=token,
        private_key_pem=key.private_pem(),
        user_email=email,
        name=name,
        platform=platform,
        passcode_secret=passcode_seed(answer.get("passcode")) or "",
    )


def _parse_frame(raw: str | bytes) -> dict[str, Any] | None:
    try:
        frame = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return frame if isinstance(frame, dict) else None


class PhoneClient:
    """An enrolled device talking to its server; drive it from asyncio code or the CLI.

    Typical test use::

        async with PhoneClient(state).running(always(Decision.deny())) as phone:
            await phone.wait_for("ready")
            ...  # start a login
            result = await phone.wait_for("decision_result", id=approval_id)
    """

    def __init__(
        self,
        state: DeviceState,
        *,
        http: httpx.AsyncClient | None = None,
        on_event: EventHandler | None = None,
        backoff: Backoff | None = None,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
        open_timeout: float = 10.0,
        ready_timeout: float = 10.0,
        reconcile_after: float = 2.0,
        keep_seed: SeedKeeper | None = None,
    ) -> None:
        self.state = state
        self._keep_seed = keep_seed
        self.key = state.key()
        self.ws_url = device_ws_url(state.server_url)
        self._http = http
        self._own_http = http is None
        self._on_event = on_event
        self._backoff = backoff or Backoff()
        self._rand = rand
        self._clock = clock
        self._open_timeout = open_timeout
        self._ready_timeout = ready_timeout
        self._reconcile_after = reconcile_after

        self.history: list[Event] = []
        self._taken: set[int] = set()  # history indexes already returned by wait_for
        self._wakeup = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._running = False
        self._finished = False

        self._decide: Decider | None = None
        self._once = False
        self._result: Event | None = None
        self._ws: ClientConnection | None = None  # open socket, possibly before `ready`
        self._live: ClientConnection | None = None  # socket that answered `ready`
        self._seen: set[str] = set()  # approval ids never to ask about again
        self._sent: set[str] = set()  # approval ids we signed a decision for
        # approval id -> (JWS, decision) signed but not yet answered by a result
        self._unconfirmed: dict[str, tuple[str, Decision]] = {}
        self._transmitted: set[str] = set()  # approval ids whose JWS went out at least once
        self._offered: set[str] = set()  # approval ids the current connection has offered
        self._tasks: dict[str, asyncio.Task[None]] = {}

    # -- HTTP ------------------------------------------------------------------------------

    async def __aenter__(self) -> PhoneClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._http is not None and self._own_http:
            await self._http.aclose()
            self._http = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=HTTP_TIMEOUT)
        return self._http

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        headers = {
            "Authorization": f"Bearer {self.state.device_token}",
            "User-Agent": USER_AGENT,
        }
        response = await self._client().request(
            method, f"{self.state.server_url}{path}", json=body, headers=headers
        )
        return await _json_or_raise(response)

    async def pending(self) -> list[Approval]:
        """The user's pending approvals (`GET /api/devices/me/approvals`)."""
        answer = await self._request("GET", "/api/devices/me/approvals")
        approvals = answer.get("approvals") if isinstance(answer, dict) else None
        if not isinstance(approvals, list):
            raise ApiError(200, "bad_response", f"unexpected approvals answer: {answer!r}")
        return approvals

    async def approval(self, approval_id: str) -> Approval:
        """One approval by id (`GET /api/approvals/<id>`)."""
        answer = await self._request("GET", f"/api/approvals/{quote(approval_id, safe='')}")
        if not isinstance(answer, dict):
            raise ApiError(200, "bad_response", f"unexpected approval answer: {answer!r}")
        return answer

    def sign(self, approval: Mapping[str, Any], decision: Decision) -> str:
        """The compact JWS carrying `decision` on `approval`, signed with the device key."""
        claims = decision_claims(approval, decision, now=self._clock())
        return self.key.sign(claims, kid=self.state.device_id)

    async def decide_http(self, approval: Approval | str, decision: Decision) -> dict[str, Any]:
        """Answer over HTTP (after a push); fetches the approval first when given its id."""
        if isinstance(approval, str):
            approval = await self.approval(approval)
        path = f"/api/approvals/{quote(approval['id'], safe='')}/decision"
        answer = await self._request("POST", path, {"jws": self.sign(approval, decision)})
        return answer if isinstance(answer, dict) else {"status": answer}

    async def update(
        self, *, name: str | None = None, push: Mapping[str, str] | None = None
    ) -> None:
        """Rename the device or change its push registration (`PATCH /api/devices/me`)."""
        body: dict[str, Any] = {}
        if name is not None:
            body["name"] = name
        if push is not None:
            body["push"] = dict(push)
        await self._request("PATCH", "/api/devices/me", body)

    async def unenroll(self) -> None:
        """Remove this device from the account (`DELETE /api/devices/me`)."""
        await self._request("DELETE", "/api/devices/me")

    # -- events ----------------------------------------------------------------------------

    def _emit(self, name: str, **fields: Any) -> Event:
        event: Event = {"event": name, **fields}
        self.history.append(event)
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()
        if self._on_event is not None:
            self._on_event(event)
        return event

    @staticmethod
    def _matches(event: Event, name: str, approval_id: str | None) -> bool:
        return event["event"] == name and (approval_id is None or event.get("id") == approval_id)

    # A default timeout keeps a broken end-to-end test from hanging until the suite timeout.
    async def wait_for(
        self,
        name: str,
        *,
        id: str | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> Event:
        """The oldest `name` event (for approval `id`, if given) not yet returned by wait_for.

        Raises TimeoutError after `timeout` seconds, or RuntimeError once `run()` has ended
        without such an event.
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    wakeup = self._wakeup
                    for index, event in enumerate(self.history):
                        if index not in self._taken and self._matches(event, name, id):
                            self._taken.add(index)
                            return event
                    if self._finished:
                        raise RuntimeError(
                            f"phone stopped before a {name!r} event: {self._summary()}"
                        )
                    await wakeup.wait()
        except TimeoutError:
            raise TimeoutError(f"no {name!r} event within {timeout}s: {self._summary()}") from None

    def _summary(self) -> str:
        return ", ".join(str(e["event"]) for e in self.history[-20:]) or "no events"

    async def events(self) -> AsyncIterator[Event]:
        """Every event from the first one on, then new ones as they come, until run() ends."""
        index = 0
        while True:
            wakeup = self._wakeup
            while index < len(self.history):
                yield self.history[index]
                index += 1
            if self._finished:
                return
            await wakeup.wait()

    # -- WebSocket -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the device socket is open and the server has said `ready`."""
        return self._live is not None

    async def send_frame(self, frame: Mapping[str, Any] | str) -> None:
        """Send a raw frame on the live socket (lets tests probe the server's frame checks)."""
        ws = self._live
        if ws is None:
            raise RuntimeError("the device socket is not connected")
        await ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def drop_connection(self) -> None:
        """Cut the socket without a close frame, like a lost network; run() then reconnects."""
        ws = self._ws
        if ws is not None:
            ws.transport.abort()

    def stop(self) -> None:
        """Ask `run()` to close the socket and return; safe to call at any time."""
        self._stop_requested.set()

    @contextlib.asynccontextmanager
    async def running(
        self, decide: Decider | None = None, *, once: bool = False
    ) -> AsyncIterator[PhoneClient]:
        """Run the device socket in the background for the body of an `async with`."""
        task = asyncio.create_task(self.run(decide, once=once))
        try:
            yield self
        except BaseException:
            self.stop()
            with contextlib.suppress(Exception):  # the body's error is the one to report
                await task
            raise
        self.stop()
        await task  # re-raises DeviceAuthError / SessionEnded from the run

    async def run(self, decide: Decider | None = None, *, once: bool = False) -> Event | None:
        """Hold the device socket until `stop()` (or, with `once`, the first decision result).

        Every approval_request is acked at once; `decide` (None: never answer) is then
        called in its own task, which is cancelled if the approval is resolved first. The
        answer goes out as a signed `decision` frame. The same approval id is never decided
        twice: when the server replays a request after a reconnect, it is acked again and,
        if our decision never got a result, the same signed JWS is sent again. A decision
        still without result `reconcile_after` seconds after a reconnect, for an approval the
        server did not offer again, is settled from `GET /api/approvals/<id>` (events with
        `"via": "http"`).

        Events: connected, ready, approval_request (id, approval, repeat, and for a repeat
        `answer`: "sent" (signed; resent if it got no result), "deciding" (the decider is still
        on it) or "none" (left unanswered)), decision_sent (id,
        decision, number, reason, resent), skipped, decider_error, decision_result, error,
        approval_resolved, bad_frame, disconnected (code/reason or error), reconnecting
        (attempt, delay), fatal (code, message), stopped, plus any unknown server frame by
        its type.

        Returns the decision_result/error event for the last decision this device sent, if
        any. Raises DeviceAuthError on close 4401 and SessionEnded on other fatal endings.
        """
        if self._running:
            raise RuntimeError("PhoneClient.run() is already running")
        self._running, self._finished = True, False
        self._stop_requested.clear()
        self._decide, self._once, self._result = decide, once, None
        attempt = 0
        try:
            while not self._stop_requested.is_set():
                got_ready = await self._until_stopped(self._session())
                if self._stop_requested.is_set():
                    break
                if got_ready:
                    attempt = 0
                delay = self._backoff.delay(attempt, self._rand)
                attempt += 1
                self._emit("reconnecting", attempt=attempt, delay=round(delay, 3))
                await self._until_stopped(asyncio.sleep(delay))
        except (DeviceAuthError, SessionEnded) as exc:
            self._emit("fatal", code=getattr(exc, "code", CLOSE_UNAUTHORIZED), message=str(exc))
            raise
        finally:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._running, self._finished = False, True
            self._emit("stopped")
        return self._result

    async def _until_stopped(self, work: Coroutine[Any, Any, _T]) -> _T | None:
        """Run `work` until it ends or stop() is called (then close politely and cancel it)."""
        task = asyncio.create_task(work)
        stopper = asyncio.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            ws = self._ws
            if ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2.0)
            return None
        finally:
            stopper.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, stopper, return_exceptions=True)

    async def _session(self) -> bool:
        """One connection: auth, ready, then frames until it closes. True if it got `ready`."""
        got_ready = False
        code: int | None = None
        reason = ""
        try:
            async with connect(
                self.ws_url, open_timeout=self._open_timeout, user_agent_header=USER_AGENT
            ) as ws:
                self._ws = ws
                self._emit("connected", url=self.ws_url)
                await ws.send(json.dumps({"type": "auth", "token": self.state.device_token}))
                first = _parse_frame(await asyncio.wait_for(ws.recv(), self._ready_timeout))
                if first is None or first.get("type") != "ready":
                    self._emit("bad_frame", expected="ready", frame=first)
                    return False
                got_ready = True
                self._live, self._offered = ws, set()
                self._emit("ready", device_id=first.get("device_id"))
                reconcile = asyncio.create_task(self._reconcile()) if self._unconfirmed else None
                try:
                    async for raw in ws:
                        await self._handle(ws, raw)
                finally:
                    if reconcile is not None:
                        reconcile.cancel()
                        await asyncio.gather(reconcile, return_exceptions=True)
                code, reason = ws.close_code, ws.close_reason or ""
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            reason = exc.rcvd.reason if exc.rcvd is not None else ""
        except InvalidStatus as exc:
            status = exc.response.status_code
            self._emit("disconnected", error=f"handshake refused with HTTP {status}")
            if 400 <= status < 500 and status not in (408, 429):
                raise SessionEnded(
                    f"the server refused the device socket (HTTP {status})"
                ) from None
            return False
        except (OSError, TimeoutError, WebSocketException) as exc:
            self._emit("disconnected", error=str(exc) or type(exc).__name__)
            return got_ready
        finally:
            self._ws = self._live = None
        self._emit("disconnected", code=code, reason=reason)
        if code == CLOSE_UNAUTHORIZED:
            raise DeviceAuthError(
                "the server rejected the device token (close 4401): it was revoked or is "
                "invalid; enroll this device again"
            )
        if code is not None and close_is_fatal(code):
            raise SessionEnded(f"the server closed the device socket: {code} {reason}", code=code)
        return got_ready

    async def _handle(self, ws: ClientConnection, raw: str | bytes) -> None:
        frame = _parse_frame(raw)
        if frame is None:
            self._emit("bad_frame", raw=(raw if isinstance(raw, str) else repr(raw))[:200])
            return
        kind = frame.get("type")
        if kind == "approval_request":
            await self._on_request(ws, frame)
        elif kind == "approval_resolved":
            self._on_resolved(frame)
        elif kind in ("decision_result", "error"):
            self._on_result(str(kind), frame)
        elif kind == "passcode_seed":
            await self._on_passcode_seed(ws, frame)
        else:
            fields = {k: v for k, v in frame.items() if k not in ("type", "event")}
            self._emit(str(kind), **fields)

    async def _on_passcode_seed(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        """Keep the offline-passcode seed, then say so: a crash before the ack only means the
        server sends it again on the next connection."""
        secret = passcode_seed(frame.get("passcode"))
        if secret is None:
            self._emit("bad_frame", frame={"type": "passcode_seed"})  # never print a seed
            return
        if secret != self.state.passcode_secret:
            self.state = replace(self.state, passcode_secret=secret)
            if self._keep_seed is not None:
                self._keep_seed(self.state)
        await ws.send(json.dumps({"type": "passcode_seed_ack"}))
        self._emit("passcode_seed", stored=True)

    async def _on_request(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        approval = frame.get("approval")
        if not isinstance(approval, dict) or not isinstance(approval.get("id"), str):
            self._emit("bad_frame", frame=frame)
            return
        aid: str = approval["id"]
        # Ack before anything else: the browser shows "delivered" and push is not needed.
        await ws.send(json.dumps({"type": "ack", "id": aid}))
        self._offered.add(aid)
        repeat = aid in self._seen
        if repeat:
            # Offered again after a reconnect (a server restart, a network drop): say where our
            # answer is, which is not always "given".
            answer = "sent" if aid in self._sent else "deciding" if aid in self._tasks else "none"
            self._emit("approval_request", id=aid, approval=approval, repeat=True, answer=answer)
        else:
            self._emit("approval_request", id=aid, approval=approval, repeat=False)
        if repeat:
            unconfirmed = self._unconfirmed.get(aid)
            if unconfirmed is not None:
                # Still pending after a reconnect, so our decision never landed: send the same
                # signed answer again (never a new one).
                await self._send_decision(ws, aid, *unconfirmed)
            return
        self._seen.add(aid)
        if self._decide is not None:
            self._tasks[aid] = asyncio.create_task(self._answer(self._decide, approval))

    async def _answer(self, decide: Decider, approval: Approval) -> None:
        aid: str = approval["id"]
        try:
            decision = await decide(approval)
            if decision is None:
                self._emit("skipped", id=aid)
                return
            jws = self.sign(approval, decision)
            self._unconfirmed[aid] = (jws, decision)
            self._sent.add(aid)
            ws = self._live
            if ws is None:
                return  # the server replays the request after a reconnect; we answer then
            with contextlib.suppress(ConnectionClosed):  # likewise
                await self._send_decision(ws, aid, jws, decision)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken decider must not take the socket down
            self._emit("decider_error", id=aid, message=f"{type(exc).__name__}: {exc}")
        finally:
            self._tasks.pop(aid, None)

    async def _send_decision(
        self, ws: ClientConnection, aid: str, jws: str, decision: Decision
    ) -> None:
        resent = aid in self._transmitted
        await ws.send(json.dumps({"type": "decision", "jws": jws}))
        self._transmitted.add(aid)
        self._emit(
            "decision_sent",
            id=aid,
            decision=decision.decision,
            number=decision.number,
            reason=decision.reason,
            resent=resent,
        )

    async def _reconcile(self) -> None:
        """Settle decisions signed before a reconnect that the server did not offer again.

        Not replayed means the approval ended while we were away (maybe by our own decision,
        whose result was lost with the old socket), so its final status is read over HTTP.
        """
        await asyncio.sleep(self._reconcile_after)
        for aid, (jws, decision) in list(self._unconfirmed.items()):
            if aid in self._offered:
                continue
            try:
                status = (await self.approval(aid)).get("status")
            except ApiError as exc:
                if exc.status != 404:
                    continue
                status = "not_found"
            except httpx.HTTPError:
                continue
            ws = self._live
            if status == "pending" and ws is not None:
                await self._send_decision(ws, aid, jws, decision)
                continue
            if aid not in self._unconfirmed or status == "pending":
                continue  # a result arrived meanwhile, or we are offline again
            ours = "approved" if decision.decision == "approve" else "denied"
            if status == ours:
                self._on_result("decision_result", {"id": aid, "status": status, "via": "http"})
            else:
                error = {"approved": "already_decided", "denied": "already_decided"}.get(
                    str(status), str(status)
                )
                fields = {"id": aid, "error": error, "status": status, "via": "http"}
                self._on_result("error", fields)

    def _on_resolved(self, frame: dict[str, Any]) -> None:
        aid = frame.get("id")
        if isinstance(aid, str):
            self._seen.add(aid)
            self._unconfirmed.pop(aid, None)
            task = self._tasks.pop(aid, None)
            if task is not None:
                task.cancel()  # answered elsewhere or expired: stop asking
        self._emit("approval_resolved", id=aid, status=frame.get("status"))

    def _on_result(self, kind: str, frame: dict[str, Any]) -> None:
        fields = {k: v for k, v in frame.items() if k not in ("type", "event")}
        event = self._emit(kind, **fields)
        aid = frame.get("id")
        if isinstance(aid, str):
            self._unconfirmed.pop(aid, None)
            if aid in self._sent:
                self._result = event
                if self._once:
                    self.stop()
