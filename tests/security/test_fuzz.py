"""Property-based fuzzing (hypothesis): whatever JSON (or not-JSON) reaches the main routes
and the device socket, the answer is a documented status in the protocol's error shape, the
socket stays open, and the pure parsers raise only their documented exception.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.core.matching import MatchPolicy, number_matches
from app.core.signatures import (
    DecisionRejected,
    device_public_jwk,
    parse_device_jwk,
    peek_aid,
    read_kid,
    sign_decision,
    verify_decision,
)
from tests.fixtures.app import PASSWORD, LiveServer
from tests.security.harness import (
    Person,
    api_key,
    assert_sane,
    b64,
    clear_limits,
    device_socket,
    device_view,
    next_frame,
    person,
    segment,
)
from tests.security.test_device_socket import Conversation

pytestmark = pytest.mark.timeout(240)

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

STRINGS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "\x00",
            "\ud800",
            "x\udfffy",
            "\u202e",
            "💩",
            "Ω" * 400,
            "null",
            "true",
            "0",
            "-1",
            "' OR 1=1--",
            "A" * 43,
            "tap_" + "A" * 43,
        ]
    ),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    STRINGS,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(STRINGS, inner, max_size=4),
    max_leaves=12,
)


def bodies(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Bodies near the route's schema (its fields, each right or wrong), or anything at all."""
    near = st.fixed_dictionaries(
        {}, optional={name: value | JSON for name, value in fields.items()}
    )
    with_extra = st.tuples(near, st.dictionaries(STRINGS, JSON, max_size=2)).map(
        lambda pair: {**pair[1], **pair[0]}
    )
    return st.one_of(near, with_extra, JSON)


def encode(body: Any) -> bytes:
    # json.dumps writes NaN/Infinity and escapes lone surrogates: both are invalid JSON the
    # server has to refuse, which is the point.
    return json.dumps(body).encode()


RAW = st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode))


