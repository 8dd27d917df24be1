"""Hostile input on the Duo endpoints (/auth/v2/*, /rest/v1/*.bson): bad signatures, old
Dates, huge or malformed bodies, values BSON and PostgreSQL cannot hold, unknown endpoints,
and one integration reaching for another's transaction. Every refusal is Duo's own shape,
in the face's encoding (JSON, or BSON on /rest/v1), never a 500."""

from __future__ import annotations

import email.utils
import hashlib
import json
import time
from typing import Any
from urllib.parse import urlencode

import bson
import httpx
import pytest
from duo_client.client import Client, normalize_params, sign

from app.db.accounts import set_locked
from app.duo.integrations import SEAL_PURPOSE, create_integration
from app.server_keys import SecretBox, secret_key
from app.store.presence import account_changed
from tests.fixtures.app import LiveServer
from tests.security.harness import person

pytestmark = pytest.mark.timeout(120)


class Integration:
    """An integration's keys and a client that signs exactly what a test wants sent."""

    def __init__(self, server: LiveServer, ikey: str, skey: str) -> None:
        self.server = server
        self.ikey = ikey
        self.skey = skey
        self.host = "127.0.0.1"  # the server's public URL is http://127.0.0.1:PORT

    def v5(self, method: str, path: str, params: dict[str, str], *,
           date: float | None = None) -> dict[str, Any]:  # fmt: skip
        """httpx arguments for a duo_client-style v5 request (JSON body for POST)."""
        when = email.utils.formatdate(time.time() if date is None else date)
        if method == "POST":
            body = Client.canon_json(params)
            authz = sign(self.ikey, self.skey, method, self.host, path, when, 5, {}, body=body)
            return {"method": method, "url": path, "content": body,
                    "headers": {"Authorization": authz, "Date": when,
                                "Content-Type": "application/json"}}  # fmt: skip
        authz = sign(self.ikey, self.skey, method, self.host, path, when, 5,
                     normalize_params(params), body="")  # fmt: skip
        return {"method": method, "url": f"{path}?{urlencode(params)}",
                "headers": {"Authorization": authz, "Date": when}}  # fmt: skip

    def v1(self, method: str, path: str, params: dict[str, str]) -> dict[str, Any]:
        """httpx arguments for a duo_unix-style v1 request (form body, SHA1, no Date)."""
        authz = sign(self.ikey, self.skey, method, self.host, path, "", 1,
                     normalize_params(params), digestmod=hashlib.sha1)  # fmt: skip
        encoded = urlencode(sorted(params.items()))
        if method == "POST":
            return {"method": method, "url": path, "content": encoded,
                    "headers": {"Authorization": authz,
                                "Content-Type": "application/x-www-form-urlencoded"}}  # fmt: skip
        return {"method": method, "url": f"{path}?{encoded}", "headers": {"Authorization": authz}}

    async def send(self, request: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.server.url, timeout=30) as client:
            return await client.request(**request)


async def integration(server: LiveServer, name: str) -> Integration:
    box = SecretBox(secret_key(server.settings), SEAL_PURPOSE)
    async with server.services.db() as db:
        row, skey = await create_integration(
            db, box, f"{name}-{time.monotonic_ns()}", now=time.time()
        )
        await db.commit()
    return Integration(server, row.ikey, skey)


