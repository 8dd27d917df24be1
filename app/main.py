"""Assemble the ASGI application from explicit parts: `create_app(settings)`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from app.core.clock import Clock
from app.delivery.push import Providers
from app.duo.routes import DuoFace
from app.services import Services, build_services
from app.settings import Settings
from app.web import (
    account,
    browser,
    devices,
    ops,
    pages,
    passkeys,
    registration,
    relying_party,
)
from app.web.device_socket import DeviceSocketShortcut
from app.web.errors import EXCEPTION_HANDLERS, BodyLimit
from app.web.requestlog import RequestLog
from app.web.security import SecurityHeaders
from app.worker import run_worker as run_consumers


def all_routes() -> list[BaseRoute]:
    """Every HTTP and WebSocket route, in one list (the OpenAPI test walks it).

    Starlette tries routes in order, so the ones every approval flow calls come first.
    """
    return [
        *relying_party.routes,
        *DuoFace().routes(),  # the Duo Auth API, another face of the relying-party API
        *devices.routes,
        *browser.routes,
        *passkeys.routes,
        *account.routes,
        *registration.routes,
        *ops.routes,
        *pages.routes,
    ]


# Python's defaults are (700, 10, 10): a generation-1 collection every 7,000 allocations
# moved the objects of the flows in progress to the old generation, and full collections
# followed every few seconds under load, each walking every idle socket's objects (50-230 ms
# at 4,000 sockets, bench/RESULTS.md). Every 10,000 and 200,000 allocations, a flow's
# objects are mostly gone before a collection sees them.
YOUNG_GC_THRESHOLDS = (10_000, 20, 10)


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock | None = None,
    providers: Providers | None = None,
    run_worker: bool = False,
    freeze_startup_objects: bool = False,
) -> Starlette:
    """Build the app; connections are opened in the lifespan, not at import or build time.

    `freeze_startup_objects` (a server process's own app, app.server) moves everything
    alive after start-up out of the garbage collector's sight: a full collection of those
    ~150,000 objects stalled the event loop for 30-45 ms, which showed in tail latency. It
    also collects the young generations less often (YOUNG_GC_THRESHOLDS), so that the
    objects of flows in progress rarely reach the old generation and trigger full
    collections, whose cost grows with every idle phone socket the process holds.
    """
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        services = await build_services(settings, clock=clock, providers=providers)
        app.state.services = services
        if freeze_startup_objects:
            gc.collect()
            gc.freeze()
            gc.set_threshold(*YOUNG_GC_THRESHOLDS)
        await services.events.start()
        await services.presence.start()
        worker_task: asyncio.Task[None] | None = None
        stop = asyncio.Event()
        if run_worker:
            worker_task = asyncio.create_task(run_consumers(services, stop), name="worker")
        try:
            yield
        finally:
            stop.set()
            if worker_task is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(worker_task, timeout=10)
            await services.close()

    app = Starlette(
        routes=all_routes(),
        middleware=[
            Middleware(DeviceSocketShortcut),  # phone sockets skip the layers below
            Middleware(RequestLog),  # it logs every answer, 413s included
            Middleware(BodyLimit),
            Middleware(SecurityHeaders, settings=settings),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    return app


def services_of(app: Starlette) -> Services:
    """The Services of a running app."""
    services: Services = app.state.services
    return services
