"""Configuration: one `Settings` object, read from `TAPPROVE_*` environment variables."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MatchMode = Literal["typed", "choices", "nist"]

DEFAULT_PUBLIC_URL = "http://127.0.0.1:8000"
# The public Web Push services, by their documented host suffixes: Google (Chrome, Edge on
# Android), Mozilla (Firefox), Apple (Safari, home-screen apps on iOS 16.4+), Microsoft (WNS).
DEFAULT_WEBPUSH_HOSTS = (
    "fcm.googleapis.com,push.services.mozilla.com,web.push.apple.com,notify.windows.com"
)
# Where `tapprove serve` writes the public URL it runs with, for CLI commands to read.
SERVER_RECORD = "server.json"
SQLITE_FILE = "tapprove.sqlite3"
# Hash tags (TAPPROVE_REDIS_SHARDS) on a Redis Cluster unless set: enough to spread users
# over a few masters, each tag's slot moving whole when slots are resharded.
CLUSTER_SHARDS = 16


class Settings(BaseSettings):
    """Every setting of PROTOCOL §6; all optional so `tapprove serve` runs with none."""

    model_config = SettingsConfigDict(env_prefix="TAPPROVE_", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str | None = None
    redis_url: str | None = None
    redis_prefix: str = "tapprove:"
    # How many hash tags a user's keys are spread over (app.store.redis.KeySpace); more than
    # one only matters on a Redis Cluster. Changing it orphans the approvals under way.
    redis_shards: int = Field(default=1, ge=1, le=256)
    # TAPPROVE_REDIS_URL names one node of a Redis Cluster (the client finds the others);
    # events then go over sharded pub/sub (app.store.events). Needs Redis 7.
    redis_cluster: bool = False
    # A pending approval and a decision are answered only once this many replicas hold
    # them (WAIT), up to redis_wait_ms; unset: 1 on a cluster, 0 (no WAIT) otherwise.
    redis_wait_replicas: int | None = Field(default=None, ge=0, le=16)
    redis_wait_ms: int = Field(default=500, ge=1, le=60_000)
    # Unset: derived from where `tapprove serve` listens (see listening_public_url), and read
    # by CLI commands from the data dir's server record (see with_recorded_public_url).
    public_url: str = DEFAULT_PUBLIC_URL
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
    # Web Push (app.delivery.webpush): the VAPID key pair's private key, PEM or base64url of
    # the raw 32-byte scalar; unset: generated once in the data dir (app.server_keys).
    vapid_private_key: str | None = None
    # The VAPID `sub` claim, a contact for the push services: mailto: or https:; unset:
    # mailto: TAPPROVE_MAIL_FROM.
    vapid_subject: str | None = None
    # Host suffixes a Web Push endpoint may have (comma-separated; an entry matches the host
    # itself and its subdomains). Nothing else is ever contacted (app.delivery.push_endpoints).
    webpush_allowed_hosts: str = DEFAULT_WEBPUSH_HOSTS
    # Tests only: loopback `IP:port` push services reachable over plain http. Refused unless
    # TAPPROVE_TEST_MODE is on, which is refused with an https public URL (a real deployment).
    webpush_test_endpoints: str | None = None
    test_mode: bool = False
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
    # Reverse proxies whose X-Forwarded-For / -Proto are believed (comma-separated IPs or
    # CIDRs); none by default, so a client cannot choose the IP that rate limits key on.
    trusted_proxies: str | None = None
    # Seconds a client may take to send a request's line and headers, then its body.
    request_head_timeout: float = Field(default=10.0, gt=0, le=300)
    request_body_timeout: float = Field(default=30.0, gt=0, le=600)
    # Passkeys (WebAuthn) may sign a person in on their own, replacing password and phone;
    # off: no passkey sign-in, and none can be added.
    passkey_login: bool = True
    # An account that has a passkey may still sign in with password and phone (push,
    # passcode, SMS code); off: such an account must use its passkey (or a recovery code).
    passkey_allows_push: bool = True

    @field_validator("public_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: str | None) -> str | None:
        for entry in _entries(value):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
        return value

    @field_validator("vapid_subject")
    @classmethod
    def _subject_is_a_contact(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("mailto:", "https://")):
            raise ValueError("must be a mailto: or https: URL")
        return value

    @field_validator("webpush_test_endpoints")
    @classmethod
    def _test_endpoints_are_loopback(cls, value: str | None) -> str | None:
        for entry in _entries(value):
            host, _, port = entry.rpartition(":")
            try:
                loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
            except ValueError:
                loopback = False
            if not loopback or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{entry!r} is not a loopback IP:port")
        return value

    @model_validator(mode="after")
    def _cluster_needs_a_node(self) -> Settings:
        """Cluster mode names a node to discover the cluster from; the embedded Redis is
        one server. Unless TAPPROVE_REDIS_SHARDS is given, a cluster gets CLUSTER_SHARDS
        hash tags, so the users spread over its masters."""
        if self.redis_cluster and not self.redis_url:
            raise ValueError("TAPPROVE_REDIS_CLUSTER needs TAPPROVE_REDIS_URL (any one node)")
        if self.redis_cluster and "redis_shards" not in self.model_fields_set:
            self.redis_shards = CLUSTER_SHARDS
        return self

    @property
    def wait_replicas(self) -> int:
        """Replicas that must hold a new approval or a decision before it is answered."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.redis_cluster else 0

    @model_validator(mode="after")
    def _test_endpoints_only_in_tests(self) -> Settings:
        """The plain-http loopback push services are for tests: the server refuses to start
        with them unless test mode is on, and refuses test mode on an https public URL."""
        if self.webpush_test_endpoints and not self.test_mode:
            raise ValueError(
                "TAPPROVE_WEBPUSH_TEST_ENDPOINTS is for tests only and needs TAPPROVE_TEST_MODE"
            )
        if self.test_mode and self.public_url.startswith("https://"):
            raise ValueError(
                "TAPPROVE_TEST_MODE is refused with an https TAPPROVE_PUBLIC_URL (a deployment)"
            )
        return self

    @property
    def webpush_hosts(self) -> tuple[str, ...]:
        """The allowed Web Push host suffixes, lower case, without a leading `*.` or dot."""
        return tuple(
            entry.lower().removeprefix("*").lstrip(".")
            for entry in _entries(self.webpush_allowed_hosts)
        )

    @property
    def webpush_contact(self) -> str:
        """The VAPID `sub` claim: TAPPROVE_VAPID_SUBJECT, else mailto: the mail sender."""
        return self.vapid_subject or f"mailto:{self.mail_from}"

    @property
    def proxies(self) -> list[str]:
        """The trusted reverse proxies, as IPs and CIDR networks (empty: trust none)."""
        return _entries(self.trusted_proxies)

    @property
    def public_url_is_set(self) -> bool:
        """Whether TAPPROVE_PUBLIC_URL was given (else the default or a derived one applies)."""
        return "public_url" in self.model_fields_set

    @property
    def embedded_database(self) -> Path | None:
        """The SQLite file of the embedded default, or None when TAPPROVE_DATABASE_URL is set."""
        if self.database_url:
            return None
        return (self.data_dir / SQLITE_FILE).resolve()

    @property
    def sqlalchemy_url(self) -> str:
        """The async SQLAlchemy URL: the configured one, or a SQLite file in the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.embedded_database}"

    @property
    def origins(self) -> frozenset[str]:
        """Browser origins allowed to open WebSockets and send cookie-authenticated writes."""
        if self.allowed_origins:
            given = self.allowed_origins.split(",")
            return frozenset(o.strip().rstrip("/") for o in given if o.strip())
        parts = urlsplit(self.public_url)
        return frozenset({f"{parts.scheme}://{parts.netloc}"})

    @property
    def webauthn_rp_id(self) -> str:
        """The WebAuthn relying party id: the public URL's host name."""
        return urlsplit(self.public_url).hostname or "localhost"

    @property
    def webauthn_origin(self) -> str:
        """The one origin passkey ceremonies must come from: the public URL's."""
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def secure_cookies(self) -> bool:
        """Cookies carry `Secure` when the public URL is https."""
        return self.public_url.startswith("https://")


