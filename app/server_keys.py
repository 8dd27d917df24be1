"""Keys the server itself holds, and the box that seals secrets kept at rest with them.

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
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.settings import Settings

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
KEY_FILE = "secret.key"
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


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: of two processes starting at once, one writes and both read the same key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as out:
        out.write(new_secret_key() + "\n")


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
