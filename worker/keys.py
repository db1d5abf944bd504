"""Every Redis key and channel name refreshd uses, built in one place.

Credentials are spread over a fixed number of partitions. All keys of one
partition share the hash tag ``{<prefix><n>}`` so that each Lua script
touches a single slot: the same code runs on one Redis, on Sentinel and on
Redis Cluster. Profiles and process-wide signals live outside partitions.

Changing ``partitions`` after credentials exist would strand them in the
old partitions, so the value is recorded in Redis on first use and checked
by every process (see ``Store.check_layout``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cache

__all__ = ["Keyspace", "Partition"]


@dataclass(frozen=True, slots=True)
class Partition:
    """The keys of one partition; the Lua scripts build per-credential keys
    from ``base`` so a batch claim need not pass thousands of KEYS."""

    index: int
    base: str  # "{refreshd:3}:" - every key of this partition starts with it

    @property
    def due(self) -> str:
        """Sorted set: member = credential id, score = next refresh time (ms)."""
        return f"{self.base}due"

    def cred(self, credential_id: str) -> str:
        return f"{self.base}cred:{credential_id}"

    def lock(self, credential_id: str) -> str:
        return f"{self.base}lock:{credential_id}"

    @property
    def stats(self) -> str:
        """Hash of counters kept by the scripts: ``status:<s>`` per status and
        ``profile:<id>`` per profile, so `status` and profile deletion never
        scan the keyspace. A counter costs bytes; a set of ids per profile
        would cost ~70 bytes per credential."""
        return f"{self.base}stats"

    @property
    def log(self) -> str:
        """Stream: the durable event log of this partition, one entry per
        event the commit script publishes (``worker.eventlog``). One stream
        per partition, not one in all: the commit script appends in the same
        atomic step as the write, and a script may touch only one slot."""
        return f"{self.base}log"

    @property
    def events(self) -> str:
        """Shard channel (SPUBLISH) of this partition's events on a Redis
        Cluster: hash-tagged like its keys, so the commit script publishes
        it on the node it runs on and the message stays on that shard."""
        return f"{self.base}events"

    @property
    def cred_pattern(self) -> str:
        """SCAN pattern of this partition's credentials (operator listings only)."""
        return f"{self.base}cred:*"


@dataclass(frozen=True, slots=True)
class Keyspace:
    """Key names for one installation (prefix + partition count)."""

    prefix: str = "refreshd:"
    partitions: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.partitions <= 16384:
            raise ValueError("partitions must be between 1 and 16384")
        if not self.prefix or any(c in self.prefix for c in "{} \n"):
            raise ValueError("prefix must be non-empty and free of braces and spaces")

    def partition_of(self, credential_id: str) -> Partition:
        """Stable across processes and Python versions (crc32, not hash())."""
        return self.partition(zlib.crc32(credential_id.encode()) % self.partitions)

    def partition(self, index: int) -> Partition:
        return _partition(self.prefix, index)

    def all_partitions(self) -> list[Partition]:
        return [self.partition(i) for i in range(self.partitions)]

    def profile(self, profile_id: str) -> str:
        return f"{self.prefix}profile:{profile_id}"

    @property
    def profiles(self) -> str:
        """Sorted set of profile ids (score 0: ordered by id) for paging."""
        return f"{self.prefix}profiles"

    @property
    def layout(self) -> str:
        """Hash recording the partition count the data was written with."""
        return f"{self.prefix}layout"

    @property
    def events(self) -> str:
        """Pub/sub channel: one JSON message per refresh outcome (one server,
        Sentinel; a cluster uses each partition's ``Partition.events``)."""
        return f"{self.prefix}events"

    def logs(self) -> list[str]:
        """Every partition's event log stream, in partition order (a cursor's
        positions follow the same order)."""
        return [p.log for p in self.all_partitions()]

    def rate_limit(self, profile_id: str) -> str:
        """String: a profile's cluster-wide GCRA state (``worker.clusterrate``).
        Hash-tagged by the profile (not a partition): one profile's limiter
        is one key in one slot, and busy profiles spread over the cluster."""
        return f"{self.prefix}ratelimit:{{{profile_id}}}"

    @property
    def refresh_horizon(self) -> str:
        """Sorted set: member = credential id, score = its refresh token's
        expiry (ms), for the horizon gauge only (``worker.horizon``)."""
        return f"{self.prefix}refresh_horizon"

    @property
    def wake(self) -> str:
        """Pub/sub channel: a credential became due earlier than workers think."""
        return f"{self.prefix}wake"


@cache
def _partition(prefix: str, index: int) -> Partition:
    """Built once: every spend and commit looks its partition up."""
    return Partition(index, f"{{{prefix}{index}}}:")
