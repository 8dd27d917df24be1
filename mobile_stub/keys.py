"""The device key: ECDSA P-256, its public JWK, and ES256 compact JWS for decisions."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

_COORD_BYTES = 32  # P-256 coordinates are 256-bit big-endian integers


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE uses."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class DeviceKey:
    """An ECDSA P-256 key pair held by the device; only the public half ever leaves it."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError(f"device keys are P-256, got {private_key.curve.name}")
        self._private = private_key

    @classmethod
    def generate(cls) -> DeviceKey:
        """A fresh random key pair."""
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: str) -> DeviceKey:
        """Load a private key saved by `private_pem()`."""
        key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the stored device key is not an EC private key")
        return cls(key)

    def private_pem(self) -> str:
        """The private key as unencrypted PKCS#8 PEM (the state file is mode 0600)."""
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")

    def public_jwk(self) -> dict[str, str]:
        """The public key as a JWK `{"kty":"EC","crv":"P-256","x","y"}` (32-byte coordinates)."""
        numbers = self._private.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url(numbers.x.to_bytes(_COORD_BYTES, "big")),
            "y": b64url(numbers.y.to_bytes(_COORD_BYTES, "big")),
        }

    def sign(self, claims: Mapping[str, Any], *, kid: str) -> str:
        """An ES256 compact JWS over `claims` with header exactly `{"alg":"ES256","kid":kid}`."""
        # pyjwt adds "typ":"JWT" unless told not to; the protocol fixes the header.
        return jwt.encode(
            dict(claims), self._private, algorithm="ES256", headers={"kid": kid, "typ": None}
        )
