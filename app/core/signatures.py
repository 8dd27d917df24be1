"""Device keys and the signed decisions (compact ES256 JWS) that phones send back."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, TypeGuard

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt.algorithms import ECAlgorithm

from app.core.tokens import b64url, b64url_decode, same_secret

ALGORITHM = "ES256"

# Checked before any parsing, so a hostile phone cannot make us decode megabytes.
MAX_JWS_LENGTH = 8 * 1024

# PROTOCOL §3: `iat` within 5 minutes of the server's time, either way (phone clocks drift).
MAX_IAT_SKEW = 300

# Device and approval ids are 32 hex characters; anything far longer is not one of ours.
MAX_ID_LENGTH = 128

# The field prime of P-256; coordinates must be reduced below it.
_P256_PRIME = 2**256 - 2**224 + 2**192 + 2**96 - 1

# Three base64url segments; the signature may be empty so that `alg: none` gets a clear answer.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

_COORDINATE = re.compile(r"[A-Za-z0-9_-]{43}")

Decision = Literal["approve", "deny"]


class DecisionRejected(Exception):
    """A decision JWS that fails a check; `code` is the protocol error, `message` says which."""

    def __init__(self, message: str, code: str = "bad_signature") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DecisionClaims:
    """The verified claims of a decision: which approval, its challenge, and the answer."""

    aid: str
    chl: str
    decision: Decision
    number: object
    reason: str | None
    iat: int


def _coordinate(jwk: Mapping[str, object], name: str) -> int:
    text = jwk.get(name)
    # 43 characters is exactly 32 bytes unpadded; the round trip rejects non-canonical spellings.
    if not isinstance(text, str) or not _COORDINATE.fullmatch(text):
        raise ValueError(f"{name} must be 32 bytes of unpadded base64url")
    raw = b64url_decode(text)
    if len(raw) != 32 or b64url(raw) != text:
        raise ValueError(f"{name} must be 32 bytes of canonical base64url")
    value = int.from_bytes(raw, "big")
    if value >= _P256_PRIME:
        raise ValueError(f"{name} is not a P-256 field element")
    return value


def parse_device_jwk(obj: object) -> dict[str, str]:
    """Check a device's public JWK and return it as `{"kty","crv","x","y"}`.

    Raises ValueError unless `obj` is a JSON object holding an EC P-256 public point that lies
    on the curve. A private key (`d`) is refused: the device must never send it.
    """
    if not isinstance(obj, Mapping):
        raise ValueError("public_key must be a JWK object")
    if "d" in obj:
        raise ValueError("public_key must not contain the private key (d)")
    if obj.get("kty") != "EC":
        raise ValueError("public_key kty must be EC")
    if obj.get("crv") != "P-256":
        raise ValueError("public_key crv must be P-256")
    if "alg" in obj and obj["alg"] != ALGORITHM:
        raise ValueError("public_key alg must be ES256 when present")
    x = _coordinate(obj, "x")
    y = _coordinate(obj, "y")
    try:
        ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except ValueError:
        raise ValueError("public_key is not a point on P-256") from None
    return {"kty": "EC", "crv": "P-256", "x": obj["x"], "y": obj["y"]}


def device_public_jwk(
    key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey,
) -> dict[str, str]:
    """The public JWK of a P-256 key, in the form a device sends at enrollment."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    if not isinstance(public.curve, ec.SECP256R1):
        raise ValueError("device keys are P-256")
    numbers = public.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


def _read_header(jws: object) -> dict[str, Any]:
    if not isinstance(jws, str):
        raise DecisionRejected("jws must be a string")
    if len(jws) > MAX_JWS_LENGTH:
        raise DecisionRejected(f"jws is longer than {MAX_JWS_LENGTH} characters")
    if not _COMPACT_JWS.fullmatch(jws):
        raise DecisionRejected("jws is not a compact JWS (three base64url segments)")
    try:
        header: object = json.loads(b64url_decode(jws.split(".", 1)[0]))
    except (ValueError, RecursionError):
        raise DecisionRejected("JWS header is not base64url-encoded JSON") from None
    if not isinstance(header, dict):
        raise DecisionRejected("JWS header is not a JSON object")
    if header.get("alg") != ALGORITHM:
        raise DecisionRejected("JWS alg must be ES256")
    # RFC 7515 §4.1.11: we understand no extensions, so any critical one means reject.
    if "crit" in header:
        raise DecisionRejected("JWS crit header is not supported")
    return header


def _plausible_id(value: object) -> TypeGuard[str]:
    # Printable ASCII only: these become Redis keys and SQL lookups, and JSON allows lone
    # surrogates that would fail to encode there.
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and value.isascii()
        and value.isprintable()
    )


def read_kid(jws: str) -> str:
    """The `kid` (device id) from a decision's header, read before the key is known.

    Raises DecisionRejected for anything that is not a compact ES256 JWS with a string kid;
    nothing is verified here, so the caller must still call `verify_decision`.
    """
    kid = _read_header(jws).get("kid")
    if not _plausible_id(kid):
        raise DecisionRejected("JWS header kid is missing or not a device id")
    return kid


