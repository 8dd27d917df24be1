"""Broker consumers: the outbox, delivery jobs (push retries, ack time-outs), expiry and the
audit writer.

`tapprove worker` runs these alone; `tapprove serve` runs them in-process unless
`--no-worker`. Any number may run side by side: each consumer claims work atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable

from app.approval.waiting import run_expiry_sweeper
from app.audit_trail import run_audit_writer
from app.delivery.dispatch import run_delivery_jobs
from app.delivery.outbox import run_outbox
from app.logs import configure_logging
from app.metrics import serve_metrics
from app.services import Services, build_services
from app.settings import Settings
from app.verification import run_user_events

log = logging.getLogger(__name__)

Consumer = Callable[[Services, asyncio.Event], Awaitable[None]]


def consumers() -> list[Consumer]:
    """The consumers one worker runs, each until `stop` is set."""
    return [run_outbox, run_user_events, run_delivery_jobs, run_expiry_sweeper, run_audit_writer]


async def run_worker(services: Services, stop: asyncio.Event) -> None:
    """Run every consumer until `stop`; a crashing consumer is restarted, not fatal."""

    async def supervised(consumer: Consumer) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                await consumer(services, stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("consumer %s crashed; restarting", consumer.__name__)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                delay = min(delay * 2, 10.0)

    await asyncio.gather(*(supervised(c) for c in consumers()))


def run_worker_forever(settings: Settings) -> None:
    """Entry point of `tapprove worker`: run consumers until SIGTERM or SIGINT."""
    configure_logging(settings)
    if settings.metrics_port:
        serve_metrics(settings.metrics_port)
        log.info("metrics on port %d", settings.metrics_port)

    async def main() -> None:
        services = await build_services(settings)
        await services.events.start()
        # As in `serve` (app.main.create_app): the start-up objects stay out of the
        # collector's full passes.
        gc.collect()
        gc.freeze()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("worker started")
        try:
            await run_worker(services, stop)
        finally:
            await services.close()
            log.info("worker stopped")

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main())
