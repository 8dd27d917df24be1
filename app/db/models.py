"""SQLModel tables. Times are naive UTC datetimes; secrets are stored only as SHA-256 hashes."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel


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
    locked_at: datetime | None = None
    created_at: datetime
    verified_at: datetime | None = None


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
    created_at: datetime
    last_seen_at: datetime | None = None
    revoked_at: datetime | None = None


class EnrollmentCode(SQLModel, table=True):
    """A single-use code that lets one new device join a user's account."""

    code_hash: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(foreign_key="user.id", index=True, max_length=32)
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None = None


class ApiKey(SQLModel, table=True):
    """A relying party's server-to-server credential."""

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(index=True, unique=True, max_length=100)
    key_hash: str = Field(index=True, unique=True, max_length=64)
    created_at: datetime
    revoked_at: datetime | None = None


class TrustedBrowser(SQLModel, table=True):
    """A remembered browser that skips approval for 30 days, revocable by its owner."""

    id: str = Field(primary_key=True, max_length=32)
    user_id: str = Field(foreign_key="user.id", index=True, max_length=32)
    token_hash: str = Field(index=True, unique=True, max_length=64)
    user_agent: str = Field(default="", max_length=512)
    browser: str = Field(default="", max_length=100)
    os: str = Field(default="", max_length=100)
    ip: str = Field(default="", max_length=64)
    created_at: datetime
    last_used_at: datetime | None = None
    expires_at: datetime
    revoked_at: datetime | None = None


class AuditEvent(SQLModel, table=True):
    """One line of the audit log: who, what, when, from where."""

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(index=True)
    user_id: str | None = Field(default=None, index=True, max_length=32)
    kind: str = Field(max_length=64)
    ip: str | None = Field(default=None, max_length=64)
    device_id: str | None = Field(default=None, max_length=32)
    approval_id: str | None = Field(default=None, max_length=32)
    detail: str = Field(default="{}", max_length=4000)


class EmailToken(SQLModel, table=True):
    """A single-use email verification token; a newer one for the same user cancels older ones."""

    token_hash: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(foreign_key="user.id", index=True, max_length=32)
    email: str = Field(max_length=320)
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None = None
    cancelled_at: datetime | None = None


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
    created_at: datetime
    next_attempt_at: datetime = Field(index=True)
    expires_at: datetime
    sent_at: datetime | None = None
    user_id: str | None = Field(default=None, index=True, max_length=32)
