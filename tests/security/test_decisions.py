"""Forged, replayed and misdirected decisions (PROTOCOL §3), over HTTP and the device socket
alike: only an ES256 JWS signed by the answering device's enrolled key, for this approval's
id and challenge, within 5 minutes, ever decides; everything else is `bad_signature` and the
approval stays pending for the real answer.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pydantic import ValidationError

from app.core.signatures import device_public_jwk
from app.settings import Settings
from tests.fixtures.app import LiveServer, Phone
from tests.security.harness import (
    MakePerson,
    Person,
    api_key,
    approval_key,
    assert_error,
    b64,
    claims_for,
    decide,
    device_socket,
    device_view,
    forget_fatigue,
    hs256_with,
    next_frame,
    pending_login,
    person,
    segment,
    signed,
    unsigned,
)

pytestmark = pytest.mark.timeout(120)


def _public_key_encodings(phone: Phone) -> list[bytes]:
    """Every form of the device's public key an HS256 forger might try as the HMAC key."""
    public = phone.key.public_key()
    jwk = device_public_jwk(public)
    return [
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        ),
        json.dumps(jwk).encode(),
        json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode(),
        b"",
    ]


def _der_signed(phone: Phone, claims: dict[str, Any]) -> str:
    """Signed with the right key, but the signature in DER rather than JOSE's r||s."""
    signing_input = f"{segment({'alg': 'ES256', 'kid': phone.device_id})}.{segment(claims)}"
    from cryptography.hazmat.primitives import hashes

    der = phone.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    return f"{signing_input}.{b64(der)}"


def _with_header(
    phone: Phone,
    header: dict[str, Any],
    claims: dict[str, Any],
    key: ec.EllipticCurvePrivateKey | None = None,
) -> str:
    """An ES256 JWS with a header of our choosing (embedded keys, crit, ...)."""
    from cryptography.hazmat.primitives import hashes

    signing_input = f"{segment(header)}.{segment(claims)}"
    der = (key or phone.key).sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _tampered(text: str) -> str:
    """`text` with its first character changed: never equal to it, whatever it was.

    (Overwriting the last two with "AA" left a challenge that already ended so untouched:
    one in 256 challenges, a valid decision the server rightly approved.)
    """
    return ("B" if text[0] == "A" else "A") + text[1:]


def _another_number(number: str) -> str:
    """A number of the same length that is not `number` (a fixed "00" is the real one 1 in 100)."""
    return f"{(int(number) + 1) % 10 ** len(number):0{len(number)}d}"


