"""Running the web server (`tapprove serve`) with uvicorn, tuned for many idle sockets."""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import uvicorn
from starlette.applications import Starlette

from app.logs import configure_logging
from app.server_keys import VAPID_KEY_FILE
from app.settings import Settings, listening_public_url, record_public_url
from app.web.connection import RequestTimeouts, http_protocol

_WITH_WORKER_ENV = "TAPPROVE__RUN_WORKER"

log = logging.getLogger("tapprove.server")


def app_factory() -> Starlette:
    """Build the app in each uvicorn worker process from the environment."""
    from app.main import create_app

    settings = Settings()
    configure_logging(settings)
    return create_app(
        settings,
        run_worker=os.environ.get(_WITH_WORKER_ENV) == "1",
        freeze_startup_objects=True,
    )


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for serving tapprove (tests start their servers with these too)."""
    timeouts = RequestTimeouts(settings.request_head_timeout, settings.request_body_timeout)
    return {
        "http": http_protocol(timeouts),
        "ws": "websockets-sansio",
        "ws_max_size": 64 * 1024,
        "ws_ping_interval": 20.0,
        # With the 20 s interval: a socket silent for ~60 s is dropped.
        "ws_ping_timeout": 40.0,
        "ws_per_message_deflate": False,  # deflate costs ~40 KiB per idle socket
        # X-Forwarded-For / -Proto only from the configured proxies; without any, uvicorn
        # would believe them from 127.0.0.1, i.e. from anyone on this host.
        "proxy_headers": bool(settings.proxies),
        "forwarded_allow_ips": settings.proxies,
        # HTTPS straight from uvicorn (Duo clients speak nothing else); None: plain HTTP.
        "ssl_certfile": str(settings.tls_cert) if settings.tls_cert else None,
        "ssl_keyfile": str(settings.tls_key) if settings.tls_key else None,
        "timeout_graceful_shutdown": 10,
        "log_config": None,
        "access_log": False,
    }


def run_server(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    with_worker: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT; uvicorn closes phone sockets with 1012 on shutdown."""
    if workers > 1 and not (settings.redis_url and settings.database_url):
        raise SystemExit(
            "--workers > 1 needs TAPPROVE_REDIS_URL and TAPPROVE_DATABASE_URL "
            "(the embedded default is a single process)"
        )
    settings, origin = served_public_url(settings, host, port)
    os.environ[_WITH_WORKER_ENV] = "1" if with_worker else "0"
    # The app is built from the environment (app_factory, in every uvicorn process).
    os.environ["TAPPROVE_PUBLIC_URL"] = settings.public_url
    configure_logging(settings)
    try:
        record_public_url(settings)
    except OSError as exc:
        log.warning(
            "cannot record the public URL in %s (%s): CLI commands that print links need "
            "TAPPROVE_PUBLIC_URL",
            settings.data_dir,
            exc.strerror or exc,
        )
    log.info(startup_banner(settings, origin))
    uvicorn.run(
        "app.server:app_factory",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        **server_options(settings),
    )


def served_public_url(settings: Settings, host: str, port: int) -> tuple[Settings, str]:
    """`settings` with the public URL this server runs with, and where that URL comes from.

    Without TAPPROVE_PUBLIC_URL it is derived from where the server listens, so that links,
    QR codes and the browser origin check match the address people open.
    """
    if settings.public_url_is_set:
        return settings, "TAPPROVE_PUBLIC_URL"
    if port == 0:
        return settings, "default: --port 0 picks a free port, so set TAPPROVE_PUBLIC_URL"
    url, note = listening_public_url(host, port)
    if settings.tls_cert is not None:
        url = "https" + url.removeprefix("http")
    origin = f"from --host {host} --port {port}; TAPPROVE_PUBLIC_URL is not set"
    return settings.model_copy(update={"public_url": url}), origin + (f"; {note}" if note else "")


def without_password(url: str) -> str:
    """`url` with its password, if any, replaced by `***` (for logs and banners)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def startup_banner(settings: Settings, public_url_origin: str) -> str:
    """What `tapprove serve` runs with, in one block: where to open it and what it uses."""
    from app.delivery.sms import TwilioSms

    data_dir = settings.data_dir.resolve()
    database = (
        without_password(settings.database_url)
        if settings.database_url
        else f"SQLite {settings.embedded_database}"
    )
    redis = (
        without_password(settings.redis_url)
        if settings.redis_url
        else f"embedded redis-server, files in {data_dir}"
    )
    if settings.smtp_url:
        smtp = urlsplit(settings.smtp_url)
        mail = f"SMTP {smtp.hostname}" + (f":{smtp.port}" if smtp.port else "")
    else:
        mail = "log (TAPPROVE_SMTP_URL is not set: mail, links included, goes to this log)"
    sms = (
        "Twilio"
        if TwilioSms.configured(settings)
        else "log (TAPPROVE_TWILIO_* is not set: SMS codes go to this log)"
    )
    web_push = "to " + (
        ", ".join(settings.webpush_hosts) or "nowhere (TAPPROVE_WEBPUSH_ALLOWED_HOSTS is empty)"
    )
    web_push += (
        "; VAPID key from TAPPROVE_VAPID_PRIVATE_KEY"
        if settings.vapid_private_key
        else f"; VAPID key {data_dir / VAPID_KEY_FILE}"
    )
    if not settings.secure_cookies:
        web_push += "; phones get it only from an https public URL"
    if settings.test_mode:
        web_push += f"; TEST MODE, also http to {settings.webpush_test_endpoints or 'none'}"
    rows = [
        ("public URL", f"{settings.public_url}  ({public_url_origin})"),
        ("data dir", str(data_dir)),
        ("database", database),
        ("Redis", redis),
        ("mail", mail),
        ("SMS", sms),
        ("TLS", f"HTTPS with {settings.tls_cert}" if settings.tls_cert else "off (plain HTTP)"),
        ("Web Push", web_push),
        (
            "proxies",
            ", ".join(settings.proxies)
            or "none trusted (X-Forwarded-For is ignored; see TAPPROVE_TRUSTED_PROXIES)",
        ),
    ]
    return "tapprove serve\n" + "\n".join(f"  {name:<11} {value}" for name, value in rows)
