"""Keys the server itself holds, and the box that seals secrets kept at rest with them.

The VAPID key pair (RFC 8292) signs every Web Push request; browsers tie each subscription
to its public key, so it must stay the same across restarts and processes: it comes from
`TAPPROVE_VAPID_PRIVATE_KEY`, else from a file generated once in the data dir.

Some secrets must be readable again by the server (a relying party's signing key, a phone's
passcode seed), so a hash will not do: they are stored sealed with AES-256-GCM under a key
derived from `TAPPROVE_SECRET_KEY` for one purpose, and the record's own name is bound in as
associated data, so a sealed value copied onto another row does not open. The embedded
default has no settings to hold a key, so one is generated once in the data dir.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.settings import Settings

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
KEY_FILE = "secret.key"
VAPID_KEY_FILE = "vapid.pem"
# A sealed value starts with its format version, so the format can change without guessing.
_VERSION = "v1."


class SealError(ValueError):
    """A sealed value that does not open: damaged, from another record, or another key."""


def _decode_key(text: str, origin: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except ValueError:
        raise ValueError(f"{origin}: not base64url") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"{origin}: must decode to {KEY_BYTES} bytes, not {len(key)}")
    return key


def new_secret_key() -> str:
    """A fresh value for TAPPROVE_SECRET_KEY."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).rstrip(b"=").decode()


def secret_key(settings: Settings) -> bytes:
    """The server's master key: TAPPROVE_SECRET_KEY, else the data dir's key file (made once)."""
    if settings.secret_key:
        return _decode_key(settings.secret_key, "TAPPROVE_SECRET_KEY")
    path = (settings.data_dir / KEY_FILE).resolve()
    if not path.exists():
        _create_key_file(path)
        if settings.database_url:
            log.warning(
                "TAPPROVE_SECRET_KEY is not set: generated %s; every serve and worker process "
                "must use this same key (set TAPPROVE_SECRET_KEY to share it between hosts)",
                path,
            )
    return _decode_key(path.read_text(), str(path))


def _create_key_file(path: Path, content: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: of two processes starting at once, one writes and both read the same key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as out:
        out.write(content if content is not None else new_secret_key() + "\n")


def vapid_private_key(settings: Settings) -> ec.EllipticCurvePrivateKey:
    """The VAPID signing key: TAPPROVE_VAPID_PRIVATE_KEY, else the data dir's (made once)."""
    if settings.vapid_private_key:
        return parse_vapid_key(settings.vapid_private_key, "TAPPROVE_VAPID_PRIVATE_KEY")
    path = (settings.data_dir / VAPID_KEY_FILE).resolve()
    if not path.exists():
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _create_key_file(path, pem.decode())
        if settings.database_url:
            log.warning(
                "TAPPROVE_VAPID_PRIVATE_KEY is not set: generated %s; every serve and worker "
                "process must use this same key (browsers tie Web Push subscriptions to it)",
                path,
            )
    return parse_vapid_key(path.read_text(), str(path))


def parse_vapid_key(text: str, origin: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from PEM, or from base64url of its raw 32-byte scalar."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except ValueError:
            raise ValueError(f"{origin}: not a PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ValueError(f"{origin}: must be a P-256 (prime256v1) key")
        return key
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise ValueError(f"{origin}: neither PEM nor base64url") from None
    if len(raw) != 32:
        raise ValueError(f"{origin}: a raw key must decode to 32 bytes, not {len(raw)}")
    try:
        return ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    except ValueError:
        raise ValueError(f"{origin}: not a valid P-256 private key") from None


def vapid_public_key(key: ec.EllipticCurvePrivateKey) -> str:
    """The browser's `applicationServerKey`: base64url of the uncompressed public point."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return base64.urlsafe_b64encode(point).rstrip(b"=").decode()


def _purpose_key(master_key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label).derive(
        master_key
    )


class KeyedHash:
    """HMAC-SHA256 under a per-purpose key: the stored form of short codes a person types.

    A plain hash of a 6-digit code is undone by trying a million codes; without the server's
    key, a copy of Redis tells nothing about the codes in it.
    """

    def __init__(self, master_key: bytes, purpose: str) -> None:
        self._key = _purpose_key(master_key, b"tapprove mac " + purpose.encode())

    def __call__(self, text: str) -> str:
        mac = hmac.HMAC(self._key, hashes.SHA256())
        mac.update(text.encode())
        return mac.finalize().hex()


class SecretBox:
    """Seal and open small secrets for one purpose (e.g. "duo-skey", "totp-seed")."""

    def __init__(self, master_key: bytes, purpose: str) -> None:
        self._aead = AESGCM(_purpose_key(master_key, b"tapprove seal " + purpose.encode()))

    def seal(self, plaintext: bytes, *, record: str) -> str:
        """The sealed form of `plaintext`, bound to `record` (e.g. the row's id)."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, record.encode())
        return _VERSION + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, token: str, *, record: str) -> bytes:
        """The plaintext of a value sealed for `record`; SealError if it does not open."""
        if not token.startswith(_VERSION):
            raise SealError("unknown sealed format")
        try:
            raw = base64.urlsafe_b64decode(token[len(_VERSION) :])
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], record.encode())
        except (ValueError, InvalidTag):
            raise SealError("sealed value does not open") from None
