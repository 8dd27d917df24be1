"""Configuration: one `Settings` object, read from `TAPPROVE_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MatchMode = Literal["typed", "choices", "nist"]


class Settings(BaseSettings):
    """Every setting of PROTOCOL §6; all optional so `tapprove serve` runs with none."""

    model_config = SettingsConfigDict(env_prefix="TAPPROVE_", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str | None = None
    redis_url: str | None = None
    redis_prefix: str = "tapprove:"
    public_url: str = "http://127.0.0.1:8000"
    allowed_origins: str | None = None
    approval_ttl: int = Field(default=120, ge=5, le=3600)
    match_mode: MatchMode = "typed"
    email_token_ttl: int = Field(default=86400, ge=60)
    smtp_url: str | None = None
    mail_from: str = "tapprove@localhost"
    # Seconds a worker may hold an outbox message before another takes it over.
    outbox_lease: float = Field(default=60.0, ge=1.0, le=3600.0)
    fcm_credentials: Path | None = None
    fcm_project_id: str | None = None
    fcm_endpoint: str = "https://fcm.googleapis.com/v1/projects"
    apns_key_file: Path | None = None
    apns_key_id: str | None = None
    apns_team_id: str | None = None
    apns_topic: str | None = None
    apns_endpoint: str = "https://api.push.apple.com:443"
    apns_ca_file: Path | None = None
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    twilio_from: str | None = None
    twilio_endpoint: str = "https://api.twilio.com"
    # 32 bytes, base64url: seals secrets kept at rest (app.server_keys). Unset: generated once
    # in the data dir, which every serve and worker process must then share.
    secret_key: str | None = None
    # `tapprove serve` speaks HTTPS itself with this certificate chain and key (PEM); Duo
    # clients speak HTTPS only. Unset: plain HTTP (behind a TLS proxy).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_format: Literal["json", "console"] | None = None
    # `tapprove worker` serves its Prometheus metrics on this port (web processes: /metrics).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)

    @field_validator("public_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @property
    def sqlalchemy_url(self) -> str:
        """The async SQLAlchemy URL: the configured one, or a SQLite file in the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'tapprove.sqlite3').resolve()}"

    @property
    def origins(self) -> frozenset[str]:
        """Browser origins allowed to open WebSockets and send cookie-authenticated writes."""
        if self.allowed_origins:
            given = self.allowed_origins.split(",")
            return frozenset(o.strip().rstrip("/") for o in given if o.strip())
        parts = urlsplit(self.public_url)
        return frozenset({f"{parts.scheme}://{parts.netloc}"})

    @property
    def secure_cookies(self) -> bool:
        """Cookies carry `Secure` when the public URL is https."""
        return self.public_url.startswith("https://")
