"""Prometheus metrics: one registry per process, exposed at /metrics."""

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
LOGINS = Counter("tapprove_logins_total", "Login results", ["result"], registry=REGISTRY)
RATE_LIMITED = Counter(
    "tapprove_rate_limited_total", "Calls refused by a rate limit", ["what"], registry=REGISTRY
)
OUTBOX_DEPTH = Gauge(
    "tapprove_outbox_messages", "Outbox messages by status", ["status"], registry=REGISTRY
)
OUTBOX_SENDS = Counter(
    "tapprove_outbox_attempts_total",
    "Outbox send attempts by outcome",
    ["channel", "outcome"],
    registry=REGISTRY,
)
