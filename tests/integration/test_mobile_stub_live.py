"""The reference phone (mobile_stub) against a real server: enrolled over the public routes,
it shows what the server sends as a person would read it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.db.accounts import create_api_key, get_user_by_email, list_active_devices
from mobile_stub import (
    Backoff,
    Decision,
    DeviceState,
    EnrollTarget,
    PhoneClient,
    enroll,
    load_state,
    save_state,
)
from mobile_stub.cli import Output, event_printer
from mobile_stub.client import Decider
from tests.fixtures.app import LiveServer

FAST = Backoff(base=0.01, cap=0.05)
ROOT = Path(__file__).resolve().parents[2]


async def enrollment_code(server: LiveServer, email: str) -> str:
    """A first-device code, the way a new user gets one: sign in, then ask for it."""
    await server.add_user(email)
    browser = server.browser()
    signed_in = await server.login(browser, email)
    assert signed_in.json() == {"status": "enrollment_required"}, signed_in.text
    created = await browser.post("/api/devices/enrollments")
    assert created.status_code == 201, created.text
    code: str = created.json()["code"]
    return code


async def enrolled(server: LiveServer, email: str) -> DeviceState:
    code = await enrollment_code(server, email)
    return await enroll(EnrollTarget(server.url, code), name="stub", platform="web")


@contextlib.asynccontextmanager
async def running_phone(state: DeviceState, decide: Decider | None) -> AsyncIterator[PhoneClient]:
    """The phone holding its socket, printing what it shows like `mobile_stub run`."""
    printer = event_printer(Output(as_json=False))
    async with PhoneClient(state, on_event=printer, backoff=FAST) as phone, phone.running(decide):
        yield phone


async def start_login(server: LiveServer, email: str) -> dict[str, Any]:
    started = await server.login(server.browser(), email)
    assert started.status_code == 202, started.text
    body: dict[str, Any] = started.json()
    return body


async def test_a_request_still_unanswered_after_a_reconnect_is_not_called_handled(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    state = await enrolled(server, "ann@example.com")
    number: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def person(approval: dict[str, Any]) -> Decision:  # still reading the browser
        return Decision.approve(await number)

    async with running_phone(state, person) as phone:
        await phone.wait_for("ready")
        started = await start_login(server, "ann@example.com")
        aid = started["approval_id"]
        first = await phone.wait_for("approval_request", id=aid)
        phone.drop_connection()  # the socket goes (a restart, a drop); the request stays
        again = await phone.wait_for("approval_request", id=aid)
        number.set_result(started["number"])
        result = await phone.wait_for("decision_result", id=aid)

    assert (first["repeat"], again["repeat"], again["answer"]) == (False, True, "deciding")
    assert result["status"] == "approved"
    printed = capsys.readouterr().out
    assert "already handled" not in printed
    assert (
        f"(request {aid} sent again by the server after a reconnect; still waiting for your "
        "answer)" in printed
    )


async def test_a_wrong_number_is_shown_as_a_denial_in_words(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    state = await enrolled(server, "bob@example.com")
    wrong: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def person(approval: dict[str, Any]) -> Decision:
        return Decision.approve(await wrong)

    async with running_phone(state, person) as phone:
        await phone.wait_for("ready")
        started = await start_login(server, "bob@example.com")
        wrong.set_result("98" if started["number"] == "99" else "99")
        error = await phone.wait_for("error", id=started["approval_id"])

    assert error["error"] == "wrong_number"
    printed = capsys.readouterr().out
    assert f"Wrong number: the request was denied (request {started['approval_id']})" in printed
    assert "Server error" not in printed


async def test_a_relying_partys_request_shows_its_name_and_context_not_a_browser(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    state = await enrolled(server, "cat@example.com")
    async with server.services.db() as db:
        _, api_key = await create_api_key(db, "vpn", time.time())
        await db.commit()

    async with running_phone(state, None) as phone:
        await phone.wait_for("ready")
        async with httpx.AsyncClient(
            base_url=server.url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "curl/7.88.1"},
        ) as rp:
            created = await rp.post(
                "/api/v1/approvals",
                json={"user": "cat@example.com", "context": {"ip": "198.51.100.4"}},
            )
        assert created.status_code == 201, created.text
        aid = created.json()["approval_id"]
        request = await phone.wait_for("approval_request", id=aid)
        listed = await phone.pending()

    assert request["approval"]["requester"] == {"kind": "rp", "name": "vpn"}
    assert [a["requester"] for a in listed] == [{"kind": "rp", "name": "vpn"}]
    printed = capsys.readouterr().out
    shown = printed[printed.index(f"Approval request {aid} from vpn") :]
    assert "  From:     vpn (a service, not a browser sign-in)" in shown
    assert "  IP:       198.51.100.4" in shown
    assert "  Match:    type the 2-digit number shown by vpn" in shown
    assert "Browser:" not in printed and "in the browser" not in printed


async def test_a_browser_sign_in_says_so(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    state = await enrolled(server, "dan@example.com")
    async with running_phone(state, None) as phone:
        await phone.wait_for("ready")
        started = await start_login(server, "dan@example.com")
        request = await phone.wait_for("approval_request", id=started["approval_id"])

    assert request["approval"]["requester"] == {"kind": "login", "name": None}
    printed = capsys.readouterr().out
    assert f"Login approval request {started['approval_id']}\n  Browser:  Chrome 131" in printed
    assert "  Match:    type the 2-digit number shown in the browser" in printed


async def test_the_command_line_enrolls_as_web_and_names_the_real_os(
    server: LiveServer, tmp_path: Path
) -> None:
    code = await enrollment_code(server, "eve@example.com")

    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mobile_stub", "enroll", code, "--server", server.url,
         "--state", str(tmp_path / "phone.json"), "--json"],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    device_id = json.loads(done.stdout)["device_id"]
    async with server.services.db() as db:
        user = await get_user_by_email(db, "eve@example.com")
        assert user is not None
        devices = {d.id: d for d in await list_active_devices(db, user.id)}
    assert devices[device_id].platform == "web"  # the contract allows android, ios, web only
    assert devices[device_id].name.startswith(f"mobile_stub on {platform.system()} (")


def stub(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m mobile_stub ARGS` as a person runs it."""
    return subprocess.run(
        [sys.executable, "-m", "mobile_stub", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


async def test_the_passcode_command_shows_a_code_that_signs_in_with_no_network(
    server: LiveServer, tmp_path: Path
) -> None:
    state = await enrolled(server, "offline@example.com")
    assert len(state.passcode_secret) == 32  # from the enrollment answer
    path = tmp_path / "phone.json"
    save_state(path, state)
    started = await server.login(browser := server.browser(), "offline@example.com")
    assert started.status_code == 202, started.text

    # The stub computes the code from its state file alone: no server is asked.
    shown = await asyncio.to_thread(stub, "passcode", "--state", str(path), "--json")
    assert shown.returncode == 0, shown.stderr
    printed = json.loads(shown.stdout)
    assert set(printed) == {"passcode", "expires_in"} and 1 <= printed["expires_in"] <= 30
    human = await asyncio.to_thread(stub, "passcode", "--state", str(path))
    assert human.stdout.startswith(f"{printed['passcode'][:3]} {printed['passcode'][3:]}  (")

    approval_id = started.json()["approval_id"]
    # Typed a moment later, maybe in the next 30 s step: one step of drift is allowed.
    answer = await browser.post(
        f"/api/login/{approval_id}/passcode", json={"code": printed["passcode"]}
    )
    assert (answer.status_code, answer.json()) == (200, {"status": "approved"})


async def test_an_older_state_file_gets_its_seed_over_the_socket_and_keeps_it(
    server: LiveServer, tmp_path: Path
) -> None:
    state = await enrolled(server, "older@example.com")
    secret = state.passcode_secret
    # A state file from before passcodes, of a device the server has not given a seed yet.
    older = DeviceState(**{**state.__dict__, "passcode_secret": ""})
    path = tmp_path / "phone.json"
    save_state(path, older)
    without = await asyncio.to_thread(stub, "passcode", "--state", str(path), "--json")
    assert without.returncode == 2 and json.loads(without.stdout)["error"] == "usage"
    async with server.services.db() as db:
        user = await get_user_by_email(db, "older@example.com")
        assert user is not None
        [device] = await list_active_devices(db, user.id)
        device.passcode_seed = None
        device.passcode_confirmed_at = None
        db.add(device)
        await db.commit()

    def keep(updated: DeviceState) -> None:
        save_state(path, updated, overwrite=True)

    async with PhoneClient(older, backoff=FAST, keep_seed=keep) as phone, phone.running(None):
        await phone.wait_for("ready")
        event = await phone.wait_for("passcode_seed")
    assert event == {"event": "passcode_seed", "stored": True}  # the seed is never printed
    kept = load_state(path)
    assert kept.passcode_secret and kept.passcode_secret != secret  # a new seed, kept
    # Acked after it was stored: the stub reports "stored" once its ack is sent, so the
    # server may still be writing the confirmation.
    for _ in range(100):
        async with server.services.db() as db:
            [device] = await list_active_devices(db, device.user_id)
        if device.passcode_confirmed_at is not None:
            break
        await asyncio.sleep(0.05)
    assert device.passcode_confirmed_at is not None
    shown = await asyncio.to_thread(stub, "passcode", "--state", str(path), "--json")
    assert shown.returncode == 0, shown.stdout
