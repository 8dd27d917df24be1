"""Operations endpoints: liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy import func, text
from sqlmodel import col, select
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from app import metrics
from app.db.models import OutboxMessage
from app.services import Services
from app.store.redis import cluster_health
from app.web.common import services
from app.web.contract import PROMETHEUS, Answer, Done, Reply, answer, answers, omitted_if_none
from app.web.errors import FastJSON
from app.web.openapi import document

log = logging.getLogger(__name__)

# Outbox statuses worth a gauge: work waiting or in flight, and messages given up on.
# (`sent` only grows; its rate is tapprove_outbox_attempts_total{outcome="sent"}.)
OUTBOX_GAUGED = ("queued", "processing", "dead")

_TEXT = {"type": "string"}


class ClusterHealth(Answer):
    """A Redis Cluster as this process sees it (present only in cluster mode)."""

    state: Literal["ok", "fail", "unreachable"]
    masters: int
    unreachable: list[str]


_CLUSTER_NOTE = "On a Redis Cluster: its state, the masters that answer and those that do not"


class Ready(Answer):
    status: Literal["ready"]
    redis_cluster: ClusterHealth | SkipJsonSchema[None] = omitted_if_none(_CLUSTER_NOTE)


class NotReady(Answer):
    error: Literal["unavailable"]
    message: str
    failing: list[Literal["redis", "database"]]
    redis_cluster: ClusterHealth | SkipJsonSchema[None] = omitted_if_none(_CLUSTER_NOTE)


@answers(
    {200: Reply("The process is alive (Redis and the database are not asked)", Done)},
    store=False,
)
async def healthz(request: Request) -> Response:
    """GET /healthz: the process is alive (never touches Redis or the database)."""
    return answer(Done(status="ok"))


@answers(
    {
        200: Reply("Redis and the database answer", Ready),
        503: Reply("Not ready; `failing` names the unreachable dependency", NotReady),
    },
    store=False,
)
async def readyz(request: Request) -> Response:
    """GET /readyz: 200 when Redis and the database answer, else 503 naming the failing one.

    On a Redis Cluster, Redis answers when any master does (a master down stops only the
    users of its slots, who get 503 with Retry-After); the body reports the cluster: its
    state, the masters that answer and those that do not.
    """
    svc = services(request)
    failing: list[Literal["redis", "database"]] = []
    cluster: ClusterHealth | None = None
    if svc.redis_handle.cluster is not None:
        cluster = ClusterHealth(**await cluster_health(svc.redis_handle.cluster))
        if not cluster.masters:
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
    if failing:
        message = f"not ready: {', '.join(failing)} unreachable"
        not_ready = NotReady(
            error="unavailable", message=message, failing=failing, redis_cluster=cluster
        )
        return answer(not_ready, 503)
    return answer(Ready(status="ready", redis_cluster=cluster))


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


@answers(
    {200: Reply("Prometheus text exposition of this process", schema=_TEXT, media=PROMETHEUS)},
    store=False,
)
async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: Prometheus text for this process (each process serves its own)."""
    await _measure_outbox(services(request))
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@answers({200: Reply("This document", schema={"type": "object"})}, store=False)
async def openapi(request: Request) -> Response:
    """GET /openapi.json: the OpenAPI 3.1 description of every HTTP call."""
    state = request.app.state
    doc: dict[str, Any] | None = getattr(state, "openapi", None)
    if doc is None:  # built once per app, from its own route table
        doc = state.openapi = document(state.settings.public_url, request.app.routes)
    return FastJSON(doc)  # a document, not a typed answer


routes: list[BaseRoute] = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics_endpoint, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
