"""A real Valkey/Redis Cluster (3 primaries + 3 replicas) on loopback, for tests.

Built from six ``RedisServer`` children (same binary lookup, AOF with
``appendfsync always``, ``noeviction``) with ``cluster-enabled yes`` and a
short ``cluster-node-timeout``, so a SIGKILLed primary is replaced by its
replica within a few seconds. The cluster is assembled the way an operator
would with ``valkey-cli --cluster create``, but through redis-py so the tests
need no CLI: a config epoch per node, slots with CLUSTER ADDSLOTSRANGE, CLUSTER
MEET, CLUSTER REPLICATE, then wait for ``cluster_state:ok`` on every node and
every replica in sync.

Nodes are addressed by their index in ``nodes`` (stable for the cluster's
life; a node keeps its port and data directory across ``restart``), while
*roles* change with failovers: ask ``primaries()`` / ``replicas()`` again
after killing a node.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tests.lifecycle import StartStop
from tests.redis_server import RedisServer, free_port

__all__ = ["SLOTS", "ClusterNode", "RedisCluster", "key_slot"]

SLOTS = 16384
_HOST = "127.0.0.1"


def key_slot(key: str) -> int:
    """The slot a key hashes to (CRC16/XMODEM of the hash tag, as the server
    computes it), so tests can pick keys by slot without asking a node."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    crc = 0
    for byte in key.encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % SLOTS


class ClusterNode:
    """One node: a ``RedisServer`` with a cluster bus port of its own (the
    default, port + 10000, may be past 65535 or taken on a busy machine)."""

    def __init__(self, index: int, data_dir: Path, node_timeout_ms: int) -> None:
        self.index = index
        self.server = RedisServer(
            data_dir,
            config={
                "cluster-enabled": "yes",
                "cluster-config-file": "nodes.conf",
                "cluster-port": str(free_port()),
                "cluster-node-timeout": str(node_timeout_ms),
                # a replica may always take over, however long its link was
                # down: tests kill primaries right after starting load
                "cluster-replica-validity-factor": "0",
                # a replica syncs at once (the default waits 5 s for others)
                "repl-diskless-sync-delay": "0",
                # replicas of a dead primary never migrate away in tests
                "cluster-allow-replica-migration": "no",
            },
            free_ports=("cluster-port",),
        )
        self._node_id: str | None = None

    @property
    def bus_port(self) -> int:
        """The cluster bus port (the server may have chosen another on its
        first start, if this one was taken)."""
        return int(self.server.setting("cluster-port"))

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"{_HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.server.running

    @property
    def node_id(self) -> str:
        """The 40-hex cluster node id; kept in nodes.conf across restarts."""
        if self._node_id is None:
            with self.client() as client:
                self._node_id = str(client.execute_command("CLUSTER", "MYID"))
        return self._node_id

    def client(self, *, socket_timeout: float = 2.0) -> redis.Redis:
        """A plain single-node client (decoded replies), no retries."""
        return self.server.client(socket_timeout=socket_timeout, decode_responses=True)

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as client:
            info: dict[str, Any] = client.info(section)
            return info

    def role(self) -> str:
        """``master`` or ``slave`` as this node sees itself right now."""
        return str(self.info("replication")["role"])

    def cluster_info(self) -> dict[str, str]:
        with self.client() as client:
            raw = str(client.execute_command("CLUSTER", "INFO"))
        pairs = (line.split(":", 1) for line in raw.splitlines() if ":" in line)
        return {k: v.strip() for k, v in pairs}

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ClusterNode #{self.index} {self.address} {state}>"


