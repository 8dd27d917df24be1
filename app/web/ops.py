"""Operations endpoints: liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, text
from sqlmodel import col, select
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from app import metrics
from app.db.models import OutboxMessage
from app.services import Services
from app.store.redis import cluster_health
from app.web.common import json, services
from app.web.openapi import document

log = logging.getLogger(__name__)

# Outbox statuses worth a gauge: work waiting or in flight, and messages given up on.
# (`sent` only grows; its rate is tapprove_outbox_attempts_total{outcome="sent"}.)
OUTBOX_GAUGED = ("queued", "processing", "dead")


async def healthz(request: Request) -> Response:
    """GET /healthz: the process is alive (never touches Redis or the database)."""
    return json({"status": "ok"})


async def readyz(request: Request) -> Response:
    """GET /readyz: 200 when Redis and the database answer, else 503 naming the failing one.

    On a Redis Cluster, Redis answers when any master does (a master down stops only the
    users of its slots, who get 503 with Retry-After); the body reports the cluster: its
    state, the masters that answer and those that do not.
    """
    svc = services(request)
    failing: list[str] = []
    cluster: dict[str, Any] | None = None
    if svc.redis_handle.cluster is not None:
        cluster = await cluster_health(svc.redis_handle.cluster)
        if not cluster["masters"]:
            failing.append("redis")
    else:
        try:
            await asyncio.wait_for(svc.redis.ping(), timeout=2)
        except Exception:
            failing.append("redis")
    try:
        async with svc.engine.connect() as conn:
            await asyncio.wait_for(conn.execute(text("SELECT 1")), timeout=2)
    except Exception:
        failing.append("database")
    extra = {"redis_cluster": cluster} if cluster is not None else {}
    if failing:
        return json(
            {
                "error": "unavailable",
                "message": f"not ready: {', '.join(failing)} unreachable",
                "failing": failing,
                **extra,
            },
            status=503,
        )
    return json({"status": "ready", **extra})


async def _measure_outbox(svc: Services) -> None:
    """Read the outbox depth now, so every scrape sees the database as it is."""
    row = OutboxMessage
    try:
        async with svc.db() as db:
            counts = await asyncio.wait_for(
                db.exec(
                    select(row.status, func.count())
                    .where(col(row.status).in_(OUTBOX_GAUGED))
                    .group_by(row.status)
                ),
                timeout=2,
            )
            found = dict(counts.all())
    except Exception as exc:  # a scrape must not fail because the database is down
        log.warning("outbox depth unavailable: %s", type(exc).__name__)
        return
    for status in OUTBOX_GAUGED:
        metrics.OUTBOX_DEPTH.labels(status).set(found.get(status, 0))


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: Prometheus text for this process (each process serves its own)."""
    await _measure_outbox(services(request))
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    """GET /openapi.json: the OpenAPI 3.1 description of every HTTP call."""
    state = request.app.state
    doc: dict[str, Any] | None = getattr(state, "openapi", None)
    if doc is None:  # built once per app, from its own route table
        doc = state.openapi = document(state.settings.public_url, request.app.routes)
    return json(doc)


routes: list[BaseRoute] = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics_endpoint, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
