"""Bench phones' keys and decisions: ES256 compact JWS straight from `cryptography`.

pyjwt would do, but this is the load generator's hot path: the header is encoded once per
device and the DER signature turned into JOSE's raw r||s by hand.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

_ECDSA = ec.ECDSA(hashes.SHA256())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def new_scalar() -> int:
    """A fresh P-256 private scalar (what a bench phone keeps instead of a PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_numbers().private_value


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


class DeviceSigner:
    """Signs decision claims as the enrolled device `device_id` would (PROTOCOL §3)."""

    def __init__(self, scalar: int, device_id: str) -> None:
        self.key = ec.derive_private_key(scalar, ec.SECP256R1())
        self.device_id = device_id
        self._header = b64url(orjson.dumps({"alg": "ES256", "kid": device_id}))

    def sign(self, claims: dict[str, Any]) -> str:
        payload = b64url(orjson.dumps(claims))
        signing_input = f"{self._header}.{payload}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode("ascii"), _ECDSA))
        return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def decide(
        self, approval: dict[str, Any], number: str | None, decision: str = "approve"
    ) -> str:
        return self.sign(
            {
                "aid": approval["id"],
                "chl": approval["challenge"],
                "decision": decision,
                "number": number,
                "iat": int(time.time()),
            }
        )
