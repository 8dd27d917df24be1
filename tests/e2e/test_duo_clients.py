"""The two real Duo clients against a real deployment: `tapprove serve` over HTTPS (a test CA,
DNS:localhost), a `tapprove worker`, and mobile_stub as the phone.

1. duo_client 5.x (PyPI), the official Python client: Auth API v2, signatures v5 and v2.
2. Debian's login_duo and pam_duo 1.11.3 (through pamtester): the legacy /rest/v1/*.bson
   endpoints, BSON replies, and on a terminal the `async=1` + 20 status polls flow.

Every negative case asserts a real refusal (login_duo's deny is exit status 1): a config file
login_duo silently ignores (not mode 600) would let everything through with exit status 0.
Each scenario has its own user: a denied or unanswered request makes the user's next one
wait (push fatigue), which is exactly what the server must do.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import pty
import queue
import re
import secrets
import select
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duo_client
import httpx
import pytest
import redis.asyncio as aioredis

from tests.fixtures.app import free_port
from tests.fixtures.processes import Deployment
from tests.fixtures.services import REDIS_URL, _create_database, _drop_database
from tests.fixtures.tls import TlsFiles, make_test_ca

pytestmark = pytest.mark.timeout(240)

DOMAIN = "duo.test"
PASSWORD = "a long enough password"
# Seconds: "nobody answers" ends in a timeout this fast, and an answering phone has this
# long even on a machine busy with other work.
APPROVAL_TTL = 15
NOT_INSTALLED = "install them with scripts/test (apt-get install login-duo libpam-duo pamtester)"


@dataclass
class DuoDeployment:
    """A running deployment with one Duo integration ("ssh", usernames @duo.test)."""

    processes: Deployment
    tls: TlsFiles
    port: int
    ikey: str
    skey: str
    workdir: Path
    user_ids: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def client(self, *, skey: str | None = None, ikey: str | None = None,
               sig_version: int = 5) -> duo_client.Auth:  # fmt: skip
        return duo_client.Auth(
            ikey or self.ikey,
            skey or self.skey,
            host="localhost",
            port=self.port,
            ca_certs=str(self.tls.ca),
            sig_version=sig_version,
        )

    def cli(self, *args: str) -> dict[str, Any]:
        return self.processes.cli(*args)

    def user(self, name: str, *, phone: bool = True, number: str | None = None) -> Path | None:
        """A tapprove user NAME@duo.test, with a mobile_stub phone enrolled (its state file)
        and, given a `number`, a verified phone number for SMS."""
        email = f"{name}@{DOMAIN}"
        more = ["--phone", number] if number else []
        added = self.cli("user", "add", email, "--password", PASSWORD, "--verified", *more)
        self.user_ids[name] = added["user_id"]
        if not phone:
            return None
        state = self.workdir / f"{name}.phone.json"
        self.enroll_phone(email, state, f"{name}'s phone")
        return state

    def passcode(self, state: Path) -> str:
        """The offline passcode mobile_stub shows now (`python -m mobile_stub passcode`)."""
        shown = subprocess.run(
            [sys.executable, "-m", "mobile_stub", "passcode", "--state", str(state), "--json"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        code: str = json.loads(shown.stdout)["passcode"]
        return code

    def texted_code(self, number: str, count: int = 1) -> str:
        """The passcode in the `count`-th SMS to `number`: without Twilio settings, the
        server writes texts to its log."""
        deadline = time.monotonic() + 30
        pattern = re.compile(re.escape(number) + r": Your tapprove passcode is (\d{6})")
        while True:
            found = pattern.findall(self.serve_log.read_text(errors="replace"))
            if len(found) >= count:
                code: str = found[count - 1]
                return code
            assert time.monotonic() < deadline, f"no SMS number {count} to {number} in the log"
            time.sleep(0.2)

    @property
    def serve_log(self) -> Path:
        return self.workdir / f"serve-{self.port}.log"

    def enroll_phone(self, email: str, state: Path, name: str = "phone") -> None:
        """Enroll a mobile_stub phone for `email` with a fresh enrollment link."""
        # The tapprove:// link, not the bare code: a code may begin with "-", which the
        # command line would read as an option.
        link = self.cli("device", "enroll-code", email)["uri"]
        done = subprocess.run(
            [sys.executable, "-m", "mobile_stub", "enroll", link, "--server", self.url,
             "--state", str(state), "--name", name, "--json"],
            env=self.phone_env, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()

    @property
    def phone_env(self) -> dict[str, str]:
        return {**os.environ, "SSL_CERT_FILE": str(self.tls.ca)}

    def login_duo_conf(self, name: str, **extra: str) -> Path:
        """A login_duo / pam_duo config: mode 600, or the client ignores it and exits 0."""
        path = self.workdir / f"{name}.conf"
        lines = {
            "ikey": extra.pop("ikey", self.ikey),
            "skey": extra.pop("skey", self.skey),
            "host": f"localhost:{self.port}",
            "cafile": str(self.tls.ca),
            "failmode": "secure",
            "pushinfo": "yes",
            **extra,
        }
        path.write_text("[duo]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items()))
        path.chmod(0o600)
        return path


class Phone:
    """A mobile_stub `run --json` process; with `auto="approve"` it waits for a number on
    stdin for each request, which the test gives (the one choice) or withholds."""

    def __init__(self, deployment: DuoDeployment, state: Path, auto: str = "approve") -> None:
        number = ["--number-from", "-"] if auto == "approve" else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mobile_stub", "run", "--state", str(state),
             "--auto", auto, *number, "--json"],
            env=deployment.phone_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for("ready")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip():
                self.events.put(json.loads(line))

    def wait_for(self, name: str, timeout: float = 30, **fields: object) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the phone saw no {name} {fields} within {timeout} s"
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                return event

    def request(self) -> dict[str, Any]:
        """The next approval request this phone receives (its Approval object)."""
        event = self.wait_for("approval_request", repeat=False)
        approval: dict[str, Any] = event["approval"]
        return approval

    def approve(self, approval: dict[str, Any]) -> None:
        """Tap approve: in confirm mode the one choice is the number the phone sends."""
        assert approval["match"]["mode"] == "confirm"
        [number] = approval["number_choices"]
        self.answer(number)

    def answer(self, number: str) -> None:
        """Approve the request waiting for a number with this one."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{number}\n".encode())
        self.process.stdin.flush()

    def approve_next(self, after: float = 0.0) -> threading.Thread:
        """In the background: wait for the next request and approve it `after` seconds later."""
        seen: list[dict[str, Any]] = []

        def run() -> None:
            approval = self.request()
            seen.append(approval)
            time.sleep(after)  # the person takes this long to look at the phone
            self.approve(approval)

        thread = threading.Thread(target=run, daemon=True)
        thread.seen = seen  # type: ignore[attr-defined]
        thread.start()
        return thread

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@contextlib.contextmanager
def phone(deployment: DuoDeployment, state: Path | None, auto: str = "approve") -> Iterator[Phone]:
    assert state is not None
    running = Phone(deployment, state, auto)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
