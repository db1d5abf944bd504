"""The ``cluster`` scenario: the catch-up on a 3-shard Valkey Cluster (a
replica per primary) against one server alone and one primary with a
replica (a Sentinel shard), interleaved.

On 2 cores three shards cannot run faster than one server: every process
shares the same cores. What a cluster changes is what one shard spends per
refresh it serves, and that is the figure measured here: each node's
``used_cpu_sys + used_cpu_user`` (INFO cpu) before and after the timed
window, the primaries' sum over every refresh, and each primary's own over
the refreshes of the partitions it owns. A shard's main thread is one core,
so 1 / that cost is a shard's ceiling, and the cluster's is the shards' sum.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from bench.infra import RefreshdWorker, cpu_seconds, start_valkey
from bench.measure import Snapshot, catch_up_result, machine_ticks
from bench.refreshd_runs import Ctx, _wait, wait_caught_up
from bench.seed import cred_ids, read_commits, seed_refreshd
from tests.redis_cluster import RedisCluster, key_slot
from tests.redis_server import RedisServer
from worker.keys import Keyspace
from worker.settings import Settings

__all__ = ["Node", "Topology", "cluster_catch_up", "cluster_scenario", "node_cpu_s"]

SHARDS = 3


@dataclass(frozen=True, slots=True)
class Node:
    name: str  # host:port
    role: str  # "primary" or "replica"
    server: RedisServer


def node_cpu_s(server: RedisServer) -> float:
    """The server's own account of its CPU (INFO cpu): main thread and
    background threads, system and user."""
    with server.client(decode_responses=True) as c:
        info = c.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _node_calls(server: RedisServer) -> dict[str, int]:
    with server.client(decode_responses=True) as c:
        stats = c.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _used_memory(server: RedisServer) -> int:
    with server.client(decode_responses=True) as c:
        return int(c.info("memory")["used_memory"])


@dataclass
class Topology:
    """The servers of one run and which primary owns each credential."""

    url: str
    nodes: list[Node]
    owner_of: Callable[[str], str]  # credential id -> primary's name
    stop: Callable[[], None]

    @property
    def primaries(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "primary"]

    def cpu(self) -> dict[str, float]:
        return {n.name: node_cpu_s(n.server) for n in self.nodes}

    def commands(self) -> dict[str, int]:
        """Calls per command on the primaries (a replica applies the
        replication stream, which INFO commandstats does not count)."""
        total: Counter[str] = Counter()
        for n in self.primaries:
            total.update(_node_calls(n.server))
        return dict(total)

    def used_memory(self) -> int:
        time.sleep(0.3)  # the AOF buffer flushed
        return sum(_used_memory(n.server) for n in self.primaries)


def _tune(server: RedisServer, fsync: str) -> None:
    """As bench.infra.start_valkey: the fsync policy asked for, and no AOF
    rewrite fork inside a timed window."""
    with server.client() as c:
        c.config_set("appendfsync", fsync)
        c.config_set("auto-aof-rewrite-percentage", "0")


def single(work: Path, fsync: str, *, replica: bool) -> Topology:
    """One server (as the other scenarios run), or a primary with a replica."""
    primary = start_valkey(work / "primary", fsync=fsync)
    nodes = [Node(f"127.0.0.1:{primary.port}", "primary", primary)]
    if replica:
        follower = start_valkey(work / "replica", fsync=fsync)
        nodes.append(Node(f"127.0.0.1:{follower.port}", "replica", follower))
        with follower.client() as c:
            c.replicaof("127.0.0.1", str(primary.port))
        _wait(lambda: _synced(primary), within=30, what="the replica to sync")

    def stop() -> None:
        for n in nodes:
            n.server.stop()

    return Topology(primary.url, nodes, lambda _id: nodes[0].name, stop)


def _synced(primary: RedisServer) -> bool:
    with primary.client(decode_responses=True) as c:
        info = c.info("replication")
    slave = info.get("slave0")
    return bool(slave) and slave.get("state") == "online"


def cluster(work: Path, fsync: str) -> Topology:
    """3 primaries + 3 replicas (tests.redis_cluster), with the fsync policy
    of the other runs and a node timeout no busy second can trip."""
    c = RedisCluster(work / "cluster", primaries=SHARDS, node_timeout_ms=15_000)
    c.start()
    for node in c.nodes:
        _tune(node.server, fsync)
    primaries = {n.index for n in c.primaries()}
    nodes = [Node(n.address, "primary" if n.index in primaries else "replica", n.server)
             for n in c.nodes]  # fmt: skip
    s = Settings()
    keys = Keyspace(s.prefix, s.partitions)
    owners = {p.index: c.owner_of(key_slot(p.due)).address
              for p in keys.all_partitions()}  # fmt: skip

    def owner_of(cred_id: str) -> str:
        return owners[keys.partition_of(cred_id).index]

    return Topology(c.url, nodes, owner_of, c.stop)


def _snapshot(workers: RefreshdWorker, topo: Topology, endpoint_pid: int
              ) -> tuple[Snapshot, dict[str, float]]:  # fmt: skip
    dumps = workers.dump()
    cpu = topo.cpu()
    snap = Snapshot(
        workers=workers.cpu(),
        redis=sum(cpu.values()),  # every node, so other_load_cores counts none of them
        endpoint=cpu_seconds(endpoint_pid),
        commands=topo.commands(),
        round_trips=sum(d["round_trips"] for d in dumps),
        dumps=dumps,
        ticks=machine_ticks(),
    )
    return snap, cpu


def cluster_catch_up(ctx: Ctx, n: int, kind: str, *, tag: str = "") -> dict[str, Any]:
    """``n`` credentials due at once, one refreshd process, on ``kind``:
    ``single``, ``replica`` (a primary and its replica) or ``cluster``."""
    name = f"cluster-{kind}{tag}"
    work = ctx.work / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if kind == "cluster":
        topo = cluster(work, ctx.fsync)
    else:
        topo = single(work, ctx.fsync, replica=kind == "replica")
    workers = RefreshdWorker(work)
    try:
        ctx.endpoint.reset(expires_in=3600)
        ids = cred_ids(n)
        mem0 = topo.used_memory()
        seed_s = anyio.run(seed_refreshd, topo.url, ids, ctx.endpoint.url, name,
                           backend="asyncio")  # fmt: skip
        mem_seeded = topo.used_memory()
        workers.start(topo.url, 1, concurrency=ctx.concurrency)
        time.sleep(0.5)
        before, cpu0 = _snapshot(workers, topo, ctx.endpoint.pid)
        armed_ms = anyio.run(arm_anywhere, topo.url, ids, backend="asyncio")
        wait_caught_up(ctx, workers, n)
        after, cpu1 = _snapshot(workers, topo, ctx.endpoint.pid)
        ep = ctx.endpoint.stats()
        commits = anyio.run(read_commits, topo.url, ids, backend="asyncio")
        workers.stop()
        mem_refreshed = topo.used_memory()
    finally:
        workers.stop()
        topo.stop()
    result = catch_up_result(f"refreshd-{kind}", n, commits=commits, before=before, after=after,
                             endpoint=ep, armed_ms=armed_ms, seed_s=seed_s,
                             memory=(mem0, mem_seeded, mem_refreshed))  # fmt: skip
    return result | _per_shard(topo, ids, cpu0, cpu1)


def _per_shard(topo: Topology, ids: Sequence[str], cpu0: dict[str, float],
               cpu1: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """Redis CPU per refresh on the shard that served it: the primaries'
    CPU over every refresh, and each primary's over its own refreshes
    (each credential is refreshed once in a catch-up)."""
    spent = {name: cpu1[name] - cpu0[name] for name in cpu0}
    served = Counter(topo.owner_of(i) for i in ids)
    primaries = [n.name for n in topo.primaries]
    replicas = [n.name for n in topo.nodes if n.role == "replica"]
    n = max(len(ids), 1)
    return {
        "shards": len(primaries),
        "partitions": Settings().partitions,
        "replicas_per_primary": len(replicas) // max(len(primaries), 1),
        "redis_cpu_ms_per_refresh_per_shard": 1000 * sum(spent[p] for p in primaries) / n,
        "replica_cpu_ms_per_refresh": (
            1000 * sum(spent[r] for r in replicas) / n if replicas else None
        ),
        "per_shard": [
            {
                "node": p,
                "refreshes": served[p],
                "cpu_s": spent[p],
                "cpu_ms_per_refresh": 1000 * spent[p] / max(served[p], 1),
            }
            for p in primaries
        ],
    }


async def arm_anywhere(redis_url: str, ids: Sequence[str]) -> int:
    """bench.seed.arm for any topology: every credential due now, and a
    wake-up. Returns the local clock (ms), which the workers' lag uses too."""
    from bench.seed import arm

    now = int(time.time() * 1000)
    await arm(redis_url, ids, lambda _i: now)
    return now