def forgeries(
    who: Person, sibling: Phone, approval: dict[str, Any], other: dict[str, Any], number: str
) -> dict[str, str]:
    """Named decisions that must all be refused with `bad_signature`."""
    phone = who.phone
    good = claims_for(approval, number=number)
    attacker = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    found = {
        "alg none": unsigned(phone.device_id, good),
        "alg None": f"{segment({'alg': 'None', 'kid': phone.device_id})}.{segment(good)}.",
        "alg none with a signature": unsigned(phone.device_id, good)
        + signed(phone, good).rsplit(".", 1)[1],
        # Well outside the 300 s window: the list takes seconds to go through, and the
        # server's clock moves on meanwhile (test_the_iat_window_is_five_minutes_either_way
        # probes the edges).
        "expired (iat 6 min old)": signed(phone, {**good, "iat": now - 360}),
        "from the future (iat 6 min ahead)": signed(phone, {**good, "iat": now + 360}),
        "iat as a string": signed(phone, {**good, "iat": str(now)}),
        "iat as a float": signed(phone, {**good, "iat": now + 0.5}),
        "iat huge": signed(phone, {**good, "iat": 10**40}),
        "no iat": signed(phone, {k: v for k, v in good.items() if k != "iat"}),
        "another approval's challenge": signed(phone, {**good, "chl": other["challenge"]}),
        "another approval's id": signed(phone, {**good, "aid": other["id"]}),
        "another approval entirely": signed(phone, claims_for(other, number=number)),
        "challenge tampered": signed(phone, {**good, "chl": _tampered(good["chl"])}),
        "no challenge": signed(phone, {k: v for k, v in good.items() if k != "chl"}),
        "decision maybe": signed(phone, {**good, "decision": "maybe"}),
        "approve for fraud": signed(phone, {**good, "reason": "fraud"}),
        "reason other": signed(phone, {**good, "decision": "deny", "reason": "bored"}),
        "approve without a number": signed(phone, {k: v for k, v in good.items() if k != "number"}),
        "signed by a sibling device's key": signed(
            Phone(phone.device_id, phone.token, sibling.key), good
        ),
        "kid of a sibling device": signed(sibling, good),
        "signed by an attacker's key": signed(Phone(phone.device_id, phone.token, attacker), good),
        "attacker key embedded in the header": _with_header(
            phone,
            {
                "alg": "ES256",
                "kid": phone.device_id,
                "jwk": device_public_jwk(attacker.public_key()),
            },
            good,
            attacker,
        ),
        "attacker key by URL": _with_header(
            phone,
            {"alg": "ES256", "kid": phone.device_id, "jku": "https://evil.example/jwks.json"},
            good,
            attacker,
        ),
        "crit header": _with_header(
            phone, {"alg": "ES256", "kid": phone.device_id, "crit": ["exp"], "exp": now + 60}, good
        ),
        "DER signature": _der_signed(phone, good),
        "signature cut short": signed(phone, good)[:-10],
        "payload swapped after signing": ".".join(
            [
                signed(phone, good).split(".")[0],
                segment({**good, "number": _another_number(number)}),
                signed(phone, good).split(".")[2],
            ]
        ),
        "ES384 header": _with_header(phone, {"alg": "ES384", "kid": phone.device_id}, good),
        "no kid": _with_header(phone, {"alg": "ES256"}, good),
        "kid as a number": _with_header(phone, {"alg": "ES256", "kid": 7}, good),
        "kid traversal": _with_header(phone, {"alg": "ES256", "kid": "../../etc/passwd"}, good),
        "payload not an object": _with_header(
            phone, {"alg": "ES256", "kid": phone.device_id}, good
        ).split(".")[0]
        + "."
        + b64(b"[1,2]")
        + ".AA",
        "four segments": signed(phone, good) + ".AAAA",
        "JSON serialization": json.dumps(
            {"payload": segment(good), "signatures": [{"protected": "x"}]}
        ),
    }
    for index, secret in enumerate(_public_key_encodings(phone)):
        found[f"HS256 keyed with the public key #{index}"] = hs256_with(
            secret, phone.device_id, good
        )
    return found


async def _ws_answer(ws: Any, jws: str, approval_id: str) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "decision", "id": approval_id, "jws": jws}))
    while True:
        frame: dict[str, Any] = json.loads(await ws.recv())
        if frame["type"] in ("error", "decision_result"):
            return frame


async def test_forged_decisions_are_bad_signature_over_http_and_socket(
    server: LiveServer, make_person: MakePerson
) -> None:
    who = await make_person(server, "forge")
    # The second device joins as a person adds one: a sign-in approved on the first.
    sibling = await server.enroll_phone(
        who.user_id, name="tablet", via_http=True, approver=who.phone
    )
    stranger = await make_person(server, "stranger")
    other_login = await pending_login(server, stranger)
    other = await device_view(server, stranger.phone, other_login.approval_id)
    login = await pending_login(server, who)
    approval = await device_view(server, who.phone, login.approval_id)
    ws = await device_socket(server, who.phone)
    await next_frame(ws, "approval_request")

    async with httpx.AsyncClient(base_url=server.url) as client:
        for name, jws in forgeries(who, sibling, approval, other, login.number).items():
            answer = await decide(server, who.phone, login.approval_id, jws, client)
            if len(jws) > 8192:
                assert_error(answer, 422, "invalid_request")
                continue
            assert answer.status_code == 400, (name, answer.text)
            body = assert_error(answer, 400, "bad_signature")
            assert body["message"], name
            frame = await _ws_answer(ws, jws, login.approval_id)
            assert frame["type"] == "error" and frame["error"] == "bad_signature", (name, frame)
        assert (await login.browser.get(f"/api/login/{login.approval_id}")).json()[
            "status"
        ] == "pending"
        assert (await other_login.browser.get(f"/api/login/{other_login.approval_id}")).json()[
            "status"
        ] == "pending"

        # The real answer still works, once; its replay is `already_decided`, both ways.
        real = who.phone.sign(approval, number=login.number)
        first = await decide(server, who.phone, login.approval_id, real, client)
        assert first.status_code == 200 and first.json() == {"status": "approved"}
        replay = await decide(server, who.phone, login.approval_id, real, client)
        assert assert_error(replay, 409, "already_decided")["status"] == "approved"
        frame = await _ws_answer(ws, real, login.approval_id)
        assert frame["type"] == "error" and frame["error"] == "already_decided", frame
        # A sibling device's own valid answer is too late as well.
        late = await decide(
            server, sibling, login.approval_id, sibling.sign(approval, number=login.number), client
        )
        assert_error(late, 409, "already_decided")
        # Replaying the old answer against a new approval fails on its id and challenge.
        newer = await pending_login(server, who)
        moved = await decide(server, who.phone, newer.approval_id, real, client)
        assert_error(moved, 400, "bad_signature")
    await ws.close()