@pytest.fixture(scope="module")
async def cast(shared: LiveServer) -> AsyncIterator[dict[str, Any]]:
    """For the whole module: a person with a phone and a pending relying-party approval (it
    lives 10 minutes, longer than the fuzzing), an API key, and someone else to sign in as."""
    who = await person(shared, "fuzz")
    key = await api_key(shared)
    client = httpx.AsyncClient(base_url=shared.url, headers={"Origin": shared.origin})
    created = await client.post(
        "/api/v1/approvals",
        json={"user": who.email, "ttl": 600},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert created.status_code == 201, created.text
    approval = await device_view(shared, who.phone, created.json()["approval_id"])
    ws = await device_socket(shared, who.phone)
    yield {
        "who": who,
        "key": key,
        "approval": approval,
        "number": created.json()["number"],
        "client": client,
        "ws": ws,
        "signs_in": await person(shared, "signs-in"),
    }
    await client.aclose()
    await ws.close()


async def _post(
    cast: dict[str, Any],
    path: str,
    body: Any,
    raw: bytes | None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> httpx.Response:
    client: httpx.AsyncClient = cast["client"]
    return await client.request(
        method,
        path,
        content=raw if raw is not None else encode(body),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


@FUZZ
@given(
    body=bodies({"email": STRINGS, "password": STRINGS, "remember_browser": st.booleans()}),
    raw=st.none() | RAW,
)
async def test_fuzzed_logins(
    shared: LiveServer, cast: dict[str, Any], body: Any, raw: bytes | None
) -> None:
    who: Person = cast["signs_in"]
    # Half the well-formed ones name the real account (cheap to check), the rest nobody.
    if isinstance(body, dict) and isinstance(body.get("email"), str) and len(body["email"]) % 2:
        body["email"] = who.email
        if isinstance(body.get("password"), str) and len(body["password"]) % 3 == 0:
            body["password"] = PASSWORD
    # A clean slate on purpose: hundreds of examples on one account would otherwise all be
    # answered by the rate limit, and the password check would go unfuzzed.
    await clear_limits(shared)
    response = await _post(cast, "/api/login", body, raw)
    assert_sane(response, {202, 401, 422, 429})


@FUZZ
@given(
    body=bodies(
        {
            "jws": STRINGS
            | st.builds(
                lambda h, p, s: f"{b64(h)}.{b64(p)}.{s}",
                st.binary(max_size=40),
                st.binary(max_size=40),
                st.text("AZaz09_-", max_size=90),
            )
        }
    ),
    raw=st.none() | RAW,
)
async def test_fuzzed_decisions(cast: dict[str, Any], body: Any, raw: bytes | None) -> None:
    who: Person = cast["who"]
    response = await _post(
        cast, f"/api/approvals/{cast['approval']['id']}/decision", body, raw, who.phone.auth
    )
    assert_sane(response, {400, 422})


@FUZZ
@given(header=JSON, payload=JSON)
async def test_fuzzed_jws_headers_and_claims(
    cast: dict[str, Any], header: Any, payload: Any
) -> None:
    """Well-signed by the device, but with any header and any claims."""
    who: Person = cast["who"]
    try:
        signing_input = f"{segment(header)}.{segment(payload)}"
    except (ValueError, TypeError):
        return
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(
        who.phone.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    )
    jws = f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
    response = await _post(
        cast,
        f"/api/approvals/{cast['approval']['id']}/decision",
        {"jws": jws},
        None,
        who.phone.auth,
    )
    assert_sane(response, {400, 422})


@FUZZ
@given(
    body=bodies(
        {
            "code": STRINGS,
            "name": STRINGS,
            "platform": st.sampled_from(["android", "ios", "web", "Android"]),
            "public_key": st.fixed_dictionaries(
                {},
                optional={
                    "kty": st.just("EC") | STRINGS,
                    "crv": st.just("P-256") | STRINGS,
                    "x": STRINGS,
                    "y": STRINGS,
                    "d": STRINGS,
                    "alg": STRINGS,
                },
            ),
            "push": st.fixed_dictionaries(
                {}, optional={"provider": st.sampled_from(["fcm", "apns", "sms"]), "token": STRINGS}
            ),
        }
    ),
    raw=st.none() | RAW,
)
async def test_fuzzed_enrollments(cast: dict[str, Any], body: Any, raw: bytes | None) -> None:
    response = await _post(cast, "/api/devices", body, raw)
    assert_sane(response, {400, 422})


@FUZZ
@given(
    body=bodies(
        {
            "user": STRINGS,
            "ttl": st.integers(-10, 1000),
            "context": st.fixed_dictionaries(
                {},
                optional={"ip": STRINGS, "user_agent": STRINGS, "browser": STRINGS, "os": STRINGS},
            ),
        }
    ),
    raw=st.none() | RAW,
)
async def test_fuzzed_relying_party_requests(
    cast: dict[str, Any], body: Any, raw: bytes | None
) -> None:
    response = await _post(
        cast, "/api/v1/approvals", body, raw, {"Authorization": f"Bearer {cast['key']}"}
    )
    assert_sane(response, {404, 422})


@FUZZ
@given(
    body=bodies(
        {
            "name": STRINGS,
            "push": st.fixed_dictionaries(
                {},
                optional={"provider": st.sampled_from(["fcm", "apns"]) | STRINGS, "token": STRINGS},
            ),
        }
    ),
    raw=st.none() | RAW,
)
async def test_fuzzed_device_updates(cast: dict[str, Any], body: Any, raw: bytes | None) -> None:
    who: Person = cast["who"]
    response = await _post(cast, "/api/devices/me", body, raw, who.phone.auth, method="PATCH")
    assert_sane(response, {200, 422})


@FUZZ
@given(
    body=bodies({"token": STRINGS, "email": STRINGS, "code": STRINGS}),
    raw=st.none() | RAW,
    path=st.sampled_from(
        ["/api/verify-email", "/api/verify-email/resend", "/api/account/phone/verify"]
    ),
)
async def test_fuzzed_email_and_code_bodies(
    cast: dict[str, Any], body: Any, raw: bytes | None, path: str
) -> None:
    who: Person = cast["who"]
    response = await who.session.post(
        path,
        content=raw if raw is not None else encode(body),
        headers={"Content-Type": "application/json"},
    )
    assert_sane(response, {202, 400, 422} if "verify-email" in path else {400, 422})


FRAMES = st.one_of(
    JSON.map(json.dumps),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["auth", "ack", "decision", "ping", "error"]) | STRINGS},
        optional={"id": JSON, "jws": JSON, "token": JSON},
    ).map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
)
SOCKET_ERRORS = {
    "bad_message",
    "bad_signature",
    "not_found",
    "invalid_request",
    "already_decided",
    "expired",
    "wrong_number",
}