KINDS = ("single", "replica", "cluster")


def cluster_scenario(ctx: Ctx, n: int, rounds: int) -> dict[str, Any]:
    """Each kind ``rounds`` times, interleaved (this VM's speed drifts within
    minutes); each kind's median run by rate is kept, every rate listed."""
    done: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for i in range(rounds):
        for kind in KINDS:
            of = f" ({i + 1} of {rounds})" if rounds > 1 else ""
            ctx.log(f"cluster: catch-up of {n:,} credentials on {_LABEL[kind]}{of}")
            res = cluster_catch_up(ctx, n, kind, tag=f"-{i}" if i else "")
            done[kind].append(res)
            ctx.log("  " + line(res))
    out: dict[str, Any] = {"scenario": "cluster", "credentials": n, "rounds": rounds}
    every = [r for rs in done.values() for r in rs]
    for kind, rs in done.items():
        out[kind] = _median(rs, lambda r: r["refreshes_per_s"])
        out[kind]["repeats"] = [r["refreshes_per_s"] for r in rs]
        # CPU per refresh moves less with the machine's load than the rate,
        # but still moves: each figure's own median over the rounds
        cpu = {
            "redis_per_shard": [r["redis_cpu_ms_per_refresh_per_shard"] for r in rs],
            "replicas": [r["replica_cpu_ms_per_refresh"] or 0.0 for r in rs],
            "worker": [r["cpu_ms_per_refresh"]["worker"] for r in rs],
        }
        out[kind]["cpu_repeats"] = cpu
        out[kind]["cpu_medians"] = {k: _median(v, float) for k, v in cpu.items()}
    out["endpoint_reuse"] = sum(r["endpoint_reuse"] for r in every)
    out["all_committed_once"] = all(r["all_committed_once"] for r in every)
    return out