async def test_the_iat_window_is_five_minutes_either_way(server: LiveServer) -> None:
    who = await person(server, "window")
    async with httpx.AsyncClient(base_url=server.url) as client:
        # iat is whole seconds (the signer truncates), which can move a signature up to 1 s
        # earlier: 302 s is outside the window whatever the fraction, 301 s was not always.
        for skew, status in [(-302, 400), (302, 400), (-290, 200), (290, 200)]:
            login = await pending_login(server, who)
            approval = await device_view(server, who.phone, login.approval_id)
            jws = who.phone.sign(approval, number=login.number, iat=time.time() + skew)
            answer = await decide(server, who.phone, login.approval_id, jws, client)
            assert answer.status_code == status, (skew, answer.text)


async def test_a_wrong_number_denies_and_numbers_are_compared_exactly(
    server: LiveServer,
) -> None:
    who = await person(server, "number")
    async with httpx.AsyncClient(base_url=server.url) as client:
        for given in [None, True, -1, 100, "", " 1", "\uff11\uff12", "1.0", [1], {"n": 1}, 1.0]:
            login = await pending_login(server, who)
            approval = await device_view(server, who.phone, login.approval_id)
            if given == login.number:
                continue
            answer = await decide(
                server, who.phone, login.approval_id, who.phone.sign(approval, number=given), client
            )
            assert assert_error(answer, 422, "wrong_number")["status"] == "denied", given
            assert (await login.browser.get(f"/api/login/{login.approval_id}")).json()[
                "status"
            ] == "denied"
        login = await pending_login(server, who)
        approval = await device_view(server, who.phone, login.approval_id)
        as_int = await decide(
            server,
            who.phone,
            login.approval_id,
            who.phone.sign(approval, number=int(login.number)),
            client,
        )
        assert as_int.status_code == 200, as_int.text


async def test_over_the_socket_numbers_are_compared_the_same_way(server: LiveServer) -> None:
    """A socket that relayed the approval answers in one step (the decide script compares
    the number); it must judge every number exactly as the HTTP route does."""
    who = await person(server, "socketnumber")
    ws = await device_socket(server, who.phone)
    async with httpx.AsyncClient(base_url=server.url) as client:
        for given in [None, True, -1, 100, "", " 1", "\uff11\uff12", "1.0", [1], {"n": 1}, 1.0]:
            login = await pending_login(server, who)
            relayed = (await next_frame(ws, "approval_request"))["approval"]
            if given == login.number:
                continue
            frame = await _ws_answer(ws, who.phone.sign(relayed, number=given), login.approval_id)
            assert frame["error"] == "wrong_number", (given, frame)
            assert (await login.browser.get(f"/api/login/{login.approval_id}")).json()[
                "status"
            ] == "denied"
        for number in (lambda n: n, int):  # "07" and 7 both mean 07
            login = await pending_login(server, who)
            relayed = (await next_frame(ws, "approval_request"))["approval"]
            jws = who.phone.sign(relayed, number=number(login.number))
            frame = await _ws_answer(ws, jws, login.approval_id)
            assert frame == {
                "type": "decision_result",
                "id": login.approval_id,
                "status": "approved",
            }
            answer = await decide(server, who.phone, login.approval_id, jws, client)
            assert assert_error(answer, 409, "already_decided")["status"] == "approved"
    await ws.close()


