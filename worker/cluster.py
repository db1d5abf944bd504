"""Redis/Valkey Cluster: the ``redis+cluster://`` URL, the client, per-node routing.

Which client, and why. redis-py's ``RedisCluster`` routes single-key
commands, follows MOVED and ASK, re-reads the slot map after a failover,
runs SCAN on every primary and offers sharded pub/sub: every ordinary
command refreshd sends (profiles, layout, counters, pipelines of reads,
the rate limiter, scripts called one at a time) goes through it unchanged.
What it cannot do is the group commit: ``worker.batcher`` writes N EVALSHA
and one WAITAOF/WAIT on *one* connection, because WAITAOF acknowledges the
writes of the connection it is sent on, and a ``RedisCluster`` pipeline
neither keeps a connection nor knows where a keyless WAITAOF should go.
So next to it this module keeps one plain single-node client (its own
bounded pool) per primary, chosen by a partition's slot from the cluster
client's slot map (``ClusterRouter``): the batcher runs per node on those
(``worker.clusterbatch``), and durability acks are per node and per
connection exactly as on one server.

Each partition is one hash tag, hence one slot, hence one node: every
script of a partition runs where its keys live.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import anyio
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection

from worker.errors import ConfigError, StoreUnavailable
from worker.logs import get_logger
from worker.redisurl import TLS_OPTIONS, parse_auth, parse_hosts, parse_options, tls_options

__all__ = [
    "CLUSTER_SCHEMES",
    "ClusterRouter",
    "ClusterTarget",
    "connect_cluster",
    "describe_cluster_url",
    "parse_cluster_url",
    "router_of",
]

log = get_logger("refreshd.cluster")

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    """What a cluster URL says: seed nodes (any reachable one will do: the
    rest of the cluster is discovered), credentials, TLS options (empty
    when plain)."""

    hosts: list[tuple[str, int]]
    auth: dict[str, str]
    tls: dict[str, Any]


def parse_cluster_url(url: str) -> ClusterTarget:
    """``redis+cluster://`` (plain) or ``rediss+cluster://`` (TLS, like
    ``rediss://``) ``[user:password@]host:port[,host:port...]`` with the
    options ``ssl=true`` (the same as ``rediss+``), ``ssl_ca_certs``,
    ``ssl_certfile``, ``ssl_keyfile`` (paths), ``ssl_cert_reqs`` (required,
    optional, none) and ``ssl_check_hostname``. A cluster has database 0
    only, so a path other than ``/`` or ``/0`` is an error, as is an unknown
    option or a TLS option on a plain URL (a silently ignored ``ssl=true``
    would send the password in clear)."""
    parts = urlsplit(url)
    creds, _, hostlist = parts.netloc.rpartition("@")
    hosts = parse_hosts(
        hostlist,
        default_port="6379",
        bad=lambda item: f"cluster node address {item.strip()[:60]!r} is not host:port",
        check_range=True,
    )
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigError("a Redis Cluster has database 0 only: drop the /db from the URL")
    query = parse_options(parts, TLS_OPTIONS, "cluster")
    return ClusterTarget(hosts, parse_auth(creds), tls_options(parts.scheme, query, what="cluster"))


def describe_cluster_url(url: str) -> str:
    """Where a cluster URL points, without its password."""
    hostlist = urlsplit(url).netloc.rpartition("@")[2] or "?"
    return f"cluster nodes {hostlist}"


class ClusterRouter:
    """One plain client per primary, picked by a key's slot.

    The slot map is the cluster client's (``RedisCluster.nodes_manager``);
    ``refresh`` re-reads it after a MOVED or a node that stopped answering
    (a failover), at most once per ``min_refresh_s`` however many calls
    noticed at the same time."""

    def __init__(
        self,
        cluster: RedisCluster,
        node_options: dict[str, Any],
        *,
        max_connections: int,
        pool_timeout: float,
        min_refresh_s: float = 0.2,
    ) -> None:
        self.cluster = cluster
        self._options = node_options
        self.max_connections = max_connections
        self._pool_timeout = pool_timeout
        self._clients: dict[str, aioredis.Redis] = {}
        self._refresh_lock = anyio.Lock()
        self._refreshed_at = 0.0
        self._min_refresh_s = min_refresh_s

    def slot(self, key: str) -> int:
        return int(self.cluster.keyslot(key))

    def address_of(self, key: str) -> str:
        """``host:port`` of the primary that owns ``key``'s slot now."""
        node = self.cluster.nodes_manager.get_node_from_slot(self.slot(key))
        return str(node.name)

    def client_for(self, key: str) -> aioredis.Redis:
        return self.client_at(self.address_of(key))

    def client_at(self, address: str) -> aioredis.Redis:
        """The single-node client of ``host:port`` (made on first use)."""
        client = self._clients.get(address)
        if client is None:
            host, _, port = address.rpartition(":")
            options = dict(self._options)
            if options.pop("ssl", False):
                options["connection_class"] = SSLConnection
            pool = aioredis.BlockingConnectionPool(
                host=host,
                port=int(port),
                max_connections=self.max_connections,
                timeout=self._pool_timeout,
                **options,
            )
            client = self._clients[address] = aioredis.Redis.from_pool(pool)
        return client

    def primaries(self) -> list[str]:
        """``host:port`` of every primary in the current slot map."""
        return sorted(str(node.name) for node in self.cluster.get_primaries())

    async def refresh(self, *, since: float | None = None) -> None:
        """Re-read the slot map, unless one was read after ``since`` (a
        monotonic time: when the caller saw the error) or very recently."""
        async with self._refresh_lock:
            now = time.monotonic()
            if since is not None and self._refreshed_at >= since:
                return
            if now - self._refreshed_at < self._min_refresh_s:
                return
            self._refreshed_at = now
            try:
                await self.cluster.nodes_manager.initialize()
            except (redis_errors.RedisError, redis_errors.RedisClusterException, OSError) as exc:
                log.warning("cluster.slots_unavailable", error=type(exc).__name__)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