def _median(values: Sequence[Any], key: Callable[[Any], float]) -> Any:
    """The median item by ``key`` (the lower middle one of an even count)."""
    ordered = sorted(values, key=key)
    return ordered[(len(ordered) - 1) // 2]


_LABEL = {
    "single": "one server",
    "replica": "a primary + replica",
    "cluster": f"a {SHARDS}-shard cluster (+ replicas)",
}


def line(r: dict[str, Any]) -> str:
    shards = " / ".join(f"{s['cpu_ms_per_refresh']:.3f} ({s['refreshes']:,})"
                        for s in r["per_shard"])  # fmt: skip
    replicas = r["replica_cpu_ms_per_refresh"]
    return (f"{r['refreshes_per_s']:,.0f} refreshes/s; Redis CPU ms per refresh per shard "
            f"{r['redis_cpu_ms_per_refresh_per_shard']:.3f} (each: {shards})"
            + (f", replicas {replicas:.3f}" if replicas is not None else "")
            + f"; worker {r['cpu_ms_per_refresh']['worker']:.3f}; "
            f"WAIT {r['commands'].get('wait', 0):.3f} WAITAOF {r['commands'].get('waitaof', 0):.3f}"
            f" per refresh; reuse {r['endpoint_reuse']}")  # fmt: skip
