"""The secret box: sealed values open only with the same key, purpose and record."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app.server_keys import (
    VAPID_KEY_FILE,
    SealError,
    SecretBox,
    new_secret_key,
    secret_key,
    vapid_private_key,
    vapid_public_key,
)
from app.settings import Settings


def test_a_sealed_value_opens_for_its_record_only() -> None:
    box = SecretBox(os.urandom(32), "duo-skey")
    sealed = box.seal(b"the secret", record="row-1")
    assert b"the secret" not in sealed.encode()
    assert box.open(sealed, record="row-1") == b"the secret"
    with pytest.raises(SealError):
        box.open(sealed, record="row-2")


def test_another_purpose_or_key_does_not_open_it() -> None:
    key = os.urandom(32)
    sealed = SecretBox(key, "duo-skey").seal(b"x", record="r")
    with pytest.raises(SealError):
        SecretBox(key, "totp-seed").open(sealed, record="r")
    with pytest.raises(SealError):
        SecretBox(os.urandom(32), "duo-skey").open(sealed, record="r")


def test_a_damaged_value_does_not_open() -> None:
    box = SecretBox(os.urandom(32), "p")
    sealed = box.seal(b"x", record="r")
    raw = bytearray(base64.urlsafe_b64decode(sealed[3:]))
    raw[len(raw) // 2] ^= 0x01  # one bit of the ciphertext or its tag
    damaged = "v1." + base64.urlsafe_b64encode(bytes(raw)).decode()
    for bad in (damaged, "v0." + sealed[3:], "v1.!!!"):
        with pytest.raises(SealError):
            box.open(bad, record="r")


def test_the_embedded_default_makes_one_key_and_keeps_it(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = secret_key(settings)
    assert secret_key(settings) == first
    key_file = tmp_path / "data" / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_the_setting_wins_and_a_malformed_one_is_refused(tmp_path: Path) -> None:
    chosen = new_secret_key()
    assert len(secret_key(Settings(data_dir=tmp_path, secret_key=chosen))) == 32
    assert not (tmp_path / "secret.key").exists()
    with pytest.raises(ValueError, match="TAPPROVE_SECRET_KEY"):
        secret_key(Settings(data_dir=tmp_path, secret_key="dG9vIHNob3J0"))


def test_the_vapid_key_is_generated_once_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = vapid_private_key(settings)
    path = tmp_path / "data" / VAPID_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Browsers tie subscriptions to the public key: it must not change across restarts.
    assert vapid_public_key(vapid_private_key(settings)) == vapid_public_key(first)
    assert isinstance(first.curve, ec.SECP256R1)


def test_a_configured_vapid_key_is_pem_or_base64url_raw_and_writes_no_file(
    tmp_path: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    raw = base64.urlsafe_b64encode(key.private_numbers().private_value.to_bytes(32)).decode()
    for given in (pem, raw.rstrip("=")):
        settings = Settings(data_dir=tmp_path, vapid_private_key=given)
        assert vapid_public_key(vapid_private_key(settings)) == vapid_public_key(key)
    assert not (tmp_path / VAPID_KEY_FILE).exists()
    # The applicationServerKey: 65 bytes, uncompressed point, unpadded base64url.
    public = vapid_public_key(key)
    assert len(public) == 87 and "=" not in public


@pytest.mark.parametrize(
    "given",
    [
        "dG9vIHNob3J0",  # 9 bytes
        "A" * 43,  # zero is not a private key
        ec.generate_private_key(ec.SECP384R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode(),
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----",
    ],
)
def test_a_vapid_key_that_is_not_p256_is_refused(tmp_path: Path, given: str) -> None:
    with pytest.raises(ValueError, match="TAPPROVE_VAPID_PRIVATE_KEY"):
        vapid_private_key(Settings(data_dir=tmp_path, vapid_private_key=given))