async def test_an_expired_approval_answers_410(server: LiveServer) -> None:
    who = await person(server, "expired")
    login = await pending_login(server, who)
    approval = await device_view(server, who.phone, login.approval_id)
    # Move the deadline into the past instead of waiting two minutes.
    key = approval_key(server, login.approval_id)
    await server.services.redis.hset(key, "expires_at", repr(time.time() - 1))
    answer = await decide(
        server, who.phone, login.approval_id, who.phone.sign(approval, number=login.number)
    )
    assert assert_error(answer, 410, "expired")["status"] == "expired"
    again = await decide(server, who.phone, login.approval_id, who.phone.sign(approval, "deny"))
    assert_error(again, 410, "expired")
    done = await login.browser.post(f"/api/login/{login.approval_id}/complete")
    assert_error(done, 409, "not_approved")


async def test_credentials_of_other_users_open_nothing(
    server: LiveServer, make_person: MakePerson
) -> None:
    alice = await make_person(server, "alice")
    bob = await make_person(server, "bob")
    login = await pending_login(server, alice)
    alice_key, bob_key = await api_key(server, "alice-rp"), await api_key(server, "bob-rp")
    async with httpx.AsyncClient(base_url=server.url) as client:
        created = await client.post(
            "/api/v1/approvals",
            json={"user": bob.email},
            headers={"Authorization": f"Bearer {alice_key}"},
        )
        assert created.status_code == 201, created.text
        rp_id = created.json()["approval_id"]
        checks: list[tuple[str, str, dict[str, str], int]] = [
            # Bob's session is no login cookie for Alice's sign-in.
            ("GET", f"/api/login/{login.approval_id}", {}, 403),
            ("POST", f"/api/login/{login.approval_id}/complete", {}, 403),
            ("POST", f"/api/login/{login.approval_id}/resend", {}, 403),
            ("POST", f"/api/login/{login.approval_id}/code", {}, 403),
            # Bob's phone sees neither Alice's login nor anything of hers.
            ("GET", f"/api/approvals/{login.approval_id}", bob.phone.auth, 404),
            # Another relying party's key cannot read this one's approval.
            ("GET", f"/api/v1/approvals/{rp_id}", {"Authorization": f"Bearer {bob_key}"}, 404),
            # A device token is no API key, and an API key is no device token.
            ("GET", f"/api/v1/approvals/{rp_id}", alice.phone.auth, 401),
            ("GET", "/api/devices/me/approvals", {"Authorization": f"Bearer {alice_key}"}, 401),
        ]
        for method, path, headers, status in checks:
            response = await bob.session.request(
                method, path, headers=headers, json={"code": "123456"}
            )
            assert_error(response, status)
        # Bob's session revokes none of Alice's devices.
        gone = await bob.session.delete(f"/api/devices/{alice.phone.device_id}")
        assert_error(gone, 404, "not_found")
        mine = await alice.session.get("/api/devices")
        assert [d["id"] for d in mine.json()["devices"]] == [alice.phone.device_id]


async def test_approvals_live_120_s_and_relying_parties_choose_10_to_600_s(
    server: LiveServer,
) -> None:
    """NIST SP 800-63B-4 §3.1.3.2 as SECURITY.md claims it: valid for at most 10 minutes by
    default (120 s for sign-ins; a relying party may ask for 10 to 600 s), and the setting
    itself stops at an hour."""
    who = await person(server, "lifetime")
    login = await pending_login(server, who)
    created = await device_view(server, who.phone, login.approval_id)
    assert _seconds(created["expires_at"]) - _seconds(created["created_at"]) == 120
    key = await api_key(server)
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}
    ) as rp:
        for ttl, status in ((9, 422), (10, 201), (600, 201), (601, 422)):
            await forget_fatigue(server, who.user_id)  # each request supersedes the last
            asked = await rp.post("/api/v1/approvals", json={"user": who.email, "ttl": ttl})
            assert asked.status_code == status, (ttl, asked.text)
            if status == 201:
                seen = (await rp.get(f"/api/v1/approvals/{asked.json()['approval_id']}")).json()
                assert _seconds(seen["expires_at"]) - _seconds(seen["created_at"]) == ttl
    with pytest.raises(ValidationError):
        Settings(approval_ttl=3601)
    assert Settings(approval_ttl=3600).approval_ttl == 3600


def _seconds(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp())