def listening_public_url(host: str, port: int) -> tuple[str, str | None]:
    """The URL a browser on this machine reaches a server listening on `host`:`port` at, and
    a note for the start-up banner when that is not simply where it listens.

    Used when TAPPROVE_PUBLIC_URL is not set. For the default `127.0.0.1:8000` it is the
    contract's default public URL.
    """
    if host in ("0.0.0.0", ""):
        return f"http://127.0.0.1:{port}", (
            "listening on every interface; links use 127.0.0.1: set TAPPROVE_PUBLIC_URL "
            "to the address other machines use"
        )
    if host == "::":
        return f"http://[::1]:{port}", (
            "listening on every interface; links use [::1]: set TAPPROVE_PUBLIC_URL "
            "to the address other machines use"
        )
    if host == "localhost":
        return f"http://127.0.0.1:{port}", None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}", None
    return f"http://[{address}]:{port}" if address.version == 6 else f"http://{host}:{port}", None


def record_public_url(settings: Settings) -> None:
    """Write the public URL a starting server uses into its data dir (`server.json`)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    record = settings.data_dir / SERVER_RECORD
    tmp = record.with_name(f".{SERVER_RECORD}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"public_url": settings.public_url}) + "\n", encoding="utf-8")
    os.replace(tmp, record)  # readers never see half a file


def with_recorded_public_url(settings: Settings) -> Settings:
    """`settings` with the public URL the server in the same data dir recorded, unless
    TAPPROVE_PUBLIC_URL is set, so that CLI commands print the links that server serves."""
    if settings.public_url_is_set:
        return settings
    try:
        record = json.loads((settings.data_dir / SERVER_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return settings
    url = record.get("public_url") if isinstance(record, dict) else None
    if not isinstance(url, str):
        return settings
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return settings
    return settings.model_copy(update={"public_url": url.rstrip("/")})


def _entries(value: str | None) -> list[str]:
    """The non-empty items of a comma-separated setting."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]
