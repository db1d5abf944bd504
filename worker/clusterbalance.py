"""Even refreshd's partitions over a Redis Cluster's primaries by moving their slots, online.

Why it is needed. A partition is one hash tag, hence one slot, and which
primary owns that slot follows the CRC16 of the tag: 16 partitions on three
primaries with equal slot ranges fall 7 / 4 / 5, so the busiest shard caps
the cluster. Key names cannot change (single servers, Sentinel and
non-Python consumers share them), so the slots move instead.

How. ``read_view`` reads the slot map, each primary's node id and any slot
of a partition left half moved (an interrupted run); ``plan_moves`` picks
the fewest slots to move from the most to the least loaded primary until
every primary owns ``floor`` or ``ceil`` of partitions / primaries (the
half-moved ones are finished first); ``move_slot`` moves one slot the
standard way, as ``valkey-cli --cluster reshard`` does: ``CLUSTER SETSLOT
IMPORTING`` on the target, ``MIGRATING`` on the source, ``GETKEYSINSLOT`` +
``MIGRATE ... REPLACE KEYS`` in batches, then ``SETSLOT NODE`` on the
target, the source and every other primary. Workers keep running: their
scripts follow ASK/TRYAGAIN while the slot is split and MOVED after
(tests/test_cluster_migration.py). ``REPLACE`` is right because the source
is the truth while it holds a key: it redirects a command only for keys it
no longer has, so a copy already on the target can only be an earlier,
interrupted MIGRATE's.

These are admin commands (``CLUSTER SETSLOT``, ``MIGRATE``): run as the
default or an admin user, not ``refreshd-operator`` (README "Running on a
Redis Cluster").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from worker.cluster import ClusterRouter
from worker.errors import Conflict
from worker.keys import Keyspace
from worker.logs import get_logger

__all__ = [
    "ClusterView",
    "Move",
    "balanced",
    "migrate_auth",
    "move_slot",
    "plan_moves",
    "read_view",
    "spread_after",
]

log = get_logger("refreshd.clusterbalance")


@dataclass(frozen=True, slots=True)
class Move:
    """One slot to move: the partitions it holds (usually one; two tags can
    share a slot), its owner and the primary it goes to (``host:port`` as
    the client reaches them), its keys when planned, and whether it
    finishes a move an earlier run left half done."""

    slot: int
    partitions: tuple[int, ...]
    source: str
    target: str
    keys: int = 0
    resumes: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "partition": self.partitions[0],
            "slot": self.slot,
            "from": self.source,
            "to": self.target,
            "keys": self.keys,
        }
        if len(self.partitions) > 1:
            out["partitions"] = list(self.partitions)
        if self.resumes:
            out["resumes"] = True
        return out


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What planning and moving need, read from the cluster: ``ids`` maps a
    primary's client address to its node id, ``peers`` a node id to the
    address the cluster announces for it (what a source's MIGRATE dials),
    ``owners`` a partition slot to its primary, ``slot_partitions`` a slot to
    the partitions it holds, ``keys`` a slot to its key count, ``pending``
    the moves an earlier run left half done."""

    ids: dict[str, str]
    peers: dict[str, str]
    owners: dict[int, str]
    slot_partitions: dict[int, tuple[int, ...]]
    keys: dict[int, int]
    pending: list[Move] = field(default_factory=list)

    @property
    def primaries(self) -> list[str]:
        return sorted(self.ids)

    def spread(self) -> dict[str, int]:
        """Partitions per primary now (``refreshd status``'s
        ``partitions_by_primary``)."""
        load = dict.fromkeys(self.primaries, 0)
        for slot, owner in self.owners.items():
            load[owner] = load.get(owner, 0) + len(self.slot_partitions[slot])
        return load

    def migrate_address(self, target: str) -> tuple[str, int]:
        """Where the source dials the target: the address the cluster
        announces for it, else the one the client uses."""
        host, _, port = self.peers.get(self.ids[target], "").rpartition(":")
        if not host or not port.isdigit():
            host, _, port = target.rpartition(":")
        return host, int(port)


