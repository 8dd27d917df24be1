"""SQLModel tables. Times are naive UTC datetimes; secrets are stored only as SHA-256 hashes."""

from __future__ import annotations

import sqlalchemy as sa

# NaiveDatetime, not datetime: SQLModel maps plain datetime to a timezone-aware column that
# rejects the naive UTC values app.core.clock.to_datetime() produces.
from pydantic import NaiveDatetime
from sqlmodel import Field, SQLModel

# Named constraints let later Alembic migrations (SQLite batch mode included) find and alter
# them; it must be set before the tables below are declared.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class User(SQLModel, table=True):
    """A person who signs in; `password_hash` is argon2id."""

    id: str = Field(primary_key=True, max_length=32)
    email: str = Field(index=True, unique=True, max_length=320)
    password_hash: str = Field(max_length=255)
    email_verified: bool = Field(default=False)
    phone: str | None = Field(default=None, max_length=20)
    phone_verified: bool = Field(default=False)
    sms_fallback: bool = Field(default=True)
    locked: bool = Field(default=False)
    locked_at: NaiveDatetime | None = None
    created_at: NaiveDatetime
    verified_at: NaiveDatetime | None = None
    # When the account first had a second factor (a device). Never cleared: once set, losing
    # every device does not make the password alone enough to enroll one again.
    second_factor_at: NaiveDatetime | None = None
    # Devices ever enrolled. A first-device or recovery code is used only if this has not
    # moved since the code was made, so two such codes used at once give one device.
    device_enrollments: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class Device(SQLModel, table=True):
    """An enrolled phone (or the in-browser phone) with its ES256 public key."""

    id: str = Field(primary_key=True, max_length=32)
    user_id: str = Field(foreign_key="user.id", index=True, max_length=32)
    name: str = Field(max_length=100)
    platform: str = Field(max_length=16)
    public_jwk: str = Field(max_length=1000)
    token_hash: str = Field(index=True, unique=True, max_length=64)
    push_provider: str | None = Field(default=None, max_length=8)
    push_token: str | None = Field(default=None, max_length=4096)
    created_at: NaiveDatetime
    last_seen_at: NaiveDatetime | None = None
    revoked_at: NaiveDatetime | None = None
    # Offline passcodes (app.core.passcodes): the TOTP seed sealed with the server key
    # (app.server_keys, purpose "totp-seed", bound to this device's id); when the device
    # confirmed it holds the seed (null: offer it on the next socket connection); the last
    # time step a code of it was accepted (a code works once).
    passcode_seed: str | None = Field(default=None, max_length=200)
    passcode_confirmed_at: NaiveDatetime | None = None
    passcode_last_step: int | None = None


class EnrollmentCode(SQLModel, table=True):
    """A single-use code that lets one new device join a user's account."""

    code_hash: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(foreign_key="user.id", index=True, max_length=32)
    # Who vouched for it (app.core.enrollment.EnrollmentKind), which decides what its use checks.
    kind: str = Field(max_length=16)
    # The user's `device_enrollments` when it was made (recovery codes).
    enrollments_seen: int | None = None
    created_at: NaiveDatetime
    expires_at: NaiveDatetime
    used_at: NaiveDatetime | None = None


class RecoveryCode(SQLModel, table=True):
    """One of a user's single-use recovery codes: argon2id of the code with its set's salt
    (app.core.recovery_codes); a new set replaces the old one."""

    id: str = Field(primary_key=True, max_length=32)
    user_id: str = Field(foreign_key="user.id", index=True, max_length=32)
    salt: str = Field(max_length=64)  # base64url, shared by the codes of one set
    code_hash: str = Field(max_length=64)  # base64url
    created_at: NaiveDatetime
    used_at: NaiveDatetime | None = None


class Passkey(SQLModel, table=True):
    """A WebAuthn credential (discoverable, user-verifying) that signs its owner in."""

    id: str = Field(primary_key=True, max_length=32)
    user_id: str = Field(foreign_key="user.id", index=True, max_length=32)
    credential_id: str = Field(index=True, unique=True, max_length=1400)  # base64url
    public_key: str = Field(max_length=4000)  # the COSE key, base64url
    sign_count: int = Field(default=0)
    name: str = Field(max_length=100)
    aaguid: str = Field(default="", max_length=36)
    created_at: NaiveDatetime
    last_used_at: NaiveDatetime | None = None