@FUZZ
@given(frame=FRAMES)
async def test_fuzzed_device_frames(cast: dict[str, Any], frame: str | bytes) -> None:
    answers = await Conversation(cast["ws"]).answer(frame)
    for answer in answers:
        assert answer["type"] in (
            "error",
            "approval_request",
            "approval_resolved",
            "decision_result",
        ), answer
        if answer["type"] == "error":
            assert answer["error"] in SOCKET_ERRORS and isinstance(answer["message"], str)


# --- the pure parsers -------------------------------------------------------------------------

KEY = ec.generate_private_key(ec.SECP256R1())
JWK = device_public_jwk(KEY.public_key())


@settings(max_examples=300, deadline=None)
@given(
    obj=JSON
    | st.fixed_dictionaries(
        {"kty": st.just("EC"), "crv": st.just("P-256")},
        optional={
            "x": STRINGS | st.just(JWK["x"]),
            "y": STRINGS | st.just(JWK["y"]),
            "d": JSON,
            "alg": JSON,
        },
    )
)
def test_parse_device_jwk_raises_only_value_error(obj: Any) -> None:
    try:
        parsed = parse_device_jwk(obj)
    except ValueError:
        return
    assert parsed == {"kty": "EC", "crv": "P-256", "x": obj["x"], "y": obj["y"]}


JWS_TEXT = st.one_of(
    STRINGS,
    st.builds(lambda h, p, s: f"{h}.{p}.{s}", STRINGS, STRINGS, STRINGS),
    st.builds(lambda h, p: f"{segment(h)}.{segment(p)}.", JSON, JSON),
    st.builds(
        lambda h, p, s: f"{b64(h)}.{b64(p)}.{b64(s)}",
        st.binary(max_size=60),
        st.binary(max_size=60),
        st.binary(max_size=64),
    ),
)


@settings(max_examples=300, deadline=None)
@given(jws=JWS_TEXT)
def test_jws_readers_raise_only_decision_rejected(jws: str) -> None:
    try:
        kid = read_kid(jws)
        assert isinstance(kid, str) and kid.isascii()
    except DecisionRejected as exc:
        assert exc.code == "bad_signature" and exc.message
    aid = peek_aid(jws)
    assert aid is None or (isinstance(aid, str) and aid.isascii())
    try:
        verify_decision(jws, JWK, approval_id="a" * 32, challenge="c" * 43, now=1e9)
    except DecisionRejected:
        pass
    else:
        raise AssertionError("an unsigned or garbage JWS verified")


@settings(max_examples=150, deadline=None)
@given(
    claims=st.dictionaries(
        st.sampled_from(["aid", "chl", "decision", "number", "reason", "iat", "other"]),
        JSON,
        max_size=7,
    ),
    header=st.dictionaries(STRINGS, JSON, max_size=3),
)
def test_verify_decision_accepts_only_complete_matching_claims(
    claims: dict[str, Any], header: dict[str, Any]
) -> None:
    try:
        jws = sign_decision(KEY, "d" * 32, claims)
    except (TypeError, ValueError, OverflowError):
        return
    try:
        verified = verify_decision(
            jws, JWK, approval_id="a" * 32, challenge="c" * 43, now=1_800_000_000
        )
    except DecisionRejected:
        return
    assert verified.aid == "a" * 32 and verified.chl == "c" * 43
    assert verified.decision in ("approve", "deny")
    assert abs(verified.iat - 1_800_000_000) <= 300


@settings(max_examples=300, deadline=None)
@given(given_number=JSON, mode=st.sampled_from(["typed", "choices", "nist"]))
def test_number_matching_never_raises(given_number: Any, mode: str) -> None:
    policy = MatchPolicy.for_mode(mode)
    expected = "0" * policy.digits
    matched = number_matches(policy, expected, given_number)
    assert matched == (
        given_number in (expected, 0)
        and not isinstance(given_number, bool)
        and not isinstance(given_number, float)
    )


async def test_after_the_fuzzing_the_approval_is_still_answerable(cast: dict[str, Any]) -> None:
    who: Person = cast["who"]
    ws = cast["ws"]
    jws = who.phone.sign(cast["approval"], number=cast["number"])
    await ws.send(json.dumps({"type": "decision", "jws": jws}))
    result = await next_frame(ws, "decision_result")
    assert result == {"type": "decision_result", "id": cast["approval"]["id"], "status": "approved"}