class RedisCluster(StartStop):
    """``primaries`` primaries, each with ``replicas_per_primary`` replicas.

    Slots are split evenly in index order: node 0 owns 0-5460, node 1
    5461-10922, node 2 10923-16383 (for 3 primaries); nodes 3, 4, 5 replicate
    0, 1, 2 at start.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        primaries: int = 3,
        replicas_per_primary: int = 1,
        node_timeout_ms: int = 1500,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.node_timeout_ms = node_timeout_ms
        self._primary_count = primaries
        count = primaries * (1 + replicas_per_primary)
        self.nodes = [
            ClusterNode(i, self.data_dir / f"node{i}", node_timeout_ms) for i in range(count)
        ]

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start every node and assemble the cluster; returns once it is
        ``ok`` everywhere and every replica is in sync."""
        try:
            for node in self.nodes:
                node.server.start()
            self._assemble(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.server.kill()  # no graceful shutdown needed: data is thrown away

    def _assemble(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        primaries = self.nodes[: self._primary_count]
        per = SLOTS // len(primaries)
        for i, node in enumerate(primaries):
            first = i * per
            last = SLOTS - 1 if i == len(primaries) - 1 else first + per - 1
            with node.client() as client:
                # distinct epochs, as valkey-cli gives fresh nodes: no epoch
                # collision to resolve before the slots settle
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        self._meet()
        meet_again = time.monotonic() + 3.0

        def everyone_known() -> bool:
            # a handshake that fails (a busy machine) is forgotten after the
            # node timeout and never tried again: meet the missing ones anew
            nonlocal meet_again
            if all(self._known(n) == len(self.nodes) for n in self.nodes):
                return True
            if time.monotonic() > meet_again:
                self._meet()
                meet_again = time.monotonic() + 3.0
            return False

        self._wait(everyone_known, deadline, "every node to know every other")
        for i, node in enumerate(self.nodes[self._primary_count :]):
            primary = primaries[i % len(primaries)]
            with node.client() as client:
                client.execute_command("CLUSTER", "REPLICATE", primary.node_id)
        self.wait_healthy(timeout=max(deadline - time.monotonic(), 1.0))

    # -- what a client needs -----------------------------------------------

    @property
    def url(self) -> str:
        """The refreshd cluster URL: every node as a seed, so any one of them
        being down at start does not matter."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    @property
    def seed_url(self) -> str:
        """The cluster URL with one seed (node 0), as a user may write it."""
        return f"redis+cluster://{self.nodes[0].address}"

    def client(self) -> redis.RedisCluster:
        """A sync redis-py cluster client for test set-up and checks."""
        return redis.RedisCluster(host=_HOST, port=self._any_running().port, decode_responses=True)

    # -- roles ---------------------------------------------------------------

    def primaries(self) -> list[ClusterNode]:
        """Running nodes that are primaries owning slots, in slot order."""
        owners = self.slot_owners()
        return sorted(
            {n.index: n for n in owners.values()}.values(),
            key=lambda n: min(s for s, o in owners.items() if o is n),
        )

    def replicas(self) -> list[ClusterNode]:
        """Running nodes that replicate a primary."""
        return [n for n in self.nodes if n.running and n.role() == "slave"]

    def replica_of(self, primary: ClusterNode) -> list[ClusterNode]:
        """The running replicas that follow ``primary`` right now."""
        found = []
        for node in self.replicas():
            info = node.info("replication")
            if int(info.get("master_port", 0)) == primary.port:
                found.append(node)
        return found

    def slot_owners(self) -> dict[int, ClusterNode]:
        """First slot of each range -> owning node, as a running node sees it."""
        by_port = {n.port: n for n in self.nodes}
        with self._any_running().client() as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        return {int(r[0]): by_port[int(r[2][1])] for r in ranges}

    def owner_of(self, slot: int) -> ClusterNode:
        """The primary serving ``slot`` (per CLUSTER SLOTS on a running node)."""
        by_port = {n.port: n for n in self.nodes}
        with self._any_running().client() as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        for r in ranges:
            if int(r[0]) <= slot <= int(r[1]):
                return by_port[int(r[2][1])]
        raise LookupError(f"slot {slot} is not served")

    # -- faults --------------------------------------------------------------

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL: only what was fsynced (and replicated) survives."""
        node.server.kill()

    def restart(self, node: ClusterNode, timeout: float = 10.0) -> None:
        """Bring a killed node back on its port and data (AOF + nodes.conf);
        a former primary rejoins as a replica of whoever took over."""
        node.server.restart(timeout)

    def wait_promoted(self, replica: ClusterNode, *, timeout: float = 20.0) -> ClusterNode:
        """Wait until ``replica`` is a primary owning slots and the cluster is
        ``ok`` again on every running node; returns ``replica``."""
        deadline = time.monotonic() + timeout

        def promoted() -> bool:
            return replica.role() == "master" and replica in self.primaries()

        self._wait(promoted, deadline, f"the promotion of {replica}")
        self.wait_ok(timeout=max(deadline - time.monotonic(), 1.0))
        return replica

    def fail_primary(self, primary: ClusterNode, *, timeout: float = 20.0) -> ClusterNode:
        """SIGKILL ``primary`` and wait for its replica to take over; returns
        the new primary (the former replica)."""
        replicas = self.replica_of(primary)
        if not replicas:
            raise RuntimeError(f"{primary} has no running replica to fail over to")
        self.kill(primary)
        return self.wait_promoted(replicas[0], timeout=timeout)

    # -- slot migration --------------------------------------------------------

    def migrate_slot(self, slot: int, target: ClusterNode, *, keys_per_step: int = 100,
                     between: Callable[[], None] | None = None) -> int:  # fmt: skip
        """Move ``slot`` to ``target`` the way ``valkey-cli --cluster reshard``
        does (IMPORTING / MIGRATING, MIGRATE in steps, SETSLOT NODE on both
        ends and then everywhere). ``between`` runs after each step, while
        the slot is half moved (clients get ASK). Returns the keys moved."""
        source = self.owner_of(slot)
        if source is target:
            return 0
        self.begin_migration(slot, target)
        moved = 0
        while True:
            step = self.migrate_keys(slot, target, count=keys_per_step)
            moved += step
            if between is not None:
                between()
            if step == 0:
                break
        self.finish_migration(slot, target)
        return moved

    def begin_migration(self, slot: int, target: ClusterNode) -> ClusterNode:
        """Mark ``slot`` IMPORTING on ``target`` and MIGRATING on its owner
        (returned). From here the owner answers ASK for keys it no longer has."""
        source = self.owner_of(slot)
        with target.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        with source.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        return source

    def migrate_keys(self, slot: int, target: ClusterNode, *, count: int = 100) -> int:
        """MIGRATE up to ``count`` keys of ``slot`` from its owner to ``target``."""
        source = self.owner_of(slot)
        with source.client(socket_timeout=10.0) as client:
            keys = client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, count)
            if keys:
                client.execute_command("MIGRATE", _HOST, target.port, "", 0, 5000, "KEYS", *keys)
        return len(keys)

    def finish_migration(self, slot: int, target: ClusterNode) -> None:
        """Assign ``slot`` to ``target`` on target, source, then every other
        primary (replicas learn it from their primaries)."""
        source = self.owner_of(slot)
        others = [n for n in self.primaries() if n not in (target, source)]
        for node in [target, source, *others]:
            if node.running:
                with node.client() as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)

    # -- health ----------------------------------------------------------------

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Every running node reports ``cluster_state:ok`` and agrees on who
        owns every slot."""
        deadline = time.monotonic() + timeout
        self._wait(self._all_ok, deadline, "cluster_state:ok on every running node")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """``wait_ok`` plus every primary has a replica that is in sync."""
        deadline = time.monotonic() + timeout
        self.wait_ok(timeout)
        self._wait(self._replicas_in_sync, deadline, "every replica in sync")

    def flush(self) -> None:
        """Empty every primary's keyspace and every node's script cache."""
        for node in self.nodes:
            if not node.running:
                continue
            with node.client() as client:
                if node.role() == "master":
                    client.flushall()
                client.script_flush()

    def revive(self, timeout: float = 30.0) -> None:
        """Restart any node a test left dead and wait until healthy."""
        for node in self.nodes:
            if not node.running:
                node.server.resume()
                node.server.start()
        self.wait_healthy(timeout)

    # -- helpers -----------------------------------------------------------------

    def _any_running(self) -> ClusterNode:
        for node in self.nodes:
            if node.running:
                return node
        raise RuntimeError("no cluster node is running")

    def _meet(self) -> None:
        """CLUSTER MEET, from node 0, every node it does not know yet."""
        with self.nodes[0].client() as client:
            view = str(client.execute_command("CLUSTER", "NODES"))
            for node in self.nodes[1:]:
                if f"{_HOST}:{node.port}@" not in view:
                    client.execute_command("CLUSTER", "MEET", _HOST, node.port, node.bus_port)

    @staticmethod
    def _known(node: ClusterNode) -> int:
        with node.client() as client:
            return len(str(client.execute_command("CLUSTER", "NODES")).strip().splitlines())

    def _all_ok(self) -> bool:
        views = []
        for node in self.nodes:
            if not node.running:
                continue
            try:
                if node.cluster_info().get("cluster_state") != "ok":
                    return False
                with node.client() as client:
                    slots = client.execute_command("CLUSTER", "SLOTS")
            except redis.RedisError:
                return False
            views.append(sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in slots))
        return bool(views) and all(v == views[0] for v in views)

    def _replicas_in_sync(self) -> bool:
        try:
            primaries = self.primaries()
            for primary in primaries:
                replicas = self.replica_of(primary)
                if not replicas:
                    return False
                offset = int(primary.info("replication")["master_repl_offset"])
                for replica in replicas:
                    info = replica.info("replication")
                    if info.get("master_link_status") != "up":
                        return False
                    if int(info.get("master_sync_in_progress", 1)):
                        return False
                    if int(info.get("slave_repl_offset", -1)) < offset:
                        return False
        except (redis.RedisError, LookupError):
            return False
        return True

    @staticmethod
    def _wait(check: Callable[[], bool], deadline: float, what: str) -> None:
        while True:
            with contextlib.suppress(redis.RedisError):
                if check():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster: timed out waiting for {what}")
            time.sleep(0.05)

    def __repr__(self) -> str:
        return f"<RedisCluster {', '.join(repr(n) for n in self.nodes)}>"