def _weights(view: ClusterView) -> dict[int, int]:
    return {slot: len(parts) for slot, parts in view.slot_partitions.items()}


def balanced(spread: Mapping[str, int]) -> bool:
    """Every primary within one partition of every other."""
    return not spread or max(spread.values()) - min(spread.values()) <= 1


def spread_after(spread: Mapping[str, int], moves: Sequence[Move]) -> dict[str, int]:
    """Partitions per primary once ``moves`` are done."""
    out = dict(spread)
    for move in moves:
        out[move.source] -= len(move.partitions)
        out[move.target] = out.get(move.target, 0) + len(move.partitions)
    return out


def plan_moves(view: ClusterView) -> list[Move]:
    """The half-done moves, then the fewest slot moves that leave every
    primary within one partition of the others: each takes a slot from the
    most loaded primary to the least loaded one, the slot whose partition
    count best halves their gap (and of those the one with the fewest keys,
    so the least data moves). A move of ``w`` partitions across a gap ``g``
    is made only when ``w < g``, which strictly lowers the sum of squared
    loads, so the loop ends; with one partition per slot it ends at
    ``floor``/``ceil`` of partitions / primaries."""
    weights = _weights(view)
    moves = list(view.pending)
    owners = dict(view.owners)
    for move in moves:
        owners[move.slot] = move.target
    load = dict.fromkeys(view.primaries, 0)
    for slot, owner in owners.items():
        load[owner] += weights[slot]
    while load:
        source = max(load, key=lambda p: (load[p], p))
        target = min(load, key=lambda p: (load[p], p))
        gap = load[source] - load[target]
        if gap <= 1:
            break
        candidates = [s for s, o in owners.items() if o == source and weights[s] < gap]
        if not candidates:
            break  # only with slots holding several partitions: as even as it gets
        slot = min(candidates, key=lambda s: (abs(gap - 2 * weights[s]), view.keys.get(s, 0), s))
        moves.append(Move(slot, view.slot_partitions[slot], source, target, view.keys.get(slot, 0)))
        owners[slot] = target
        load[source] -= weights[slot]
        load[target] += weights[slot]
    return moves


async def _command(router: ClusterRouter, address: str, *args: Any) -> Any:
    return await router.client_at(address).execute_command(*args)  # type: ignore[no-untyped-call]


def _parse_nodes(raw: str) -> tuple[str, dict[str, str], dict[int, tuple[str, str]]]:
    """One node's ``CLUSTER NODES``: its own id, every node's announced
    ``ip:port`` by id, and its own open slots (slot -> ("migrating" or
    "importing", the other node's id)), which only the node itself shows."""
    me, peers, open_slots = "", {}, {}
    for line in raw.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        node_id, address, flags = fields[0], fields[1].split("@")[0], fields[2].split(",")
        peers[node_id] = address
        if "myself" not in flags:
            continue
        me = node_id
        for item in fields[8:]:
            if item.startswith("[") and "->-" in item:
                slot, _, other = item[1:-1].partition("->-")
                open_slots[int(slot)] = ("migrating", other)
            elif item.startswith("[") and "-<-" in item:
                slot, _, other = item[1:-1].partition("-<-")
                open_slots[int(slot)] = ("importing", other)
    return me, peers, open_slots


