"""Device keys and decision JWS, checked the way PROTOCOL §3 says the server checks them."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.core.signatures import (
    MAX_JWS_LENGTH,
    DecisionClaims,
    DecisionRejected,
    device_key,
    device_public_jwk,
    parse_device_jwk,
    peek_aid,
    read_kid,
    sign_decision,
    verify_decision,
)
from app.core.tokens import b64url, b64url_decode

NOW = 1_800_000_000.0
DEVICE_ID = "0f" * 16
APPROVAL_ID = "a1" * 16
CHALLENGE = b64url(bytes(range(32)))

DEVICE_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
DEVICE_JWK = device_public_jwk(DEVICE_KEY)

# Passed as a claim override to leave that claim out.
_DROP = object()


def _claims(**overrides: object) -> dict[str, object]:
    claims: dict[str, object] = {
        "aid": APPROVAL_ID,
        "chl": CHALLENGE,
        "decision": "approve",
        "number": "42",
        "iat": int(NOW),
    }
    for name, value in overrides.items():
        if value is _DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def _sign(key: ec.EllipticCurvePrivateKey = DEVICE_KEY, **overrides: object) -> str:
    return sign_decision(key, DEVICE_ID, _claims(**overrides))


def _verify(jws: str, jwk: Any = DEVICE_JWK) -> DecisionClaims:
    return verify_decision(jws, jwk, approval_id=APPROVAL_ID, challenge=CHALLENGE, now=NOW)


def _segment(obj: object) -> str:
    return b64url(json.dumps(obj).encode())


def _hs256(secret: bytes, header: dict[str, object] | None = None) -> str:
    signing_input = (
        f"{_segment(header or {'alg': 'HS256', 'kid': DEVICE_ID})}.{_segment(_claims())}"
    )
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def _rejected(jws: str, jwk: Any = DEVICE_JWK) -> DecisionRejected:
    with pytest.raises(DecisionRejected) as caught:
        _verify(jws, jwk)
    assert caught.value.code == "bad_signature"
    return caught.value


# --- device keys ---------------------------------------------------------------------------


def test_a_device_jwk_is_normalized_to_the_four_public_members() -> None:
    sent = DEVICE_JWK | {"kid": "phone", "use": "sig", "alg": "ES256", "key_ops": ["verify"]}
    assert parse_device_jwk(sent) == DEVICE_JWK
    assert set(DEVICE_JWK) == {"kty", "crv", "x", "y"}


def _flip_last_bit(coordinate: str) -> str:
    raw = bytearray(b64url_decode(coordinate))
    raw[-1] ^= 1
    return b64url(bytes(raw))


P256_PRIME = 2**256 - 2**224 + 2**192 + 2**96 - 1


@pytest.mark.parametrize(
    "jwk",
    [
        None,
        "not a key",
        [DEVICE_JWK],
        DEVICE_JWK | {"kty": "RSA"},
        DEVICE_JWK | {"crv": "P-384"},
        DEVICE_JWK | {"crv": "secp256k1"},
        DEVICE_JWK | {"alg": "RS256"},
        {k: v for k, v in DEVICE_JWK.items() if k != "x"},
        {k: v for k, v in DEVICE_JWK.items() if k != "y"},
        DEVICE_JWK | {"x": 12345},
        DEVICE_JWK | {"x": DEVICE_JWK["x"] + "="},
        DEVICE_JWK | {"x": DEVICE_JWK["x"][:-1]},
        DEVICE_JWK | {"x": b64url(b"\x00" + b64url_decode(DEVICE_JWK["x"]))},
        DEVICE_JWK | {"y": b64url(b64url_decode(DEVICE_JWK["y"])[1:])},
        DEVICE_JWK | {"y": _flip_last_bit(DEVICE_JWK["y"])},
        DEVICE_JWK | {"x": b64url(bytes(32)), "y": b64url(bytes(32))},
        DEVICE_JWK | {"y": b64url(P256_PRIME.to_bytes(32, "big"))},
    ],
)
def test_a_key_that_is_not_a_p256_public_point_is_refused(jwk: object) -> None:
    with pytest.raises(ValueError):
        parse_device_jwk(jwk)


def test_a_jwk_carrying_the_private_key_is_refused() -> None:
    d = DEVICE_KEY.private_numbers().private_value.to_bytes(32, "big")
    with pytest.raises(ValueError, match="private"):
        parse_device_jwk(DEVICE_JWK | {"d": b64url(d)})


def test_a_non_canonical_coordinate_spelling_is_refused() -> None:
    # The last base64url character of 32 bytes carries 2 spare bits; setting them changes the
    # text but not the bytes, so the same key could be enrolled under two spellings.
    x = DEVICE_JWK["x"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = x[:-1] + alphabet[alphabet.index(x[-1]) ^ 1]
    assert b64url_decode(twin) == b64url_decode(x)
    with pytest.raises(ValueError):
        parse_device_jwk(DEVICE_JWK | {"x": twin})


def test_device_public_jwk_only_makes_p256_keys() -> None:
    with pytest.raises(ValueError):
        device_public_jwk(ec.generate_private_key(ec.SECP384R1()))


# --- the happy path ------------------------------------------------------------------------


def test_a_decision_signed_by_the_device_verifies() -> None:
    assert _verify(_sign()) == DecisionClaims(
        aid=APPROVAL_ID, chl=CHALLENGE, decision="approve", number="42", reason=None, iat=int(NOW)
    )


def test_the_header_is_exactly_alg_and_kid() -> None:
    header = json.loads(b64url_decode(_sign().split(".")[0]))
    assert header == {"alg": "ES256", "kid": DEVICE_ID}


def test_read_kid_names_the_device() -> None:
    assert read_kid(_sign()) == DEVICE_ID


def test_the_number_is_passed_on_unchecked() -> None:
    # Whether it matches is the caller's check: it answers wrong_number, not bad_signature.
    assert _verify(_sign(number=7)).number == 7
    assert _verify(_sign(number="99")).number == "99"


def test_a_deny_needs_no_number() -> None:
    claims = _verify(_sign(decision="deny", number=_DROP))
    assert claims.decision == "deny" and claims.number is None and claims.reason is None


def test_a_fraud_report_is_a_deny_with_reason_fraud() -> None:
    claims = _verify(_sign(decision="deny", reason="fraud"))
    assert claims.decision == "deny" and claims.reason == "fraud"


def test_a_null_reason_is_no_reason() -> None:
    assert _verify(_sign(reason=None)).reason is None


def test_unknown_extra_claims_are_ignored() -> None:
    assert _verify(_sign(exp=1, aud="someone", jti=5)).decision == "approve"


# --- signatures and algorithms -------------------------------------------------------------


def test_a_jws_signed_with_another_devices_key_is_bad_signature() -> None:
    error = _rejected(_sign(OTHER_KEY))
    assert "signature" in error.message


def test_a_jws_checked_against_another_devices_key_is_bad_signature() -> None:
    _rejected(_sign(), device_public_jwk(OTHER_KEY))


def test_a_changed_payload_breaks_the_signature() -> None:
    header, _, signature = _sign(decision="deny").split(".")
    forged = f"{header}.{_segment(_claims(decision='approve'))}.{signature}"
    _rejected(forged)


def test_a_truncated_signature_is_bad_signature() -> None:
    _rejected(_sign()[:-4])


def test_alg_none_is_rejected() -> None:
    unsigned = f"{_segment({'alg': 'none', 'kid': DEVICE_ID})}.{_segment(_claims())}."
    assert "ES256" in _rejected(unsigned).message
    with pytest.raises(DecisionRejected):
        read_kid(unsigned)


def test_alg_none_with_an_es256_signature_attached_is_rejected() -> None:
    signature = _sign().split(".")[2]
    _rejected(f"{_segment({'alg': 'none', 'kid': DEVICE_ID})}.{_segment(_claims())}.{signature}")


def _public_pem() -> bytes:
    return DEVICE_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param(_public_pem(), id="pem"),
        pytest.param(json.dumps(DEVICE_JWK).encode(), id="jwk-json"),
        pytest.param(b64url_decode(DEVICE_JWK["x"]), id="x-coordinate"),
        pytest.param(b"", id="empty"),
    ],
)
def test_an_hs256_token_using_the_public_key_as_secret_is_rejected(secret: bytes) -> None:
    forged = _hs256(secret)
    assert "ES256" in _rejected(forged).message
    with pytest.raises(DecisionRejected):
        read_kid(forged)


def test_an_hs256_mac_under_an_es256_header_is_rejected() -> None:
    _rejected(_hs256(_public_pem(), header={"alg": "ES256", "kid": DEVICE_ID}))


@pytest.mark.parametrize("alg", ["ES384", "ES512", "RS256", "PS256", "EdDSA", "es256", None, 1])
def test_only_es256_is_accepted(alg: object) -> None:
    _, payload, signature = _sign().split(".")
    _rejected(f"{_segment({'alg': alg, 'kid': DEVICE_ID})}.{payload}.{signature}")


def test_an_rs256_token_from_an_rsa_key_is_rejected() -> None:
    import jwt

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": DEVICE_ID})
    _rejected(token)


def test_a_critical_header_extension_is_rejected() -> None:
    token = sign_decision(DEVICE_KEY, DEVICE_ID, _claims())
    header = {"alg": "ES256", "kid": DEVICE_ID, "crit": ["exp"], "exp": 1}
    _, payload, signature = token.split(".")
    _rejected(f"{_segment(header)}.{payload}.{signature}")


def test_an_unusable_stored_key_is_bad_signature_not_a_crash() -> None:
    _rejected(_sign(), {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"})
    _rejected(_sign(), {"kty": "oct", "k": "c2VjcmV0"})


# --- claims --------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["aid", "chl", "decision", "iat"])
def test_a_missing_claim_is_bad_signature(claim: str) -> None:
    assert (
        claim in _rejected(sign_decision(DEVICE_KEY, DEVICE_ID, _claims(**{claim: _DROP}))).message
    )


def test_an_approve_without_a_number_is_bad_signature() -> None:
    assert "number" in _rejected(_sign(number=_DROP)).message


def test_a_decision_for_another_approval_is_bad_signature() -> None:
    assert "aid" in _rejected(_sign(aid="b2" * 16)).message
    _rejected(_sign(aid=None))
    _rejected(_sign(aid=[APPROVAL_ID]))


def test_a_decision_with_another_challenge_is_bad_signature() -> None:
    error = _rejected(_sign(chl=b64url(bytes(32))))
    assert "chl" in error.message
    assert CHALLENGE not in error.message
    _rejected(_sign(chl=123))
    _rejected(_sign(chl="\ud800"))


@pytest.mark.parametrize("decision", ["approved", "APPROVE", "", None, True, ["approve"]])
def test_a_decision_other_than_approve_or_deny_is_bad_signature(decision: object) -> None:
    assert "decision" in _rejected(_sign(decision=decision)).message


@pytest.mark.parametrize("reason", ["other", "", "FRAUD", 1, ["fraud"]])
def test_a_reason_other_than_fraud_is_bad_signature(reason: object) -> None:
    assert "reason" in _rejected(_sign(decision="deny", reason=reason)).message


def test_an_approval_cannot_report_fraud() -> None:
    assert "fraud" in _rejected(_sign(reason="fraud")).message


def test_iat_299_seconds_old_is_accepted() -> None:
    assert _verify(_sign(iat=int(NOW) - 299)).iat == int(NOW) - 299


def test_iat_exactly_300_seconds_either_way_is_accepted() -> None:
    _verify(_sign(iat=int(NOW) - 300))
    _verify(_sign(iat=int(NOW) + 300))


def test_iat_301_seconds_old_is_rejected() -> None:
    assert "iat" in _rejected(_sign(iat=int(NOW) - 301)).message


def test_iat_301_seconds_in_the_future_is_rejected() -> None:
    assert "iat" in _rejected(_sign(iat=int(NOW) + 301)).message


@pytest.mark.parametrize("iat", [NOW, str(int(NOW)), True, None, 10**400, -(10**30)])
def test_iat_must_be_a_plausible_integer(iat: object) -> None:
    _rejected(_sign(iat=iat))


def test_iat_is_checked_against_the_given_now_not_the_wall_clock() -> None:
    jws = _sign(iat=1000)
    claims = verify_decision(
        jws, DEVICE_JWK, approval_id=APPROVAL_ID, challenge=CHALLENGE, now=1200.5
    )
    assert claims.iat == 1000


# --- shape, before any parsing -------------------------------------------------------------


@pytest.mark.parametrize(
    "jws",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        " " + "x.y.z",
        "x.y.z\n",
        "e30.e30.e30",  # {} header: no alg
        "W10.e30.",  # [] header
        "!!!.e30.",
        "eyJ.e30.",  # truncated header base64
    ],
)
def test_malformed_compact_serialization_is_bad_signature(jws: str) -> None:
    _rejected(jws)
    with pytest.raises(DecisionRejected):
        read_kid(jws)


def test_json_serialization_is_not_accepted() -> None:
    header, payload, signature = _sign().split(".")
    as_json = json.dumps({"protected": header, "payload": payload, "signature": signature})
    _rejected(as_json)


def test_a_jws_over_the_length_cap_is_refused_before_parsing() -> None:
    padded = _sign() + "A" * MAX_JWS_LENGTH
    assert "longer" in _rejected(padded).message
    with pytest.raises(DecisionRejected, match="longer"):
        read_kid(padded)


@pytest.mark.parametrize("kid", [None, "", 42, ["d1"], "x" * 129, "\ud800", "d\n1", "d\u00e91"])
def test_read_kid_needs_a_device_id(kid: object) -> None:
    header = {"alg": "ES256"} if kid is None else {"alg": "ES256", "kid": kid}
    with pytest.raises(DecisionRejected) as caught:
        read_kid(f"{_segment(header)}.{_segment(_claims())}.c2ln")
    assert caught.value.code == "bad_signature"


def test_a_non_string_jws_is_refused() -> None:
    with pytest.raises(DecisionRejected):
        read_kid(123)  # type: ignore[arg-type]
    _rejected(None)  # type: ignore[arg-type]


# --- properties ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)

compactish = st.from_regex(r"\A[A-Za-z0-9_\-.=+/ ]{0,200}\Z")


@given(st.text() | compactish)
def test_garbage_never_crashes_read_kid_or_verify(jws: str) -> None:
    try:
        read_kid(jws)
    except DecisionRejected as error:
        assert error.code == "bad_signature"
    with pytest.raises(DecisionRejected):
        _verify(jws)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.dictionaries(st.text(max_size=5), json_values, max_size=4)
    | st.fixed_dictionaries({"alg": st.just("ES256"), "kid": json_values}),
    payload=json_values | st.fixed_dictionaries({"aid": json_values, "iat": json_values}),
    signature=st.binary(max_size=80),
)
def test_well_formed_but_forged_tokens_are_only_ever_rejected(
    header: object, payload: object, signature: bytes
) -> None:
    jws = f"{_segment(header)}.{_segment(payload)}.{b64url(signature)}"
    with pytest.raises(DecisionRejected) as caught:
        _verify(jws)
    assert caught.value.code == "bad_signature"


@given(
    decision=json_values,
    number=json_values,
    reason=json_values,
    iat=json_values,
    chl=json_values,
)
def test_signed_but_odd_claims_raise_only_decision_rejected(
    decision: object, number: object, reason: object, iat: object, chl: object
) -> None:
    jws = _sign(decision=decision, number=number, reason=reason, iat=iat, chl=chl)
    try:
        claims = _verify(jws)
    except DecisionRejected as error:
        assert error.code == "bad_signature"
    else:
        assert claims.decision in ("approve", "deny") and claims.reason in (None, "fraud")


# --- finding the approval a WebSocket decision answers -------------------------------------


def test_peek_aid_reads_the_approval_id_without_verifying() -> None:
    assert peek_aid(_sign()) == APPROVAL_ID
    # Unverified on purpose: a forged token still names an approval, and verify rejects it.
    assert peek_aid(_sign(OTHER_KEY)) == APPROVAL_ID


@pytest.mark.parametrize(
    "jws",
    [
        None,
        "",
        "a.b",
        "e30.e30.",
        f"{_segment({'alg': 'ES256'})}.{_segment([APPROVAL_ID])}.c2ln",
        f"{_segment({'alg': 'ES256'})}.{_segment({'aid': 5})}.c2ln",
        f"{_segment({'alg': 'ES256'})}.{_segment({'aid': ''})}.c2ln",
        _segment({"alg": "ES256"}) + "." + _segment({"aid": "\ud800"}) + ".c2ln",
        f"{_segment({'alg': 'ES256'})}.e30x.c2ln",
        f"{_segment({'alg': 'HS256'})}.{_segment({'aid': APPROVAL_ID})}.c2ln",
    ],
)
def test_peek_aid_answers_none_for_anything_that_names_no_approval(jws: object) -> None:
    assert peek_aid(jws) is None


@given(st.text() | compactish)
def test_peek_aid_never_raises(jws: str) -> None:
    assert peek_aid(jws) is None or isinstance(peek_aid(jws), str)


def test_a_stored_device_key_is_parsed_once_and_verifies_like_its_jwk() -> None:
    stored = json.dumps(DEVICE_JWK)
    key = device_key(stored)
    assert device_key(stored) is key
    assert _verify(_sign(), key) == _verify(_sign())
    with pytest.raises(DecisionRejected, match="signature does not verify"):
        _verify(_sign(OTHER_KEY), key)


@pytest.mark.parametrize(
    "stored",
    ["not json", "[]", json.dumps({"kty": "EC", "crv": "P-256"}), json.dumps(DEVICE_JWK)[:-1]],
)
def test_a_stored_device_key_that_is_not_a_p256_point_is_refused(stored: str) -> None:
    with pytest.raises(DecisionRejected, match="not a usable P-256 public key"):
        device_key(stored)
