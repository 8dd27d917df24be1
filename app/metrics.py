"""Prometheus metrics: one registry per process.

Every web process serves its own at `GET /metrics`; `tapprove worker` serves its own on
`TAPPROVE_METRICS_PORT` when set. Prometheus scrapes each process as its own target and
sums across them (`sum by (outcome) (rate(tapprove_approvals_total[5m]))`). An approval's end
is counted once, by the process whose atomic step ended it (app.approval.store).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# The `_created` series double every counter for no use here.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)

APPROVALS = Counter(
    "tapprove_approvals_total", "Approvals by how they ended", ["outcome"], registry=REGISTRY
)
APPROVALS_CREATED = Counter(
    "tapprove_approvals_started_total", "Approvals started", ["kind"], registry=REGISTRY
)
DECISION_LATENCY = Histogram(
    "tapprove_decision_seconds",
    "Time from creation to decision",
    registry=REGISTRY,
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)
DELIVERY_ATTEMPTS = Counter(
    "tapprove_delivery_attempts_total",
    "Delivery attempts by channel and outcome",
    ["channel", "outcome"],
    registry=REGISTRY,
)
DELIVERY_LATENCY = Histogram(
    "tapprove_delivery_seconds",
    "Provider call latency by channel",
    ["channel"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
OPEN_SOCKETS = Gauge(
    "tapprove_open_sockets", "Open WebSockets by kind", ["kind"], registry=REGISTRY
)
UNREPLICATED = Counter(
    "tapprove_redis_unreplicated_total",
    "Approvals created or decided that no replica acknowledged within TAPPROVE_REDIS_WAIT_MS",
    ["step"],
    registry=REGISTRY,
)
LOGINS = Counter("tapprove_logins_total", "Login results", ["result"], registry=REGISTRY)
RATE_LIMITED = Counter(
    "tapprove_rate_limited_total", "Calls refused by a rate limit", ["what"], registry=REGISTRY
)
OUTBOX_DEPTH = Gauge(
    "tapprove_outbox_messages",
    "Outbox messages by status (queued, processing, dead), read from the database",
    ["status"],
    registry=REGISTRY,
)
OUTBOX_SENDS = Counter(
    "tapprove_outbox_attempts_total",
    "Outbox send attempts by outcome",
    ["channel", "outcome"],
    registry=REGISTRY,
)


def approval_ended(outcome: str, seconds: float) -> None:
    """Count one approval's end; approvals and denials also record how long the person took."""
    APPROVALS.labels(outcome).inc()
    if outcome != "expired":
        DECISION_LATENCY.observe(max(0.0, seconds))


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve this process's metrics over HTTP from a daemon thread (for `tapprove worker`)."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=REGISTRY)