def peek_aid(jws: object) -> str | None:
    """The unverified `aid` claim of a decision, to find its approval; None if there is none.

    For a WebSocket decision frame, which carries no approval id of its own. Never raises and
    proves nothing: the answer is only a lookup key, and `verify_decision` must still pass.
    """
    if not isinstance(jws, str):
        return None
    try:
        _read_header(jws)
    except DecisionRejected:
        return None
    try:
        payload: object = json.loads(b64url_decode(jws.split(".")[1]))
    except (ValueError, RecursionError):
        return None
    aid = payload.get("aid") if isinstance(payload, dict) else None
    return aid if _plausible_id(aid) else None


def _public_key(public_jwk: object) -> ec.EllipticCurvePublicKey:
    try:
        key = ECAlgorithm.from_jwk(parse_device_jwk(public_jwk))
    except (ValueError, jwt.PyJWTError):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DecisionRejected("the device key is not a usable P-256 public key")
    return key


@lru_cache(maxsize=4096)
def device_key(stored_jwk: str) -> ec.EllipticCurvePublicKey:
    """The public key of a device's stored JWK text, checked and parsed once per process
    (every decision of that device needs it). DecisionRejected if it is not usable."""
    try:
        jwk: object = json.loads(stored_jwk)
    except ValueError:
        jwk = None
    return _public_key(jwk)


def _verified_payload(jws: str, key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The payload of a compact ES256 JWS (shape and header already checked by
    `_read_header`) once its signature verifies with `key` (RFC 7515 §5.2, RFC 7518 §3.4)."""
    signing_input, _, encoded_signature = jws.rpartition(".")
    signature = b64url_decode(encoded_signature)  # the shape check allows only base64url
    # ES256 signs with R || S, 32 bytes each; cryptography wants them DER-encoded.
    if len(signature) != 64:
        raise DecisionRejected("signature does not verify with the device key")
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        key.verify(
            encode_dss_signature(r, s), signing_input.encode(), ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        raise DecisionRejected("signature does not verify with the device key") from None
    try:
        payload: object = json.loads(b64url_decode(signing_input.partition(".")[2]))
    except (ValueError, RecursionError):
        payload = None
    if not isinstance(payload, dict):
        raise DecisionRejected("JWS could not be decoded (payload must be a JSON object)")
    return payload


def verify_decision(
    jws: str,
    public_jwk: Mapping[str, object] | ec.EllipticCurvePublicKey,
    *,
    approval_id: str,
    challenge: str,
    now: float,
) -> DecisionClaims:
    """Verify a phone's decision against its enrolled key (the JWK, or the key `device_key`
    parsed from it) and the approval it answers.

    Checks, in order: the JWS shape and `alg` (ES256 only), the signature, that every claim is
    present, `aid` and `chl` against this approval, `decision`, `reason` and `iat` within
    300 s of `now`. Any failure raises DecisionRejected with code `bad_signature`; whether
    `number` matches is the caller's check, since it answers `wrong_number` instead.
    """
    _read_header(jws)
    key = public_jwk if isinstance(public_jwk, ec.EllipticCurvePublicKey) else None
    payload = _verified_payload(jws, key or _public_key(public_jwk))

    for claim in ("aid", "chl", "decision", "iat"):
        if claim not in payload:
            raise DecisionRejected(f"missing claim: {claim}")
    aid, chl, decision, iat = payload["aid"], payload["chl"], payload["decision"], payload["iat"]
    reason = payload.get("reason")

    if not isinstance(aid, str) or aid != approval_id:
        raise DecisionRejected("aid does not name this approval")
    # The ASCII check comes first because same_secret encodes, and JSON allows lone surrogates.
    if not isinstance(chl, str) or not chl.isascii() or not same_secret(chl, challenge):
        raise DecisionRejected("chl does not match this approval's challenge")
    if decision not in ("approve", "deny"):
        raise DecisionRejected("decision must be approve or deny")
    if decision == "approve" and "number" not in payload:
        raise DecisionRejected("missing claim: number (required to approve)")
    if reason is not None and reason != "fraud":
        raise DecisionRejected("reason must be fraud when present")
    if reason == "fraud" and decision != "deny":
        raise DecisionRejected("reason fraud only goes with deny")
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise DecisionRejected("iat must be an integer number of seconds")
    # int/float comparison is exact in Python, so a huge iat cannot overflow here.
    if not now - MAX_IAT_SKEW <= iat <= now + MAX_IAT_SKEW:
        raise DecisionRejected(f"iat is more than {MAX_IAT_SKEW} s from the server time")

    return DecisionClaims(
        aid=aid,
        chl=chl,
        decision="approve" if decision == "approve" else "deny",
        number=payload.get("number"),
        reason=None if reason is None else "fraud",
        iat=iat,
    )


def sign_decision(
    private_key: ec.EllipticCurvePrivateKey, device_id: str, claims: Mapping[str, object]
) -> str:
    """Sign decision claims as a compact ES256 JWS with `kid` = device id, as a phone does.

    The claims go out as given (no checks), so tests can also sign malformed decisions.
    """
    # typ: None drops pyjwt's default "typ":"JWT"; the protocol header is just alg and kid.
    return jwt.encode(
        dict(claims),
        private_key,
        algorithm=ALGORITHM,
        headers={"kid": device_id, "typ": None},
    )
