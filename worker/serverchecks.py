"""What a Redis server must offer for refreshd's promise, checked at start and while running.

A refresh token may be sent only once its spend intent is durable; a
credential must never be evicted. Both depend on how the server is run, so
every process that opens the store reads the server's facts
(``inspect_server``), names what could go wrong (``find_hazards``) and
refuses to go on unless the operator accepted each hazard by name in
``REFRESHD_UNSAFE_REDIS`` (``check_hazards``). A running worker repeats the
inspection, because ``CONFIG SET`` can change the eviction policy or turn
the AOF off at any time, and exports what it finds as a gauge.

Hazards (the names ``REFRESHD_UNSAFE_REDIS`` takes):

* ``not_durable``: no AOF and no connected replica, so a spend intent can be
  made durable neither by ``WAITAOF`` nor by ``WAIT``. A crash restarts the
  server from its last RDB snapshot, which forgot the intent, and the next
  worker sends the same refresh token again (a double send).
* ``no_waitaof``: the AOF is on but the server is too old for ``WAITAOF``
  (Redis/Valkey 7.2), so nothing can confirm a spend reached the disk.
* ``eviction``: ``maxmemory-policy`` is not ``noeviction``: under memory
  pressure the server deletes credentials (an import "succeeds", the records
  are gone).
* ``policy_unknown``: ``CONFIG GET`` is refused (common on managed services),
  so the eviction policy cannot be read; the operator must check it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis

from worker.cluster import router_of
from worker.errors import ConfigError, StoreUnavailable
from worker.redisio import guard
from worker.store import Durability

__all__ = [
    "Hazard",
    "ServerFacts",
    "check_hazards",
    "combine",
    "durability_for",
    "find_hazards",
    "inspect_nodes",
    "inspect_server",
    "is_accepted",
]


class Hazard(StrEnum):
    NOT_DURABLE = "not_durable"
    NO_WAITAOF = "no_waitaof"
    EVICTION = "eviction"
    POLICY_UNKNOWN = "policy_unknown"


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What the server says about itself; ``policy`` is None when CONFIG is refused."""

    aof: bool
    replicas: int
    policy: str | None
    waitaof: bool
    version: str


async def inspect_server(client: aioredis.Redis) -> ServerFacts:
    """What the server says; on a cluster, what the *weakest* primary says
    (every node must keep the promise: a partition lives on one of them)."""
    return combine(list((await inspect_nodes(client)).values()))


async def inspect_nodes(client: aioredis.Redis) -> dict[str, ServerFacts]:
    """What each primary says, by ``host:port`` on a cluster; one server
    answers under the key ``""``."""
    router = router_of(client)
    if router is None:
        return {"": await _inspect_one(client)}
    try:
        return {node: await _inspect_one(router.client_at(node)) for node in router.primaries()}
    except StoreUnavailable:
        await router.refresh()  # a primary gone (a failover): the next check asks the new map
        raise


def combine(facts: list[ServerFacts]) -> ServerFacts:
    """The weakest of several servers' facts: the promise holds only if it
    holds on each."""
    policies = {f.policy for f in facts}
    return ServerFacts(
        aof=all(f.aof for f in facts),
        replicas=min(f.replicas for f in facts),
        policy=None if None in policies else next((p for p in sorted(policies, key=str)
                                                   if p != "noeviction"), "noeviction"),
        waitaof=all(f.waitaof for f in facts),
        version=min((f.version for f in facts), key=_version_key),
    )  # fmt: skip


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


async def _inspect_one(client: aioredis.Redis) -> ServerFacts:
    info: Mapping[str, Any] = await guard(client.info())  # server, persistence, replication
    try:
        config = await guard(client.config_get("maxmemory-policy"))
        policy: str | None = config.get("maxmemory-policy")
    except aioredis.ResponseError:
        policy = None  # CONFIG is disabled or renamed (managed services)
    return ServerFacts(
        aof=int(info.get("aof_enabled", 0)) == 1,
        replicas=int(info.get("connected_slaves", 0)),
        policy=policy,
        waitaof=await _has_waitaof(client),
        version=str(info.get("redis_version", "")),
    )