class ApiKey(SQLModel, table=True):
    """A relying party's server-to-server credential."""

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(index=True, unique=True, max_length=100)
    key_hash: str = Field(index=True, unique=True, max_length=64)
    created_at: NaiveDatetime
    revoked_at: NaiveDatetime | None = None


class TrustedBrowser(SQLModel, table=True):
    """A remembered browser that skips approval for 30 days, revocable by its owner."""

    id: str = Field(primary_key=True, max_length=32)
    user_id: str = Field(foreign_key="user.id", index=True, max_length=32)
    token_hash: str = Field(index=True, unique=True, max_length=64)
    user_agent: str = Field(default="", max_length=512)
    browser: str = Field(default="", max_length=100)
    os: str = Field(default="", max_length=100)
    ip: str = Field(default="", max_length=64)
    created_at: NaiveDatetime
    last_used_at: NaiveDatetime | None = None
    expires_at: NaiveDatetime
    revoked_at: NaiveDatetime | None = None


class AuditEvent(SQLModel, table=True):
    """One line of the audit log: who, what, when, from where."""

    id: int | None = Field(default=None, primary_key=True)
    at: NaiveDatetime = Field(index=True)
    user_id: str | None = Field(default=None, index=True, max_length=32)
    kind: str = Field(max_length=64)
    ip: str | None = Field(default=None, max_length=64)
    device_id: str | None = Field(default=None, max_length=32)
    approval_id: str | None = Field(default=None, max_length=32)
    detail: str = Field(default="{}", max_length=4000)
    # The Redis Stream entry it came from (app.store.audit_stream), so a copy is stored once.
    stream_id: str | None = Field(default=None, index=True, unique=True, max_length=32)


class EmailToken(SQLModel, table=True):
    """A single-use email verification token; a newer one for the same user cancels older ones."""

    token_hash: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(foreign_key="user.id", index=True, max_length=32)
    email: str = Field(max_length=320)
    created_at: NaiveDatetime
    expires_at: NaiveDatetime
    used_at: NaiveDatetime | None = None
    cancelled_at: NaiveDatetime | None = None


class OutboxMessage(SQLModel, table=True):
    """A message to send (mail, SMS), written in the same transaction as the change it reports."""

    id: str = Field(primary_key=True, max_length=32)
    channel: str = Field(max_length=16)  # "email" | "sms"
    recipient: str = Field(max_length=320)
    template: str = Field(max_length=64)
    payload: str = Field(default="{}", max_length=8000)  # JSON rendered into the template
    status: str = Field(default="queued", index=True, max_length=16)
    attempts: int = Field(default=0)
    last_error: str | None = Field(default=None, max_length=1000)
    created_at: NaiveDatetime
    next_attempt_at: NaiveDatetime = Field(index=True)
    expires_at: NaiveDatetime
    sent_at: NaiveDatetime | None = None
    user_id: str | None = Field(default=None, index=True, max_length=32)


class Integration(SQLModel, table=True):
    """A Duo Auth API client (pam_duo, login_duo, duo_client, ...): a relying party that signs
    its requests with its secret key (docs/duo-compat.md)."""

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(index=True, unique=True, max_length=100)
    # The integration key: public, names the integration in every signed request.
    ikey: str = Field(index=True, unique=True, max_length=20)
    # The secret key sealed by app.server_keys.SecretBox (purpose "duo-skey", record the ikey):
    # signatures are checked with the key itself, so a hash would not do.
    skey_sealed: str = Field(max_length=200)
    # How its approvals match a number: "confirm" (on the phone only) or a match mode.
    match_mode: str = Field(max_length=16)
    # Appended to a Duo username without "@" to name the tapprove user (alice -> alice@DOMAIN).
    username_domain: str | None = Field(default=None, max_length=253)
    # Whether it may call enroll / enroll_status: a first device for users who never had one.
    allow_enroll: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    created_at: NaiveDatetime
    revoked_at: NaiveDatetime | None = None
