"""TAPPROVE_REDIS_CLUSTER: what it needs and what it changes, read from the environment as
`tapprove serve` reads it."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from app.settings import CLUSTER_SHARDS, Settings
from app.store.lua import publish_command


def settings_from(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name in [name for name in os.environ if name.startswith("TAPPROVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(f"TAPPROVE_{name}", value)
    return Settings()


def test_cluster_mode_needs_a_node_to_start_from(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="TAPPROVE_REDIS_URL"):
        settings_from(monkeypatch, REDIS_CLUSTER="true")


def test_a_cluster_spreads_users_over_shards_and_waits_for_a_replica(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = settings_from(monkeypatch, REDIS_CLUSTER="true", REDIS_URL="redis://10.0.0.5:7000/0")
    assert found.redis_shards == CLUSTER_SHARDS > 1
    assert found.wait_replicas == 1


def test_an_operator_may_choose_shards_and_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    found = settings_from(
        monkeypatch,
        REDIS_CLUSTER="true",
        REDIS_URL="redis://10.0.0.5:7000/0",
        REDIS_SHARDS="64",
        REDIS_WAIT_REPLICAS="0",
    )
    assert (found.redis_shards, found.wait_replicas) == (64, 0)


def test_one_redis_keeps_one_shard_and_no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    found = settings_from(monkeypatch, REDIS_URL="redis://127.0.0.1:6379/0")
    assert (found.redis_shards, found.wait_replicas, found.redis_cluster) == (1, 0, False)


def test_scripts_publish_sharded_only_on_a_cluster() -> None:
    assert publish_command(sharded=True) == "local PUBLISH = 'SPUBLISH'\n"
    assert publish_command(sharded=False) == "local PUBLISH = 'PUBLISH'\n"