async def read_view(router: ClusterRouter, keys: Keyspace) -> ClusterView:
    """The slot map as it is now (re-read, not the client's cached one),
    each primary's id and open slots, and every partition slot's owner and
    key count."""
    await router.cluster.nodes_manager.initialize()
    ids: dict[str, str] = {}
    peers: dict[str, str] = {}
    open_by_node: dict[str, dict[int, tuple[str, str]]] = {}
    for address in router.primaries():
        raw = await _command(router, address, "CLUSTER", "NODES")
        me, seen, open_slots = _parse_nodes(str(raw))
        ids[address], open_by_node[address] = me, open_slots
        peers.update(seen)
    slot_partitions: dict[int, tuple[int, ...]] = {}
    for part in keys.all_partitions():
        slot = router.slot(part.due)
        slot_partitions[slot] = (*slot_partitions.get(slot, ()), part.index)
    slot_map = router.cluster.nodes_manager
    owners = {slot: str(slot_map.get_node_from_slot(slot).name) for slot in slot_partitions}
    counts = {
        slot: int(await _command(router, owner, "CLUSTER", "COUNTKEYSINSLOT", slot))
        for slot, owner in owners.items()
    }
    by_id = {node_id: address for address, node_id in ids.items()}
    pending: dict[int, Move] = {}
    for address, open_slots in open_by_node.items():
        for slot, (state, other) in open_slots.items():
            if slot not in slot_partitions:
                continue  # not refreshd's: left alone
            target = other if state == "migrating" else ids[address]
            target_address = by_id.get(target) if state == "migrating" else address
            if target_address is None:
                raise Conflict(
                    f"slot {slot} (partition {slot_partitions[slot][0]}) is half moved to node "
                    f"{target[:12]}, which is not a primary now; finish or undo it with "
                    "`valkey-cli --cluster fix`, then run this again"
                )
            if target_address != owners[slot]:
                pending[slot] = Move(slot, slot_partitions[slot], owners[slot], target_address,
                                     counts[slot], resumes=True)  # fmt: skip
    resumed = sorted(pending.values(), key=lambda m: m.slot)
    return ClusterView(ids, peers, owners, slot_partitions, counts, resumed)


def migrate_auth(auth: Mapping[str, str]) -> list[str]:
    """MIGRATE's AUTH / AUTH2 arguments for the URL's user (the target asks
    the source to log in as anyone would); the server redacts them from
    SLOWLOG and MONITOR, and refreshd never logs them."""
    if "password" not in auth:
        return []
    if "username" in auth:
        return ["AUTH2", auth["username"], auth["password"]]
    return ["AUTH", auth["password"]]


async def move_slot(
    router: ClusterRouter,
    view: ClusterView,
    move: Move,
    *,
    batch_keys: int = 100,
    timeout_ms: int = 10_000,
    auth: Sequence[str] = (),
    on_keys: Callable[[int], None] | None = None,
) -> int:
    """Move ``move.slot`` from ``move.source`` to ``move.target`` while
    workers run; returns the keys moved. Idempotent: run again after an
    interruption, it picks up where the slot is (``read_view`` finds it)."""
    slot, source, target = move.slot, move.source, move.target
    source_id, target_id = view.ids[source], view.ids[target]
    await _command(router, target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    await _command(router, source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    host, port = view.migrate_address(target)
    moved = 0
    while True:
        batch = await _command(router, source, "CLUSTER", "GETKEYSINSLOT", slot, batch_keys)
        if not batch:
            break
        # a key that expired since (a lock) is skipped; "NOKEY" if all did
        await _command(router, source, "MIGRATE", host, port, "", 0, timeout_ms, "REPLACE",
                       *auth, "KEYS", *batch)  # fmt: skip
        moved += len(batch)
        if on_keys is not None:
            on_keys(len(batch))
    # the target first (it stops importing and owns the slot, with a new
    # epoch), then the source (it stops redirecting with ASK), then the rest
    await _command(router, target, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    await _command(router, source, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    for address in view.primaries:
        if address not in (source, target):
            try:
                await _command(router, address, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
            except (RedisError, OSError) as exc:  # it learns the new owner over the bus
                log.warning("cluster.balance.setslot_skipped", node=address,
                            error=type(exc).__name__)  # fmt: skip
    log.info("cluster.balance.moved", slot=slot, partitions=list(move.partitions),
             source=source, target=target, keys=moved)  # fmt: skip
    return moved
