"""Classic PUBLISH or sharded SPUBLISH for events on a cluster: ``python -m bench.cluster_pubsub``.

Starts the test suite's 3-primary + 3-replica cluster (``tests.redis_cluster``)
and runs N small Lua scripts, each on a partition key spread over every
slot owner, as the commit script does: without a publish (the baseline),
with ``PUBLISH refreshd:events`` (classic: the cluster bus carries every
message to every node) and with ``SPUBLISH {refreshd:N}:events`` (sharded:
the message stays on the partition's shard). One subscriber listens in
each case (on one node for classic, one per shard for sharded), reading
every message. Prints the CPU of all six nodes per script call and the
extra cost of each publish kind over the baseline.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

from bench.infra import cpu_seconds
from tests.redis_cluster import RedisCluster, key_slot

_SCRIPTS = {
    "none": "redis.call('HINCRBY', KEYS[1], 'n', 1) return 1",
    "publish": "redis.call('HINCRBY', KEYS[1], 'n', 1) "
    "return redis.call('PUBLISH', ARGV[1], ARGV[2])",
    "spublish": "redis.call('HINCRBY', KEYS[1], 'n', 1) "
    "return redis.call('SPUBLISH', ARGV[1], ARGV[2])",
}
_EVENT = json.dumps({"v": 1, "type": "refreshed", "credential_id": "c" * 24, "version": 7,
                     "expires_at": 1_900_000_000_000, "profile": "acme"})  # fmt: skip


def _listen(node_port: int, mode: str, channels: list[str], stop: threading.Event) -> None:
    client = redis.Redis(port=node_port, decode_responses=True)
    pubsub = client.pubsub()
    if mode == "spublish":
        for channel in channels:  # one SSUBSCRIBE per slot: several at once is CROSSSLOT
            pubsub.ssubscribe(channel)
    else:
        pubsub.subscribe(*channels)
    while not stop.is_set():
        if mode == "spublish":
            pubsub.get_sharded_message(timeout=0.2)
        else:
            pubsub.get_message(timeout=0.2)
    pubsub.close()
    client.close()


def _run(cluster: RedisCluster, mode: str, n: int, partitions: int) -> dict[str, Any]:
    owners = {p: cluster.owner_of(key_slot(f"{{refreshd:{p}}}")) for p in range(partitions)}
    stop = threading.Event()
    listeners = []
    if mode == "spublish":
        by_node: dict[int, list[str]] = {}
        for p, node in owners.items():
            by_node.setdefault(node.port, []).append(f"{{refreshd:{p}}}:events")
        targets = list(by_node.items())
    else:
        targets = [(cluster.nodes[0].port, ["refreshd:events"])]
    for port, channels in targets:
        thread = threading.Thread(target=_listen, args=(port, mode, channels, stop))
        thread.start()
        listeners.append(thread)
    time.sleep(0.3)
    clients = {node.port: node.client() for node in set(owners.values())}
    shas = {port: c.script_load(_SCRIPTS[mode]) for port, c in clients.items()}
    pids = [node.server.pid for node in cluster.nodes]
    cpu0 = sum(cpu_seconds(pid) for pid in pids)
    wall0 = time.perf_counter()
    batch = 200
    for start in range(0, n, batch):
        pipes = {port: c.pipeline(transaction=False) for port, c in clients.items()}
        for i in range(start, min(start + batch, n)):
            p = i % partitions
            port = owners[p].port
            channel = f"{{refreshd:{p}}}:events" if mode == "spublish" else "refreshd:events"
            pipes[port].evalsha(shas[port], 1, f"{{refreshd:{p}}}:stats", channel, _EVENT)
        for pipe in pipes.values():
            pipe.execute()
    time.sleep(0.5)  # let the bus and the subscribers catch up
    wall = time.perf_counter() - wall0
    cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
    stop.set()
    for thread in listeners:
        thread.join()
    for c in clients.values():
        c.close()
    return {"mode": mode, "calls": n, "cluster_cpu_us_per_call": round(cpu / n * 1e6, 2),
            "wall_s": round(wall, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=60_000)
    parser.add_argument("--partitions", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, RedisCluster(Path(tmp)) as cluster:
        rows = [_run(cluster, mode, args.n, args.partitions) for mode in _SCRIPTS]
    base = rows[0]["cluster_cpu_us_per_call"]
    for row in rows:
        row["extra_us_per_event"] = round(row["cluster_cpu_us_per_call"] - base, 2)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
