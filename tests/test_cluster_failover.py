"""A cluster primary SIGKILLed under load: its replica takes over, the
workers carry on, no refresh token is sent twice, and every spend the
cluster acknowledged is on the replica that took over.

Redis Cluster replicates asynchronously, so the primary's own "OK" can be
lost in a failover; refreshd counts a spend only once the owning node's
``WAIT 1`` says its replica has it. The test makes the difference visible:
the replica is frozen for a moment first (as a long fork or a network
stall would), so every spend made meanwhile is on the primary alone. A
worker that sent its refresh token on the primary's word would leave the
promoted replica without the intent, and the next claim would send the
same token again; refreshd sends nothing until the replica has it.

Two primaries die, one after the other. After the first failover its new
primary has no replica (until the old one rejoins), and that shard's
spends can only wait for the fsync; every other shard must still wait for
its own replica, so the second kill is checked the same way.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import anyio
import pytest

from tests.cluster_load import (
    Workers,
    grants_refreshed,
    lost_spends,
    nothing_lost,
    refresh_counts,
    wait_refreshed,
)
from tests.harness import make_settings, seed, wait_for
from tests.redis_cluster import ClusterNode, RedisCluster, key_slot
from worker.app import open_store
from worker.fakeprovider import FakeProvider, FakeProviderConfig
from worker.keys import Keyspace

pytestmark = pytest.mark.anyio

#: a request may wait out a failover (frozen workers, a dead node) without
#: timing out: an answer that arrives is committed, never guessed at
PROFILE = {"timeout_s": 12}
LEASE = {"REFRESHD_LEASE_SECONDS": "14"}


def _partitions_of(cluster: RedisCluster, keys: Keyspace) -> Counter[int]:
    """Partitions per primary (node index)."""
    return Counter(cluster.owner_of(key_slot(p.due)).index for p in keys.all_partitions())


def _waits(node: ClusterNode) -> int:
    """WAIT calls the node has answered (INFO commandstats)."""
    return int(node.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


@pytest.fixture
def cluster(fresh_cluster: RedisCluster) -> Iterator[RedisCluster]:
    yield fresh_cluster
    for node in fresh_cluster.nodes:
        node.server.resume()  # never leave a frozen process behind


async def _kill_one(
    cluster: RedisCluster,
    victim: ClusterNode,
    workers: Workers,
    check: Callable[[], Awaitable[tuple[int, list[str]]]],
    stall_s: float,
) -> dict[str, int]:
    """Stall ``victim``'s replica for ``stall_s`` under load (the primary
    alone has what is written meanwhile), then freeze the workers, SIGKILL
    the primary, let the replica take over, and check what it holds."""
    [replica] = cluster.replica_of(victim)
    assert _waits(victim) > 0  # spends and commits wait for the replica
    replica.server.pause()
    await anyio.sleep(stall_s)
    workers.freeze()
    cluster.kill(victim)
    replica.server.resume()
    started = time.monotonic()
    await anyio.to_thread.run_sync(lambda: cluster.wait_promoted(replica, timeout=20))
    failover_ms = round((time.monotonic() - started) * 1000)
    out, lost = await check()
    workers.thaw()
    assert lost == [], f"spends acknowledged but missing after the failover: {lost}"
    return {"requests_out_at_kill": out, "spends_lost": len(lost), "failover_ms": failover_ms}


async def _failover_under_load(cluster: RedisCluster, *, credentials: int, kills: int,
                               stall_s: float, after: int) -> dict[str, Any]:  # fmt: skip
    """``kills`` primaries SIGKILLed one after the other, the next one once
    the workers have seen the last failover's shard without a replica."""
    settings = make_settings(cluster.url)
    keys = Keyspace(settings.prefix, settings.partitions)
    config = FakeProviderConfig(lifetime_s=4, rotate=True, revoke_on_reuse=True, latency_s=0.2)
    kills_done: list[dict[str, int]] = []
    async with FakeProvider(config) as provider, open_store(settings) as store:
        # first refreshes due 3-5 s from now, once the workers are up, spread
        # out: the load is then even, not in waves of every credential at once
        grants = await seed(store, provider, credentials, profile=PROFILE,
                            expires_in=lambda n: 6 + (n % 40) / 10)  # fmt: skip
        async with Workers.running(cluster.url, 3, **LEASE) as workers:
            await wait_for(lambda: grants_refreshed(provider, grants, {}, 1), within=30,
                           what="every credential refreshed once")  # fmt: skip
            for k in range(kills):
                if k:  # the workers' server check (every 5 s) sees the lone primary
                    await anyio.sleep(6)
                owned = _partitions_of(cluster, keys)
                # the busiest primary that still has a replica to take over
                victim = max((p for p in cluster.primaries() if cluster.replica_of(p)),
                             key=lambda p: owned[p.index])  # fmt: skip
                check = partial(lost_spends, store, provider, grants)
                done = await _kill_one(cluster, victim, workers, check, stall_s)
                kills_done.append(done | {"partitions": owned[victim.index]})
                at_kill = refresh_counts(provider, grants)
                await wait_refreshed(
                    store, provider, grants, at_kill, after, within=max(40, credentials / 50)
                )
        await nothing_lost(store, provider, grants)
        counts = {
            "credentials": credentials,
            "kills": kills_done,
            "refreshes": sum(refresh_counts(provider, grants).values()),
            "reuse": len(provider.stats.reuse_events),
        }
    print("cluster failover:", counts)
    return counts


async def test_a_killed_primary_loses_no_acknowledged_spend(cluster: RedisCluster) -> None:
    """Two primaries, one after the other: the second shard must still wait
    for its own replica while the first one's new primary has none."""
    counts = await _failover_under_load(cluster, credentials=200, kills=2, stall_s=1.0, after=2)
    assert counts["reuse"] == 0
    # the check had spends to look at: requests out when the workers froze
    assert sum(k["requests_out_at_kill"] for k in counts["kills"]) > 0


@pytest.mark.slow
async def test_a_killed_primary_under_heavier_load(cluster: RedisCluster) -> None:
    counts = await _failover_under_load(cluster, credentials=3000, kills=2, stall_s=1.5, after=3)
    assert counts["reuse"] == 0
    assert all(k["requests_out_at_kill"] > 0 for k in counts["kills"])