def duo_json(response: httpx.Response, status: int, code: int | None = None) -> dict[str, Any]:
    """A Duo JSON reply with this status; a failure carries this code."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    if code is None:
        assert body["stat"] == "OK", body
    else:
        assert body["stat"] == "FAIL" and body["code"] == code, body
        assert isinstance(body["message"], str) and body["message"]
    return body


def duo_bson(response: httpx.Response, status: int, code: int | None = None) -> dict[str, Any]:
    """The same for the legacy endpoints, whose clients read BSON only."""
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response.headers["content-type"] == "application/bson"
    body: dict[str, Any] = bson.decode(response.content)
    if code is None:
        assert body["stat"] == "OK", body
    else:
        assert body == {"stat": "FAIL", "code": code, "message": body["message"]}, body
    return body


# --- signatures and dates ------------------------------------------------------------------


async def test_ping_needs_no_signature_but_everything_else_does(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        duo_json(await client.get("/auth/v2/ping"), 200)
        duo_json(await client.get("/auth/v2/check"), 401, 40101)
        duo_json(await client.post("/auth/v2/auth", data={"username": "a"}), 401, 40101)
        duo_bson(await client.post("/rest/v1/preauth.bson", data={"user": "a"}), 401, 40101)


async def test_bad_signatures_are_401(server: LiveServer) -> None:
    duo = await integration(server, "sigs")
    good = duo.v5("GET", "/auth/v2/check", {})
    duo_json(await duo.send(good), 200)

    forged = Integration(server, duo.ikey, "k" * 40).v5("GET", "/auth/v2/check", {})
    duo_json(await duo.send(forged), 401, 40103)
    unknown = Integration(server, "DI" + "Q" * 18, duo.skey).v5("GET", "/auth/v2/check", {})
    duo_json(await duo.send(unknown), 401, 40103)
    # Signed for another path, another host, or other parameters.
    moved = {**good, "url": "/auth/v2/logo"}
    duo_json(await duo.send(moved), 401, 40103)
    other_host = Integration(server, duo.ikey, duo.skey)
    other_host.host = "evil.example"
    duo_json(await duo.send(other_host.v5("GET", "/auth/v2/check", {})), 401, 40103)
    signed = duo.v5("POST", "/auth/v2/preauth", {"username": "alice"})
    swapped = {**signed, "content": json.dumps({"username": "mallory"})}
    duo_json(await duo.send(swapped), 401, 40103)
    # A v1 (no Date) signature is only for the legacy endpoints, and the reverse.
    v1_on_v2 = duo.v1("POST", "/auth/v2/preauth", {"username": "alice"})
    duo_json(await duo.send(v1_on_v2), 401, 40105)
    v5_on_v1 = duo.v5("POST", "/rest/v1/preauth.bson", {"user": "alice"})
    assert (await duo.send(v5_on_v1)).status_code in (400, 401)
    tampered_v1 = duo.v1("POST", "/rest/v1/preauth.bson", {"user": "alice"})
    tampered_v1["content"] = "user=mallory"
    duo_bson(await duo.send(tampered_v1), 401, 40103)


@pytest.mark.parametrize("skew", [-3600, -301, 301, 86400])
async def test_a_request_with_an_old_or_future_date_is_401(server: LiveServer, skew: int) -> None:
    duo = await integration(server, "dates")
    request = duo.v5("GET", "/auth/v2/check", {}, date=time.time() + skew)
    duo_json(await duo.send(request), 401, 40105)


async def test_a_replayed_request_with_its_date_changed_is_401(server: LiveServer) -> None:
    duo = await integration(server, "replay")
    captured = duo.v5("POST", "/auth/v2/preauth", {"username": "nobody"}, date=time.time() - 400)
    duo_json(await duo.send(captured), 401, 40105)
    refreshed = {**captured, "headers": {**captured["headers"],
                                         "Date": email.utils.formatdate()}}  # fmt: skip
    duo_json(await duo.send(refreshed), 401, 40103)


# --- bodies ---------------------------------------------------------------------------------


async def test_huge_bodies_are_refused_before_anything_reads_them(server: LiveServer) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    big = "username=" + "a" * (70 * 1024)
    async with httpx.AsyncClient(base_url=server.url) as client:
        for path in ("/auth/v2/auth", "/rest/v1/auth.bson"):
            response = await client.post(path, content=big, headers=form)
            assert response.status_code == 413


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"{"),
        ("application/json", b"[]"),
        ("application/json", b'{"username": ["a"]}'),
        ("application/json", b'{"username": "\\ud800"}'),
        ("application/json", json.dumps({f"k{i}": "v" for i in range(500)}).encode()),
        ("application/x-www-form-urlencoded", b"username=%ff%fe"),
        ("application/x-www-form-urlencoded", b"username=\xff"),
        ("application/x-www-form-urlencoded", b"&".join([b"a=b"] * 200)),
        ("text/plain", b"username=alice"),
        ("multipart/form-data; boundary=x", b"--x\r\n"),
    ],
)
async def test_malformed_bodies_are_400_on_both_faces(
    server: LiveServer, content_type: str, body: bytes
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        headers = {"Content-Type": content_type}
        duo_json(await client.post("/auth/v2/preauth", content=body, headers=headers), 400, 40002)
        legacy = await client.post("/rest/v1/preauth.bson", content=body, headers=headers)
        duo_bson(legacy, 400, 40002)


@pytest.mark.parametrize(
    "params",
    [
        {"username": "ali\x00ce"},
        {"username": "alice", "pushinfo": "Command=rm%00-rf"},
        {"username": "alice\x1b[31m"},
        {"username": "a" * 5000},
        {"user\x00name": "alice"},
    ],
)
async def test_values_bson_and_sql_cannot_hold_are_refused_after_the_signature(
    server: LiveServer, params: dict[str, str]
) -> None:
    duo = await integration(server, "nul")
    v2 = await duo.send(duo.v5("POST", "/auth/v2/auth", {"factor": "push", **params}))
    duo_json(v2, 400, 40002)
    legacy = {("user" if k == "username" else k): v for k, v in params.items()}
    v1 = await duo.send(duo.v1("POST", "/rest/v1/auth.bson", {"factor": "auto", **legacy}))
    duo_bson(v1, 400, 40002)


async def test_a_parameter_given_twice_is_refused(server: LiveServer) -> None:
    duo = await integration(server, "twice")
    request = duo.v1("POST", "/rest/v1/preauth.bson", {"user": "alice"})
    request["content"] += "&user=mallory"
    # Signed over both values (as canon_params would), it still may not name two users.
    authz = sign(duo.ikey, duo.skey, "POST", duo.host, "/rest/v1/preauth.bson", "", 1,
                 {"user": ["alice", "mallory"]}, digestmod=hashlib.sha1)  # fmt: skip
    request["headers"]["Authorization"] = authz
    duo_bson(await duo.send(request), 400, 40002)


# --- endpoints and transactions ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/auth/v2/nope", 404, 40401),
        ("GET", "/auth/v2/", 404, 40401),
        ("POST", "/auth/v2/preauth/extra", 404, 40401),
        ("GET", "/auth/v2/%00", 404, 40401),
        ("DELETE", "/auth/v2/auth", 405, 40501),
        ("GET", "/auth/v2/preauth", 405, 40501),
        ("POST", "/auth/v2/ping", 405, 40501),
        ("POST", "/rest/v1/nope.bson", 404, 40401),
        ("POST", "/rest/v1/auth", 404, 40401),
        ("GET", "/rest/v1/auth.bson", 405, 40501),
        ("PUT", "/rest/v1/status.bson", 405, 40501),
    ],
)
async def test_unknown_endpoints_and_methods_answer_in_duos_shape(
    server: LiveServer, method: str, path: str, status: int, code: int
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.request(method, path)
    if path.startswith("/rest/v1"):
        duo_bson(response, status, code)
    else:
        duo_json(response, status, code)


async def test_enroll_is_refused_without_the_integrations_flag(server: LiveServer) -> None:
    duo = await integration(server, "enroll")
    duo_json(await duo.send(duo.v5("POST", "/auth/v2/enroll", {"username": "x"})), 403, 40301)
    status = duo.v5("POST", "/auth/v2/enroll_status", {"user_id": "x", "activation_code": "y"})
    duo_json(await duo.send(status), 403, 40301)


async def test_enroll_with_the_flag_still_needs_a_signature_and_clean_parameters(
    server: LiveServer,
) -> None:
    box = SecretBox(secret_key(server.settings), SEAL_PURPOSE)
    async with server.services.db() as db:
        row, skey = await create_integration(
            db, box, f"enroll-ok-{time.monotonic_ns()}", allow_enroll=True, now=time.time()
        )
        await db.commit()
    duo = Integration(server, row.ikey, skey)
    who = await person(server, "duo-enroll-target", phone=False)
    params = {"username": who.email}
    forged = Integration(server, duo.ikey, "k" * 40).v5("POST", "/auth/v2/enroll", params)
    duo_json(await duo.send(forged), 401, 40103)
    stale = duo.v5("POST", "/auth/v2/enroll", params, date=time.time() - 3600)
    duo_json(await duo.send(stale), 401, 40105)
    async with httpx.AsyncClient(base_url=server.url) as client:
        duo_json(await client.post("/auth/v2/enroll", data=params), 401, 40101)
        duo_json(await client.get("/auth/v2/enroll_status"), 405, 40501)
    for bad in ({"username": "a\x00b"}, {"username": "a" * 5000},
                {"username": who.email, "valid_secs": "9" * 3000}):  # fmt: skip
        duo_json(await duo.send(duo.v5("POST", "/auth/v2/enroll", bad)), 400, 40002)
    status = {"user_id": who.user_id, "activation_code": "tapprove://enroll?code=%00"}
    reply = await duo.send(duo.v5("POST", "/auth/v2/enroll_status", status))
    assert duo_json(reply, 200)["response"] == "invalid"
    # None of that made a link: the first real one still works, and an integration
    # without the flag cannot read its status.
    made = await duo.send(duo.v5("POST", "/auth/v2/enroll", params))
    link = duo_json(made, 200)["response"]["activation_code"]
    other = await integration(server, "enroll-nosy")
    asked = {"user_id": who.user_id, "activation_code": link}
    duo_json(await other.send(other.v5("POST", "/auth/v2/enroll_status", asked)), 403, 40301)


async def test_the_logo_is_a_png_for_a_signed_request_only(server: LiveServer) -> None:
    duo = await integration(server, "logo")
    image = await duo.send(duo.v5("GET", "/auth/v2/logo", {}))
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert image.content.startswith(b"\x89PNG\r\n\x1a\n")
    async with httpx.AsyncClient(base_url=server.url) as client:
        duo_json(await client.get("/auth/v2/logo"), 401, 40101)
        duo_json(await client.post("/auth/v2/logo"), 405, 40501)
    forged = Integration(server, duo.ikey, "k" * 40).v5("GET", "/auth/v2/logo", {})
    duo_json(await duo.send(forged), 401, 40103)
    stale = duo.v5("GET", "/auth/v2/logo", {}, date=time.time() - 3600)
    duo_json(await duo.send(stale), 401, 40105)
    # Parameters are signed too: one added on the way is a wrong signature.
    signed = duo.v5("GET", "/auth/v2/logo", {})
    duo_json(await duo.send({**signed, "url": "/auth/v2/logo?size=9999"}), 401, 40103)


async def test_another_integrations_transaction_is_unknown_to_it(server: LiveServer) -> None:
    owner, other = await integration(server, "owner"), await integration(server, "other")
    who = await person(server, "duo-txid")
    params = {"factor": "push", "username": who.email, "async": "1"}
    started = await owner.send(owner.v5("POST", "/auth/v2/auth", params))
    txid = duo_json(started, 200)["response"]["txid"]

    for txid_asked in (txid, "0" * 32, "x" * 65, "../" + txid, txid + "\x00"):
        stolen = await other.send(other.v5("GET", "/auth/v2/auth_status", {"txid": txid_asked}))
        duo_json(stolen, 400, 40002)
        legacy = await other.send(other.v1("GET", "/rest/v1/status.bson", {"txid": txid_asked}))
        duo_bson(legacy, 400, 40002)
    # Its owner still reads it (a v1 poll answers within a second: pushed, no result yet).
    mine = duo_bson(await owner.send(owner.v1("GET", "/rest/v1/status.bson", {"txid": txid})), 200)
    assert mine["response"] == {"status": "Pushed a login request to your device..."}


async def test_unknown_and_odd_usernames_get_the_enroll_answer(server: LiveServer) -> None:
    duo = await integration(server, "users")
    for username in ("nobody-here", "a@b", "@", "x" * 300 + "@example.com", "é@ü.test"):
        preauth = await duo.send(duo.v5("POST", "/auth/v2/preauth", {"username": username}))
        assert duo_json(preauth, 200)["response"]["result"] == "enroll"
        params = {"factor": "push", "username": username}
        auth = await duo.send(duo.v5("POST", "/auth/v2/auth", params))
        assert duo_json(auth, 200)["response"]["result"] == "deny"


@pytest.mark.parametrize(
    "params",
    [
        {"factor": "phone"},
        {"factor": "passcode"},
        {"factor": "passcode", "passcode": ""},
        {"factor": "passcode", "passcode": "1" * 5000},
        {"factor": "passcode", "passcode": "123\x00456"},
        {"factor": "passcode", "passcode": "123456", "device": "not-a-device"},
        {"factor": "sms", "device": "not-a-device"},
        {"factor": "bogus"},
        {"factor": "push", "device": "not-a-device"},
        {},
    ],
)
async def test_unsupported_factors_bad_passcodes_and_unknown_devices_are_400(
    server: LiveServer, params: dict[str, str]
) -> None:
    duo = await integration(server, "factors")
    who = await person(server, "duo-factor")
    response = await duo.send(duo.v5("POST", "/auth/v2/auth", {"username": who.email, **params}))
    duo_json(response, 400, 40002)


async def test_passcode_and_sms_need_a_valid_signature_and_a_fresh_date(server: LiveServer) -> None:
    duo = await integration(server, "otp-sigs")
    who = await person(server, "duo-otp-sigs")
    code = who.phone.passcode(time.time())
    params = {"factor": "passcode", "username": who.email, "passcode": code}
    forged = Integration(server, duo.ikey, "k" * 40).v5("POST", "/auth/v2/auth", params)
    duo_json(await duo.send(forged), 401, 40103)
    old = duo.v5("POST", "/auth/v2/auth", params, date=time.time() - 400)
    duo_json(await duo.send(old), 401, 40105)
    # Another passcode swapped into a signed request is a wrong signature, not a guess.
    signed = duo.v5("POST", "/auth/v2/auth", params)
    swapped = {**signed, "content": Client.canon_json({**params, "passcode": "000000"})}
    duo_json(await duo.send(swapped), 401, 40103)
    sms = duo.v5("POST", "/auth/v2/auth", {"factor": "sms", "username": who.email})
    duo_json(await Integration(server, duo.ikey, "k" * 40).send(
        {**sms, "headers": {**sms["headers"], "Date": email.utils.formatdate(0)}}
    ), 401, 40105)  # fmt: skip
    # None of these spent the code: it still allows, once, and a replay of that very
    # request (within its Date) is a used code.
    allowed = duo.v5("POST", "/auth/v2/auth", params)
    assert duo_json(await duo.send(allowed), 200)["response"]["result"] == "allow"
    replayed = duo_json(await duo.send(allowed), 200)["response"]
    assert replayed["result"] == "deny"


async def test_passcode_and_sms_for_unknown_locked_and_phoneless_users_deny(
    server: LiveServer,
) -> None:
    duo = await integration(server, "otp-users")
    locked = await person(server, "duo-otp-locked")
    async with server.services.db() as db:
        await set_locked(db, locked.email, True)
        await db.commit()
    await account_changed(server.services.redis, server.services.keys, locked.user_id)
    right = locked.phone.passcode(time.time())
    for username, factor in ((locked.email, "passcode"), (locked.email, "sms")):
        params = {"factor": factor, "username": username, "passcode": right}
        reply = duo_json(await duo.send(duo.v5("POST", "/auth/v2/auth", params)), 200)
        assert reply["response"]["status"] == "locked_out", reply
    phoneless = await person(server, "duo-otp-phoneless", phone=False)
    for username in ("nobody-at-all@example.com", phoneless.email):
        for factor in ("passcode", "sms"):
            params = {"factor": factor, "username": username, "passcode": "123456"}
            reply = duo_json(await duo.send(duo.v5("POST", "/auth/v2/auth", params)), 200)
            assert reply["response"]["result"] == "deny", reply
    # No SMS sender on this server: sms is refused in Duo's words, never a 500.
    who = await person(server, "duo-otp-nosender")
    reply = duo_json(await duo.send(duo.v5("POST", "/auth/v2/auth", {
        "factor": "sms", "username": who.email, "async": "1"})), 200)  # fmt: skip
    status = await duo.send(duo.v5("GET", "/auth/v2/auth_status", reply["response"]))
    assert duo_json(status, 200)["response"]["result"] == "deny"


@pytest.mark.parametrize("typed", ["12\x003456", "1" * 5000, "\x1b[2J123456"])
async def test_a_hostile_passcode_typed_at_login_duos_prompt_is_400(
    server: LiveServer, typed: str
) -> None:
    duo = await integration(server, "v1-otp")
    who = await person(server, "duo-v1-otp")
    params = {"user": who.email, "factor": "auto", "auto": typed, "async": "1"}
    duo_bson(await duo.send(duo.v1("POST", "/rest/v1/auth.bson", params)), 400, 40002)


async def test_a_replayed_v1_passcode_request_is_a_used_code(server: LiveServer) -> None:
    # v1 signatures carry no Date (SECURITY.md): a captured request can be sent again, but
    # the passcode in it was used up by the first.
    duo = await integration(server, "v1-replay")
    who = await person(server, "duo-v1-replay")
    params = {"user": who.email, "factor": "auto", "auto": who.phone.passcode(time.time()),
              "async": "0"}  # fmt: skip
    captured = duo.v1("POST", "/rest/v1/auth.bson", params)
    first = duo_bson(await duo.send(captured), 200)["response"]
    assert first["result"] == "allow"
    replayed = duo_bson(await duo.send(captured), 200)["response"]
    assert replayed["result"] == "deny"
