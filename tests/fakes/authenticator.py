"""A WebAuthn authenticator in Python, for tests that talk to the server over HTTP without a
browser: ES256 discoverable credentials, user verification, `none` attestation, a signature
counter. It builds exactly what a browser sends (WebAuthn's JSON form, base64url), with the
origin a test chooses, so a test can also play a phishing page on another origin.

The real thing is tested too: tests/e2e/test_factors_browser.py drives Chromium's virtual
authenticator through the DevTools protocol.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

UP, UV, AT = 0x01, 0x04, 0x40


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Credential:
    """One discoverable credential the authenticator holds."""

    id: bytes
    key: ec.EllipticCurvePrivateKey
    rp_id: str
    user_handle: bytes
    sign_count: int = 0

    def cose_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps(
            {
                1: 2,  # kty: EC2
                3: -7,  # alg: ES256
                -1: 1,  # crv: P-256
                -2: numbers.x.to_bytes(32, "big"),
                -3: numbers.y.to_bytes(32, "big"),
            }
        )


@dataclass
class SoftAuthenticator:
    """Makes and uses credentials as a platform authenticator would, for `origin`."""

    origin: str
    credentials: list[Credential] = field(default_factory=list)

    def _client_data(self, kind: str, challenge: str, origin: str | None) -> bytes:
        return json.dumps(
            {"type": kind, "challenge": challenge, "origin": origin or self.origin},
            separators=(",", ":"),
        ).encode()

    def create(
        self,
        options: dict[str, Any],
        *,
        origin: str | None = None,
        reuse: Credential | None = None,
    ) -> dict[str, Any]:
        """Answer `PublicKeyCredentialCreationOptions` (JSON form) with a new credential, or,
        as a malicious authenticator would, with an existing one (`reuse`)."""
        rp_id = options["rp"]["id"]
        excluded = {entry["id"] for entry in options.get("excludeCredentials", [])}
        if reuse is None and any(
            b64url(c.id) in excluded for c in self.credentials if c.rp_id == rp_id
        ):
            raise ValueError("InvalidStateError: already registered with this authenticator")
        credential = reuse or Credential(
            id=secrets.token_bytes(16),
            key=ec.generate_private_key(ec.SECP256R1()),
            rp_id=rp_id,
            user_handle=unb64url(options["user"]["id"]),
        )
        if reuse is None:
            self.credentials.append(credential)
        auth_data = (
            hashlib.sha256(rp_id.encode()).digest()
            + bytes([UP | UV | AT])
            + struct.pack(">I", credential.sign_count)
            + bytes(16)  # AAGUID: none
            + struct.pack(">H", len(credential.id))
            + credential.id
            + credential.cose_key()
        )
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        return {
            "id": b64url(credential.id),
            "rawId": b64url(credential.id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(
                    self._client_data("webauthn.create", options["challenge"], origin)
                ),
                "attestationObject": b64url(attestation),
            },
        }

    def get(
        self,
        options: dict[str, Any],
        *,
        credential: Credential | None = None,
        origin: str | None = None,
        user_handle: bytes | None = None,
    ) -> dict[str, Any]:
        """Answer `PublicKeyCredentialRequestOptions` with a credential for its RP id (the
        first one held, or `credential`); the counter goes up by one."""
        rp_id = options["rpId"]
        credential = credential or next(c for c in self.credentials if c.rp_id == rp_id)
        credential.sign_count += 1
        auth_data = (
            hashlib.sha256(rp_id.encode()).digest()
            + bytes([UP | UV])
            + struct.pack(">I", credential.sign_count)
        )
        client_data = self._client_data("webauthn.get", options["challenge"], origin)
        signature = credential.key.sign(
            auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256())
        )
        return {
            "id": b64url(credential.id),
            "rawId": b64url(credential.id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "authenticatorData": b64url(auth_data),
                "signature": b64url(signature),
                "userHandle": b64url(user_handle or credential.user_handle),
            },
        }