_ROUTERS: weakref.WeakKeyDictionary[Any, ClusterRouter] = weakref.WeakKeyDictionary()


def router_of(client: Any) -> ClusterRouter | None:
    """The router of a cluster client (None for a single-server client):
    code that must reach one node (group commit, WAITAOF, server checks,
    per-slot transactions) asks for it."""
    return _ROUTERS.get(client)


@asynccontextmanager
async def connect_cluster(
    url: str,
    options: dict[str, Any],
    *,
    max_connections: int,
    pool_timeout: float,
) -> AsyncIterator[aioredis.Redis]:
    """A ``RedisCluster`` client for ``url`` (the slot map read from the
    first seed that answers) and its ``ClusterRouter``.

    It is typed as ``aioredis.Redis``: it answers the same commands, and the
    few places that need a single node ask ``router_of`` for one. No
    retries, as for a single server: a spend or commit whose reply was lost
    may have run, and only the caller knows how to find out; redirections
    (MOVED, ASK) are not retries and are still followed."""
    target = parse_cluster_url(url)
    node_options = {**options, **target.auth, **target.tls}
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
        # its pools do not block when full (MaxConnectionsError): size them
        # past the busiest moment, as for Sentinel; the hot paths (scripts,
        # group commit) use the router's blocking pools
        max_connections=max_connections * 4,
        **node_options,
    )
    router = ClusterRouter(
        cluster, node_options, max_connections=max_connections, pool_timeout=pool_timeout
    )
    _ROUTERS[cluster] = router
    try:
        try:
            await cluster.initialize()
        except (redis_errors.RedisError, redis_errors.RedisClusterException, OSError) as exc:
            # redis-py's message says why (refused, an ACL denying CLUSTER
            # SLOTS, ...) after "node: "; it never holds the password
            why = str(exc).rpartition("node: ")[2][:160]
            raise StoreUnavailable(
                f"redis cluster unavailable: {type(exc).__name__}: {why} "
                f"(at {describe_cluster_url(url)})"
            ) from exc
        yield cast(aioredis.Redis, cluster)
    finally:
        await router.aclose()
        await cluster.aclose()
