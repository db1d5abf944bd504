"""The test cluster itself: the cluster tests rely on these behaviours."""

from __future__ import annotations

import pytest
import redis

from tests.redis_cluster import SLOTS, RedisCluster, key_slot


def test_three_primaries_with_a_synced_replica_each(
    redis_cluster: RedisCluster, cluster_url: str
) -> None:
    primaries, replicas = redis_cluster.primaries(), redis_cluster.replicas()
    assert len(primaries) == 3
    assert len(replicas) == 3
    assert {r.index for p in primaries for r in redis_cluster.replica_of(p)} == {
        r.index for r in replicas
    }
    assert cluster_url == redis_cluster.url
    assert cluster_url.startswith("redis+cluster://127.0.0.1:")
    assert cluster_url.count(",") == 5
    owners = redis_cluster.slot_owners()
    assert sorted(owners) == [0, 5461, 10922]
    assert redis_cluster.owner_of(SLOTS - 1) is primaries[-1]
    for node in redis_cluster.nodes:
        assert node.cluster_info()["cluster_state"] == "ok"
        with node.client() as client:
            config = client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "always"
        assert config["maxmemory-policy"] == "noeviction"
        assert config["cluster-enabled"] == "yes"


def test_key_slot_matches_the_server(redis_cluster: RedisCluster, cluster_url: str) -> None:
    with redis_cluster.nodes[0].client() as client:
        for key in ("plain", "{refreshd:3}:due", "a{b}c", "{}x", "{x", "é{tag}"):
            assert key_slot(key) == client.execute_command("CLUSTER", "KEYSLOT", key), key


def test_writes_reach_every_primary_and_flush_empties_them(
    redis_cluster: RedisCluster, cluster_url: str
) -> None:
    with redis_cluster.client() as client:
        for i in range(30):
            client.set(f"k{i}", i)
        owners = {redis_cluster.owner_of(key_slot(f"k{i}")).index for i in range(30)}
        assert len(owners) == 3
    redis_cluster.flush()
    for node in redis_cluster.primaries():
        with node.client() as client:
            assert client.dbsize() == 0


def test_failover_restart_and_slot_migration(fresh_cluster: RedisCluster) -> None:
    cluster = fresh_cluster
    key = "{failover}k"
    slot = key_slot(key)
    with cluster.client() as client:
        client.set(key, "v")
        client.wait(1, 1000)
    primary = cluster.owner_of(slot)
    [replica] = cluster.replica_of(primary)

    promoted = cluster.fail_primary(primary)

    assert promoted is replica
    assert cluster.owner_of(slot) is replica
    assert not primary.running
    with replica.client() as client:
        assert client.get(key) == "v"
    cluster.restart(primary)
    cluster.wait_healthy()
    assert primary.role() == "slave"
    assert cluster.replica_of(replica) == [primary]

    target = next(n for n in cluster.primaries() if n is not replica)
    steps: list[int] = []
    moved = cluster.migrate_slot(slot, target, between=lambda: steps.append(1))
    assert moved == 1
    assert steps
    assert cluster.owner_of(slot) is target
    with target.client() as client:
        assert client.get(key) == "v"
    with replica.client() as client, pytest.raises(redis.exceptions.MovedError) as moved_to:
        client.get(key)
    assert str(moved_to.value) == f"{slot} {target.address}"