async def duo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DuoDeployment]:
    workdir = tmp_path_factory.mktemp("duo")
    prefix = f"tapprove-test-{secrets.token_hex(6)}:"
    db_name, db_url = await _create_database()
    port = free_port()
    tls = make_test_ca(workdir / "tls")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPPROVE_")}
    env.update(
        TAPPROVE_REDIS_URL=REDIS_URL,
        TAPPROVE_REDIS_PREFIX=prefix,
        TAPPROVE_DATABASE_URL=db_url,
        TAPPROVE_DATA_DIR=str(workdir / "data"),
        TAPPROVE_PUBLIC_URL=f"https://localhost:{port}",
        TAPPROVE_APPROVAL_TTL=str(APPROVAL_TTL),
        TAPPROVE_LOG_FORMAT="json",
    )
    processes = Deployment(env, workdir)
    try:
        processes.cli("db", "upgrade")
        processes._start(
            ["serve", "--port", str(port), "--no-worker",
             "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)],
            f"serve-{port}",
        )  # fmt: skip
        processes.worker()
        deadline = time.monotonic() + 60
        trust = ssl.create_default_context(cafile=str(tls.ca))
        async with httpx.AsyncClient(verify=trust) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    ready = await client.get(f"https://localhost:{port}/readyz", timeout=2)
                    if ready.status_code == 200:
                        break
                assert time.monotonic() < deadline, "tapprove serve over TLS did not start"
                await asyncio.sleep(0.1)
        keys = processes.cli("integration", "create", "ssh", "--username-domain", DOMAIN)
        assert keys["api_host"] == f"localhost:{port}"
        yield DuoDeployment(processes, tls, port, keys["ikey"], keys["skey"], workdir)
    finally:
        processes.stop_all()
        await _drop_database(db_name)
        client = aioredis.Redis.from_url(REDIS_URL)
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            await client.delete(key)
        await client.aclose()


# --- duo_client (Auth API v2) ----------------------------------------------------------------


def test_ping_check_and_both_signature_versions(duo: DuoDeployment) -> None:
    assert abs(duo.client().ping()["time"] - time.time()) < 60
    assert abs(duo.client().check()["time"] - time.time()) < 60
    assert abs(duo.client(sig_version=2).check()["time"] - time.time()) < 60


def test_the_logo_is_the_png_duo_client_expects(duo: DuoDeployment) -> None:
    image = duo.client().logo()
    assert isinstance(image, bytes) and image.startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(RuntimeError, match="Received 401"):
        duo.client(skey="x" * 40).logo()


def test_a_wrong_skey_a_stale_date_and_an_unknown_ikey_get_401(
    duo: DuoDeployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError, match="Received 401"):
        duo.client(skey="x" * 40).check()
    with pytest.raises(RuntimeError, match="Received 401"):
        duo.client(ikey="DI" + "X" * 18).check()
    stale = email.utils.formatdate(time.time() - 3600)
    monkeypatch.setattr(email.utils, "formatdate", lambda *args, **kwargs: stale)
    with pytest.raises(RuntimeError, match="Received 401"):
        duo.client().check()


def test_a_revoked_integration_gets_401(duo: DuoDeployment) -> None:
    keys = duo.cli("integration", "create", "short-lived")
    client = duo.client(ikey=keys["ikey"], skey=keys["skey"])
    assert "time" in client.check()
    duo.cli("integration", "revoke", "short-lived")
    deadline = time.monotonic() + 30  # serving processes cache an integration for 10 s
    while True:
        try:
            client.check()
        except RuntimeError as refused:
            assert "Received 401" in str(refused)
            break
        assert time.monotonic() < deadline, "the revoked integration was still accepted"
        time.sleep(0.5)


def test_preauth_answers_auth_enroll_and_deny(duo: DuoDeployment) -> None:
    duo.user("pre-active")
    duo.user("pre-nophone", phone=False)
    client = duo.client()

    active = client.preauth(username="pre-active")
    assert active["result"] == "auth"
    [device] = active["devices"]
    assert device["type"] == "phone" and device["name"] == "pre-active's phone"
    # mobile_stub holds a passcode seed (mobile_otp); no verified number, so no sms.
    assert device["capabilities"] == ["auto", "push", "mobile_otp"]
    for nobody in ("pre-nophone", "never-registered"):
        enroll = client.preauth(username=nobody)
        assert enroll == {
            "result": "enroll",
            "status_msg": f"Enroll an authentication device to proceed: {duo.url}/",
            "enroll_portal_url": f"{duo.url}/",
        }


def test_auth_with_the_phones_offline_passcode_allows_once(duo: DuoDeployment) -> None:
    state = duo.user("otp-user")
    assert state is not None
    code = duo.passcode(state)
    client = duo.client()
    allowed = client.auth("passcode", username="otp-user", passcode=code)
    assert allowed == {
        "result": "allow", "status": "allow", "status_msg": "Success. Logging you in...",
    }  # fmt: skip
    assert client.auth("passcode", username="otp-user", passcode=code)["result"] == "deny"
    wrong = "000000" if code != "000000" else "111111"
    denied = client.auth("passcode", username="otp-user", passcode=wrong)
    assert denied["status_msg"] == "Incorrect passcode. Please try again."


def test_auth_sms_texts_a_passcode_that_then_allows(duo: DuoDeployment) -> None:
    duo.user("sms-user", number="+14155550101")
    client = duo.client()
    [device] = client.preauth(username="sms-user")["devices"]
    assert device["capabilities"] == ["auto", "push", "sms", "mobile_otp"]
    assert device["number"] == "XXX-XXX-0101"
    sent = client.auth("sms", username="sms-user", device=device["device"])
    assert sent == {"result": "deny", "status": "sent", "status_msg": "New SMS passcodes sent."}
    code = duo.texted_code("+14155550101")
    txid = client.auth("passcode", username="sms-user", passcode=code, async_txn=True)["txid"]
    status = client.auth_status(txid)
    assert status["success"] and status["status"] == "allow", status


def test_enroll_and_enroll_status_for_an_integration_allowed_to_enroll(
    duo: DuoDeployment,
) -> None:
    with pytest.raises(RuntimeError, match="Received 403"):
        duo.client().enroll(username="enroll-user")  # the plain integration may not
    keys = duo.cli("integration", "create", "idp-enroll", "--allow-enroll",
                   "--username-domain", DOMAIN)  # fmt: skip
    client = duo.client(ikey=keys["ikey"], skey=keys["skey"])
    duo.user("enroll-user", phone=False)
    activation = client.enroll(username="enroll-user", valid_secs=300)
    assert activation["user_id"] == duo.user_ids["enroll-user"]
    assert activation["activation_code"].startswith("tapprove://enroll?")
    assert activation["activation_url"].startswith(f"{duo.url}/phone#enroll=")
    assert client.enroll_status(activation["user_id"], activation["activation_code"]) == "waiting"

    state = duo.workdir / "enroll-user.phone.json"
    done = subprocess.run(
        [sys.executable, "-m", "mobile_stub", "enroll", activation["activation_code"],
         "--server", duo.url, "--state", str(state), "--name", "Enrolled via Duo", "--json"],
        env=duo.phone_env, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert client.enroll_status(activation["user_id"], activation["activation_code"]) == "success"
    [device] = client.preauth(username="enroll-user")["devices"]
    assert device["name"] == "Enrolled via Duo"
    # The account has a device now: no second link through the integration.
    with pytest.raises(RuntimeError, match="Received 400"):
        client.enroll(username="enroll-user")


def test_auth_push_approved_on_the_phone_is_allow(duo: DuoDeployment) -> None:
    state = duo.user("sync-allow")
    with phone(duo, state) as handset:
        answering = handset.approve_next()
        result = duo.client().auth(
            "push", username="sync-allow", device="auto", ipaddr="198.51.100.7",
            pushinfo="from=login%20portal&domain=example.com",
        )  # fmt: skip
        answering.join(10)
        handset.wait_for("decision_result", status="approved")
    assert result == {
        "result": "allow",
        "status": "allow",
        "status_msg": "Success. Logging you in...",
    }
    [approval] = answering.seen  # type: ignore[attr-defined]
    # What the phone shows: who asks (the integration), from where, and the pushinfo lines.
    assert approval["requester"] == {"kind": "rp", "name": "ssh"}
    assert approval["context"]["browser"] == "ssh"
    assert approval["context"]["ip"] == "198.51.100.7"
    assert approval["context"]["details"] == [
        {"label": "from", "value": "login portal"},
        {"label": "domain", "value": "example.com"},
    ]
    assert approval["match"] == {"mode": "confirm", "digits": 2}


def test_auth_denied_on_the_phone_is_deny(duo: DuoDeployment) -> None:
    state = duo.user("sync-deny")
    with phone(duo, state, "deny"):
        result = duo.client().auth("push", username="sync-deny", device="auto")
    assert result["result"] == "deny" and result["status"] == "deny"


def test_fraud_reported_on_the_phone_is_deny_fraud_and_locks_the_user(duo: DuoDeployment) -> None:
    state = duo.user("sync-fraud")
    with phone(duo, state, "fraud"):
        result = duo.client().auth("auto", username="sync-fraud")
    assert result["result"] == "deny" and result["status"] == "fraud"
    assert duo.client().preauth(username="sync-fraud")["result"] == "deny"
    again = duo.client().auth("push", username="sync-fraud", device="auto")
    assert again["result"] == "deny" and again["status"] == "locked_out"


def test_nobody_answering_is_deny_timeout(duo: DuoDeployment) -> None:
    state = duo.user("sync-timeout")
    with phone(duo, state) as handset:  # it gets the request; nobody taps
        result = duo.client().auth("push", username="sync-timeout", device="auto")
        handset.wait_for("approval_resolved", status="expired")
    assert result["result"] == "deny" and result["status"] == "timeout"


def test_async_auth_and_one_auth_status_held_until_the_phone_answers(duo: DuoDeployment) -> None:
    # authentik's calls: auth(async) naming the user by user_id, then a single auth_status
    # that must not come back `waiting` while the person is still looking at the phone.
    state = duo.user("async-allow")
    client = duo.client()
    with phone(duo, state) as handset:
        txid = client.auth(
            "auto", user_id=duo.user_ids["async-allow"], device="auto", ipaddr="203.0.113.9",
            type="authentik Login request", display_username="alice",
            pushinfo="Domain=sso.example.com&Application=Grafana", async_txn=True,
        )["txid"]  # fmt: skip
        answering = handset.approve_next(after=2.0)
        status = client.auth_status(txid)
        answering.join(10)
    assert status["success"] and status["status"] == "allow", status
    [approval] = answering.seen  # type: ignore[attr-defined]
    assert approval["id"] == txid
    assert approval["context"]["details"] == [
        {"label": "Request", "value": "authentik Login request"},
        {"label": "User", "value": "alice"},
        {"label": "Domain", "value": "sso.example.com"},
        {"label": "Application", "value": "Grafana"},
    ]
    # Another integration cannot read this transaction.
    keys = duo.cli("integration", "create", "other-app")
    with pytest.raises(RuntimeError, match="Received 400"):
        duo.client(ikey=keys["ikey"], skey=keys["skey"]).auth_status(txid)


def test_a_match_mode_integration_shows_the_number_the_phone_must_type(
    duo: DuoDeployment,
) -> None:
    keys = duo.cli("integration", "create", "typed-app", "--match-mode", "typed",
                   "--username-domain", DOMAIN)  # fmt: skip
    state = duo.user("typed-user")
    client = duo.client(ikey=keys["ikey"], skey=keys["skey"])
    with phone(duo, state) as handset:
        txid = client.auth("push", username="typed-user", device="auto", async_txn=True)["txid"]
        first = client.auth_status(txid)  # answers early: the client must show the number
        assert first["waiting"] and first["status"] == "pushed", first
        shown = re.search(r"Enter (\d\d) on your phone", first["status_msg"])
        assert shown, first
        approval = handset.request()
        assert approval["match"] == {"mode": "typed", "digits": 2}
        assert "number_choices" not in approval  # the phone learns it from the person only
        handset.answer(shown.group(1))
        statuses = [client.auth_status(txid)]
        while statuses[-1]["waiting"]:
            statuses.append(client.auth_status(txid))
    assert statuses[-1]["success"], statuses


# --- login_duo and pam_duo (v1 .bson endpoints) ----------------------------------------------


def _login_duo() -> str:
    found = shutil.which("login_duo") or (
        "/usr/sbin/login_duo" if Path("/usr/sbin/login_duo").exists() else None
    )
    assert found, f"login_duo is not installed: {NOT_INSTALLED}"
    return found


def run_login_duo(conf: Path, user: str) -> subprocess.CompletedProcess[str]:
    """`login_duo -d -c CONF -f USER echo OK </dev/null`: the non-interactive (ssh host cmd)
    flow: preauth, then a synchronous auth."""
    return subprocess.run(
        [_login_duo(), "-d", "-c", str(conf), "-f", user, "echo", "OK"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_login_duo_runs_the_command_when_the_phone_approves(duo: DuoDeployment) -> None:
    state = duo.user("ld-allow")
    conf = duo.login_duo_conf("ld-allow")
    with phone(duo, state) as handset:
        answering = handset.approve_next()
        done = run_login_duo(conf, "ld-allow")
        answering.join(10)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "OK\n"
    assert "Successful Duo login for 'ld-allow'" in done.stderr
    [approval] = answering.seen  # type: ignore[attr-defined]
    details = {d["label"]: d["value"] for d in approval["context"]["details"]}
    assert details["Command"] == "echo OK" and "Server IP" in details


def test_login_duo_refuses_when_the_phone_denies(duo: DuoDeployment) -> None:
    state = duo.user("ld-deny")
    conf = duo.login_duo_conf("ld-deny")
    with phone(duo, state, "deny") as handset:
        done = run_login_duo(conf, "ld-deny")
        handset.wait_for("decision_result", status="denied")
    assert done.returncode == 1, done.stderr
    assert "OK" not in done.stdout
    assert "Failed Duo login for 'ld-deny'" in done.stderr


def test_login_duo_refuses_when_nobody_answers(duo: DuoDeployment) -> None:
    state = duo.user("ld-timeout")
    conf = duo.login_duo_conf("ld-timeout")
    with phone(duo, state) as handset:
        done = run_login_duo(conf, "ld-timeout")
        handset.wait_for("approval_resolved", status="expired")
    assert done.returncode == 1, done.stderr
    assert "OK" not in done.stdout


def test_login_duo_refuses_a_wrong_skey_with_failmode_secure(duo: DuoDeployment) -> None:
    duo.user("ld-badkey")
    done = run_login_duo(duo.login_duo_conf("ld-badkey", skey="y" * 40), "ld-badkey")
    assert done.returncode == 1, done.stderr
    assert "OK" not in done.stdout


Typed = str | Callable[[], str]


def run_on_a_terminal(
    conf: Path, user: str, answer: Typed = "1", *more: Typed
) -> tuple[int, str]:
    """login_duo under a pseudo-terminal (the interactive flow: prompt, `async=1`, then up
    to 20 status.bson polls back to back); types `answer` at the factor prompt, and `more`
    at the prompts after a failed attempt (a callable is asked for its text when its
    prompt shows)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: login_duo with the terminal as stdin/stdout/stderr
        os.execv(_login_duo(), [_login_duo(), "-d", "-c", str(conf), "-f", user, "echo", "OK"])
    output = b""
    answers = [answer, *more]
    answered = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
        if answered < len(answers) and output.count(b"Passcode or option") > answered:
            text = answers[answered]
            os.write(fd, f"{text if isinstance(text, str) else text()}\n".encode())
            answered += 1
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_login_duo_on_a_terminal_long_polls_until_the_phone_approves(duo: DuoDeployment) -> None:
    state = duo.user("tty-allow")
    conf = duo.login_duo_conf("tty-allow")
    with phone(duo, state) as handset:
        answering = handset.approve_next(after=3.0)
        code, output = run_on_a_terminal(conf, "tty-allow")
        answering.join(10)
    assert code == 0, output
    assert "Duo Push to tty-allow's phone" in output  # the preauth prompt
    # The first poll answers at once ("Pushed"); the next one is held until the phone's
    # answer 3 s later: one "Pushed" line, not one per poll.
    assert output.count("Pushed a login request to your device...") == 1, output
    assert "Success. Logging you in..." in output
    assert "OK" in output.split("Success. Logging you in...")[1]


def test_login_duo_on_a_terminal_refuses_when_nobody_answers(duo: DuoDeployment) -> None:
    state = duo.user("tty-timeout")
    conf = duo.login_duo_conf("tty-timeout", prompts="1")
    with phone(duo, state) as handset:
        code, output = run_on_a_terminal(conf, "tty-timeout")
        handset.wait_for("approval_resolved", status="expired")
    assert code == 1, output
    assert "Login timed out." in output
    assert "Success" not in output and "\nOK" not in output


def test_login_duo_on_a_terminal_takes_the_phones_passcode(duo: DuoDeployment) -> None:
    state = duo.user("tty-otp")
    assert state is not None
    conf = duo.login_duo_conf("tty-otp")
    code, output = run_on_a_terminal(conf, "tty-otp", lambda: duo.passcode(state))
    assert code == 0, output
    assert "Success. Logging you in..." in output
    assert "OK" in output.split("Success. Logging you in...")[1]


def test_login_duo_on_a_terminal_sends_sms_passcodes_then_takes_one(duo: DuoDeployment) -> None:
    duo.user("tty-sms", number="+14155550102")
    conf = duo.login_duo_conf("tty-sms", prompts="2")
    code, output = run_on_a_terminal(
        conf, "tty-sms", "2", lambda: duo.texted_code("+14155550102")
    )
    assert code == 0, output
    assert "2. SMS passcodes to XXX-XXX-0102" in output  # the preauth prompt
    assert "New SMS passcodes sent." in output
    assert "OK" in output.split("Success. Logging you in...")[1]


def test_login_duo_on_a_terminal_refuses_a_wrong_passcode(duo: DuoDeployment) -> None:
    duo.user("tty-badotp")
    conf = duo.login_duo_conf("tty-badotp", prompts="1")
    code, output = run_on_a_terminal(conf, "tty-badotp", "000000")
    assert code == 1, output
    assert "Incorrect passcode. Please try again." in output
    assert "\nOK" not in output


def test_login_duo_without_a_terminal_takes_duo_passcode_from_the_environment(
    duo: DuoDeployment,
) -> None:
    state = duo.user("env-otp")
    assert state is not None
    conf = duo.login_duo_conf("env-otp", accept_env_factor="yes")
    done = subprocess.run(
        [_login_duo(), "-d", "-c", str(conf), "-f", "env-otp", "echo", "OK"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "DUO_PASSCODE": duo.passcode(state)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "OK\n"


@contextlib.contextmanager
def pam_service(conf: Path) -> Iterator[str]:
    """A PAM service using pam_duo with `conf`: PAM reads services from /etc/pam.d only, so
    one with a unique name is written there for the test and removed after it."""
    assert shutil.which("pamtester"), f"pamtester is not installed: {NOT_INSTALLED}"
    name = f"tapprove-duo-test-{secrets.token_hex(4)}"
    path = Path("/etc/pam.d") / name
    path.write_text(f"auth required pam_duo.so conf={conf}\n")
    try:
        yield name
    finally:
        path.unlink()


def run_pamtester(service: str, unix_user: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pamtester", "-v", service, unix_user, "authenticate"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("outcome", ["allow", "deny"])
def test_pam_duo_through_pamtester(duo: DuoDeployment, outcome: str) -> None:
    # pam_duo asks only for users the system knows: "nobody" exists everywhere. Each case
    # has its own integration, so "nobody" names a user of its own domain.
    domain = f"pam-{outcome}.test"
    keys = duo.cli("integration", "create", f"pam-{outcome}", "--username-domain", domain)
    duo.cli("user", "add", f"nobody@{domain}", "--password", PASSWORD, "--verified")
    state = duo.workdir / f"pam-{outcome}.phone.json"
    duo.enroll_phone(f"nobody@{domain}", state)
    # autopush: pam_duo pushes at once, as sshd's keyboard-interactive users usually have it.
    conf = duo.login_duo_conf(
        f"pam-{outcome}", ikey=keys["ikey"], skey=keys["skey"], autopush="yes", prompts="1"
    )
    with pam_service(conf) as service:
        if outcome == "allow":
            with phone(duo, state) as handset:
                answering = handset.approve_next()
                done = run_pamtester(service, "nobody")
                answering.join(10)
            assert done.returncode == 0, done.stderr
            assert "successfully authenticated" in done.stdout + done.stderr
        else:
            with phone(duo, state, "deny") as handset:
                done = run_pamtester(service, "nobody")
                handset.wait_for("decision_result", status="denied")
            assert done.returncode != 0, done.stderr
            assert "successfully authenticated" not in done.stdout + done.stderr
