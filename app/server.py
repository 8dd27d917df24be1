"""Running the web server (`tapprove serve`) with uvicorn, tuned for many idle sockets."""

from __future__ import annotations

import os

import uvicorn
from starlette.applications import Starlette

from app.logs import configure_logging
from app.settings import Settings

_WITH_WORKER_ENV = "TAPPROVE__RUN_WORKER"


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
    os.environ[_WITH_WORKER_ENV] = "1" if with_worker else "0"
    configure_logging(settings)
    uvicorn.run(
        "app.server:app_factory",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        ws_max_size=64 * 1024,
        ws_ping_interval=20.0,
        ws_ping_timeout=40.0,  # with the 20 s interval: a socket silent for ~60 s is dropped
        ws_per_message_deflate=False,  # deflate costs ~40 KiB per idle socket
        proxy_headers=True,
        # HTTPS straight from uvicorn (Duo clients speak nothing else); None: plain HTTP.
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        timeout_graceful_shutdown=10,
        log_config=None,
        access_log=False,
    )