async def _has_waitaof(client: aioredis.Redis) -> bool:
    """Asks for nothing (0 local fsyncs, 0 replicas), so it answers at once
    wherever WAITAOF exists; an old server (or one with the command renamed
    away or denied by ACL) answers with an error."""
    try:
        await guard(client.execute_command("WAITAOF", 0, 0, 1))  # type: ignore[no-untyped-call]
    except aioredis.ResponseError:
        return False
    return True


def find_hazards(facts: ServerFacts, durability: str) -> dict[Hazard, str]:
    """Each hazard present, with one line saying what may go wrong.
    ``durability`` is REFRESHD_DURABILITY: ``none`` asks for no wait at all,
    so the durability hazards are that setting's own choice (see
    ``check_hazards``); ``replica`` never waits for the fsync."""
    found: dict[Hazard, str] = {}
    if durability == "none":
        found[Hazard.NOT_DURABLE] = (
            "REFRESHD_DURABILITY=none: spend intents wait for neither the fsync nor a replica, "
            "so after a crash the same refresh token can be sent twice"
        )
    elif not facts.aof and not facts.replicas:
        found[Hazard.NOT_DURABLE] = (
            "a spend intent cannot be made durable (appendonly is off and no replica is "
            "connected): after a crash the server restarts from its last snapshot and the "
            "same refresh token can be sent twice"
        )
    elif facts.aof and not facts.waitaof and durability in {"auto", "fsync"}:
        found[Hazard.NO_WAITAOF] = (
            f"the server (redis_version {facts.version or 'unknown'}) has no WAITAOF "
            "(Redis/Valkey 7.2+): nothing confirms a spend intent reached the disk before its "
            "refresh token is sent"
        )
    if facts.policy is None:
        found[Hazard.POLICY_UNKNOWN] = (
            "maxmemory-policy cannot be read (CONFIG GET is refused): if it is not noeviction, "
            "credentials can be evicted"
        )
    elif facts.policy != "noeviction":
        found[Hazard.EVICTION] = (
            f"maxmemory-policy is {facts.policy!r}, not 'noeviction': under memory pressure "
            "the server deletes credentials"
        )
    return found


def is_accepted(hazard: Hazard, accepted: Collection[str], durability: str) -> bool:
    """Named in REFRESHD_UNSAFE_REDIS; ``REFRESHD_DURABILITY=none`` is itself
    an explicit choice not to wait, so it accepts ``not_durable``."""
    return hazard in accepted or (hazard is Hazard.NOT_DURABLE and durability == "none")


def check_hazards(found: Mapping[Hazard, str], accepted: Collection[str], durability: str) -> None:
    """Refuse, in one line naming every hazard and the setting that accepts
    it, unless each one is accepted."""
    refused = [h for h in found if not is_accepted(h, accepted, durability)]
    if refused:
        problems = "; ".join(found[h] for h in refused)
        names = ",".join(sorted({*accepted, *refused}))
        raise ConfigError(
            f"refusing to use this Redis: {problems}. Fix the server, or set "
            f"REFRESHD_UNSAFE_REDIS={names} to run anyway"
        )


def durability_for(facts: ServerFacts, durability: str) -> Durability:
    """What a spend and a commit wait for. ``fsync`` and ``replica`` are
    promises the server must keep; ``auto`` takes what the server offers."""
    if durability == "fsync":
        if not facts.aof:
            raise ConfigError("REFRESHD_DURABILITY=fsync needs appendonly yes on the server")
        if not facts.waitaof:
            raise ConfigError(
                "REFRESHD_DURABILITY=fsync needs WAITAOF (Redis/Valkey 7.2 or newer); "
                f"the server reports redis_version {facts.version or 'unknown'}"
            )
        return Durability(fsync=True)
    if durability == "replica":
        if not facts.replicas:
            raise ConfigError("REFRESHD_DURABILITY=replica needs at least one connected replica")
        return Durability(replicas=1)
    if durability == "none":
        return Durability()
    return Durability(fsync=facts.aof and facts.waitaof, replicas=1 if facts.replicas else 0)
