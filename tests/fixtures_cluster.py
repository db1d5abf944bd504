"""Cluster fixtures: one shared 3-primary + 3-replica cluster for ordinary
tests, a private one for tests that kill nodes or move slots."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_cluster import RedisCluster

__all__ = ["cluster_url", "fresh_cluster", "redis_cluster"]


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """Shared by the whole session (assembling one takes seconds). Tests may
    write to it but must not kill nodes or move slots: use ``fresh_cluster``."""
    with RedisCluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster: RedisCluster) -> str:
    """Each test starts from empty keyspaces and script caches on every
    node; a node a failed test left dead is restarted first, so one failure
    does not cascade."""
    if not all(node.running for node in redis_cluster.nodes):
        redis_cluster.revive()
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A private cluster, assembled and healthy, that the test may break
    (SIGKILL, restart, failover, slot migration); always stopped at teardown."""
    with RedisCluster(tmp_path / "cluster") as cluster:
        yield cluster
