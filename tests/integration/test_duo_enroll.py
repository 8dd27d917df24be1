"""Duo `enroll` / `enroll_status` for an integration created with --allow-enroll, against a
real server: a link for the first device of a user who never had one, which a phone uses
through the ordinary `POST /api/devices`; never a link for an account that has or had a
device (the first-device rule), and a link outrun by another device is dead."""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from app.core.signatures import device_public_jwk
from app.duo.enrollment import code_of
from app.duo.integrations import SEAL_PURPOSE, create_integration
from app.server_keys import SecretBox, secret_key
from tests.fixtures.app import LiveServer
from tests.security.test_duo_hostile import Integration, duo_json

pytestmark = pytest.mark.timeout(90)


async def enrolling(server: LiveServer, name: str = "idp") -> Integration:
    """An integration created with --allow-enroll."""
    box = SecretBox(secret_key(server.settings), SEAL_PURPOSE)
    async with server.services.db() as db:
        row, skey = await create_integration(
            db, box, f"{name}-{time.monotonic_ns()}", allow_enroll=True, now=time.time()
        )
        await db.commit()
    return Integration(server, row.ikey, skey)


async def enroll(duo: Integration, status: int = 200, code: int | None = None,
                 **params: str) -> dict[str, Any]:  # fmt: skip
    reply = duo_json(await duo.send(duo.v5("POST", "/auth/v2/enroll", params)), status, code)
    return reply


async def enroll_status(duo: Integration, user_id: str, activation_code: str) -> Any:
    params = {"user_id": user_id, "activation_code": activation_code}
    reply = await duo.send(duo.v5("POST", "/auth/v2/enroll_status", params))
    return duo_json(reply, 200)["response"]


async def use_link(server: LiveServer, code: str) -> httpx.Response:
    """`POST /api/devices` with this code, as a phone does (a key it does not keep)."""
    key = ec.generate_private_key(ec.SECP256R1())
    body = {"code": code, "name": "Duo-enrolled", "platform": "android",
            "public_key": device_public_jwk(key.public_key())}  # fmt: skip
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        return await client.post("/api/devices", json=body)


async def test_enroll_gives_a_first_device_link_and_status_follows_its_use(
    server: LiveServer,
) -> None:
    user_id = await server.add_user("first@example.com")
    duo = await enrolling(server)
    before = time.time()
    activation = (await enroll(duo, username="first@example.com"))["response"]
    assert activation["user_id"] == user_id and activation["username"] == "first@example.com"
    assert activation["activation_code"].startswith("tapprove://enroll?url=")
    assert activation["activation_url"].startswith(f"{server.url}/phone#enroll=")
    barcode = activation["activation_barcode"]
    assert barcode.startswith("data:image/png;base64,")
    assert base64.b64decode(barcode.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert activation["valid_secs"] == 600
    assert before + 590 <= activation["expiration"] <= time.time() + 610
    code = code_of(activation["activation_code"])
    assert code == code_of(activation["activation_url"])

    for given in (activation["activation_code"], activation["activation_url"], code):
        assert await enroll_status(duo, user_id, given) == "waiting"
    used = await use_link(server, code)
    assert used.status_code == 201, used.text
    assert await enroll_status(duo, user_id, activation["activation_code"]) == "success"
    again = await use_link(server, code)
    assert again.status_code == 400, "a link enrolls one device"
    # The user now has a second factor: no second link for them.
    refused = await enroll(duo, 400, 40002, username="first@example.com")
    assert "no user who may enroll a first device here" in refused["message"]
    preauth = await duo.send(duo.v5("POST", "/auth/v2/preauth", {"username": "first@example.com"}))
    assert duo_json(preauth, 200)["response"]["result"] == "auth"


async def test_no_link_for_an_account_that_has_or_had_a_device(server: LiveServer) -> None:
    duo = await enrolling(server, "rule")
    has = await server.add_user("has@example.com")
    await server.enroll_phone(has)
    had = await server.add_user("had@example.com")
    phone = await server.enroll_phone(had)
    async with httpx.AsyncClient(base_url=server.url) as client:
        gone = await client.delete("/api/devices/me", headers=phone.auth)
    assert gone.status_code in (200, 204), gone.text
    await server.add_user("unverified@example.com", verified=False)

    messages = set()
    for username in ("has@example.com", "had@example.com", "unverified@example.com",
                     "nobody@example.com", "not an address"):  # fmt: skip
        refused = await enroll(duo, 400, 40002, username=username)
        messages.add(refused["message"])
    assert len(messages) == 1, "unknown users and refused users get one answer"


async def test_a_link_outrun_by_another_device_is_invalid_and_dead(server: LiveServer) -> None:
    duo = await enrolling(server, "outrun")
    user_id = await server.add_user("outrun@example.com")
    activation = (await enroll(duo, username="outrun@example.com"))["response"]
    await server.enroll_phone(user_id)  # an operator's link was used first
    assert await enroll_status(duo, user_id, activation["activation_code"]) == "invalid"
    late = await use_link(server, code_of(activation["activation_code"]))
    assert late.status_code == 400 and late.json()["error"] == "invalid_or_expired_code"


async def test_valid_secs_bypass_codes_and_enroll_status_inputs(server: LiveServer) -> None:
    duo = await enrolling(server, "inputs")
    user_id = await server.add_user("inputs@example.com")
    short = (await enroll(duo, username="inputs@example.com", valid_secs="30"))["response"]
    assert short["valid_secs"] == 30 and short["expiration"] <= time.time() + 31
    capped = (await enroll(duo, username="inputs@example.com", valid_secs="86400"))["response"]
    assert capped["valid_secs"] == 600, "enrollment links live 10 minutes at most"
    for bad in ({"valid_secs": "0"}, {"valid_secs": "-5"}, {"valid_secs": "1e3"},
                {"bypass_codes": "10"}, {}):  # fmt: skip
        params = {"username": "inputs@example.com", **bad} if bad else {}
        await enroll(duo, 400, 40002, **params)

    other = await server.add_user("other-inputs@example.com")
    code = short["activation_code"]
    assert await enroll_status(duo, other, code) == "invalid", "another user's link"
    assert await enroll_status(duo, user_id, "tapprove://enroll?code=nope") == "invalid"
    assert await enroll_status(duo, "not-an-id", code) == "invalid"
    assert await enroll_status(duo, user_id, "x" * 1000) == "invalid"
    missing = await duo.send(duo.v5("POST", "/auth/v2/enroll_status", {"user_id": user_id}))
    duo_json(missing, 400, 40002)


async def test_enroll_is_rate_limited_per_user(server: LiveServer) -> None:
    duo = await enrolling(server, "limited")
    await server.add_user("limited@example.com")
    for _ in range(5):
        await enroll(duo, username="limited@example.com")
    await enroll(duo, 429, 42901, username="limited@example.com")
