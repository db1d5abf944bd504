"""A partition's slot moved from one primary to another while workers
refresh it, key by key, the way ``valkey-cli --cluster reshard`` does
(SETSLOT IMPORTING / MIGRATING, MIGRATE in steps, SETSLOT NODE on every
primary): clients meet ASK while the slot is split and MOVED after it.

What must hold: no refresh token sent twice, nothing lost, every key of the
partition on its new owner, and every credential refreshed afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import pytest

from tests.cluster_load import (
    Workers,
    grants_refreshed,
    nothing_lost,
    refresh_counts,
    wait_refreshed,
)
from tests.harness import make_settings, seed, wait_for
from tests.redis_cluster import RedisCluster, key_slot
from worker.app import open_store
from worker.fakeprovider import FakeProvider, FakeProviderConfig
from worker.keys import Keyspace

pytestmark = pytest.mark.anyio


def _count_in_slot(cluster: RedisCluster, slot: int) -> dict[int, int]:
    """Keys of ``slot`` per primary (node index), as each one holds them."""
    out = {}
    for node in cluster.primaries():
        with node.client() as c:
            out[node.index] = int(c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))
    return out


async def _migrate_under_load(
    cluster: RedisCluster, *, credentials: int, keys_per_step: int, pause_s: float, after: int
) -> dict[str, int]:
    settings = make_settings(cluster.url)
    keys = Keyspace(settings.prefix, settings.partitions)
    config = FakeProviderConfig(lifetime_s=4, rotate=True, revoke_on_reuse=True, latency_s=0.02)
    async with FakeProvider(config) as provider, open_store(settings) as store:
        grants = await seed(store, provider, credentials)
        # the partition with the most credentials, and a primary it is not on
        sizes = {p.index: 0 for p in keys.all_partitions()}
        for cid in grants:
            sizes[keys.partition_of(cid).index] += 1
        partition = keys.partition(max(sizes, key=sizes.__getitem__))
        moved_ids = {cid: g for cid, g in grants.items()
                     if keys.partition_of(cid) == partition}  # fmt: skip
        slot = key_slot(partition.due)
        source = cluster.owner_of(slot)
        target = next(n for n in cluster.primaries() if n is not source)
        assert _count_in_slot(cluster, slot)[source.index] > 0
        steps = 0

        def between() -> None:
            nonlocal steps
            steps += 1
            time.sleep(pause_s)  # workers meet the slot half moved (ASK)

        migrate: Callable[[], int] = lambda: cluster.migrate_slot(  # noqa: E731
            slot, target, keys_per_step=keys_per_step, between=between
        )
        async with Workers.running(cluster.url, 2):
            await wait_for(lambda: grants_refreshed(provider, grants, {}, 1), within=30,
                           what="every credential refreshed once")  # fmt: skip
            mid = refresh_counts(provider, grants)
            started = time.monotonic()
            moved = await anyio.to_thread.run_sync(migrate)
            migrate_s = time.monotonic() - started
            during = sum(refresh_counts(provider, moved_ids).values()) - sum(
                mid[cid] for cid in moved_ids
            )
            done = refresh_counts(provider, grants)
            await wait_refreshed(
                store, provider, grants, done, after, within=max(40, credentials / 50)
            )
        await nothing_lost(store, provider, grants)
        assert cluster.owner_of(slot) is target
        assert _count_in_slot(cluster, slot)[source.index] == 0
        with target.client() as c:  # every key of the partition, on the new owner itself
            assert c.exists(*(partition.cred(cid) for cid in moved_ids)) == len(moved_ids)
            assert c.exists(partition.due) == 1
        counts = {
            "credentials": credentials,
            "in_partition": len(moved_ids),
            "keys_moved": moved,
            "steps": steps,
            "migrate_ms": round(migrate_s * 1000),
            "partition_refreshes_during": during,
            "reuse": len(provider.stats.reuse_events),
        }
    print("slot migration:", counts)
    return counts


async def test_a_slot_moved_mid_run_loses_nothing(fresh_cluster: RedisCluster) -> None:
    counts = await _migrate_under_load(
        fresh_cluster, credentials=400, keys_per_step=5, pause_s=0.2, after=2
    )
    assert counts["reuse"] == 0
    assert counts["steps"] >= 3  # the slot really was split for a while


@pytest.mark.slow
async def test_a_slot_moved_key_by_key_under_heavier_load(fresh_cluster: RedisCluster) -> None:
    counts = await _migrate_under_load(
        fresh_cluster, credentials=4000, keys_per_step=1, pause_s=0.05, after=3
    )
    assert counts["reuse"] == 0
    assert counts["steps"] >= 20
