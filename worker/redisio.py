"""Connecting to Redis, loading the Lua scripts, translating redis errors.

Scripts live as ``.lua`` files next to this module and are registered once
per client; redis-py's ``AsyncScript`` sends EVALSHA and reloads the source
on NOSCRIPT (after a restart or failover), so callers never see it. Each
credential script is sent with ``record.lua`` in front of it: the packed
credential record's layout lives in that one file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import hiredis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from worker.cluster import (
    CLUSTER_SCHEMES,
    connect_cluster,
    describe_cluster_url,
    parse_cluster_url,
)
from worker.errors import ConfigError, StoreUnavailable
from worker.redisurl import TLS_OPTIONS, parse_auth, parse_hosts, parse_options, tls_options

__all__ = [
    "ENCODING_ERRORS",
    "REDIS_UNAVAILABLE",
    "SENTINEL_SCHEMES",
    "Scripts",
    "SentinelTarget",
    "connect",
    "describe_url",
    "guard",
    "load_plain_script",
    "load_script",
    "load_scripts",
    "pack_command",
    "pack_evalsha",
    "parse_sentinel_url",
    "run_script",
    "script_source",
    "validate_url",
]

#: how every refreshd client turns text into bytes and back: UTF-8, with
#: a byte that is not UTF-8 read as a lone surrogate and written back as
#: that byte (``worker.codec``'s record form of an encrypted secret is raw
#: bytes; all other text refreshd stores is UTF-8, unchanged by this)
ENCODING_ERRORS = "surrogateescape"

# Errors that mean "the server is not there right now", never "bad input".
REDIS_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.TryAgainError,
    redis_errors.ReadOnlyError,
    # a cluster mid-failover: a slot without a live primary, no node answering
    redis_errors.ClusterError,  # redirections exhausted mid-migration, among others
    redis_errors.ClusterDownError,
    redis_errors.MasterDownError,
    redis_errors.SlotNotCoveredError,
    redis_errors.RedisClusterException,
    OSError,
)


async def guard(awaitable: Awaitable[Any]) -> Any:
    """Await a Redis call, turning connection-level failures into
    ``StoreUnavailable`` (the one error callers retry on). The result is
    ``Any`` on purpose: with ``decode_responses`` redis-py's declared
    ``bytes | str`` unions are wrong, so callers annotate what they read."""
    try:
        return await awaitable
    except REDIS_UNAVAILABLE as exc:
        raise StoreUnavailable(f"redis unavailable: {type(exc).__name__}") from exc


@dataclass(frozen=True, slots=True)
class Scripts:
    claim: AsyncScript
    spend: AsyncScript
    commit: AsyncScript
    upsert: AsyncScript
    delete: AsyncScript
    resume: AsyncScript
    get: AsyncScript


async def run_script(
    client: aioredis.Redis, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]
) -> Any:
    """One script call on one pooled connection, packed by hiredis.

    For the calls whose latency someone waits on (a consumer's token read):
    redis-py's generic command path (its packer in Python, retry wrapper,
    per-step timeouts and observability hooks) cost a seventh of the
    client's CPU per read (197 -> 170 us, interleaved A/B on loopback).
    The socket timeout still bounds the reply. A connection whose reply
    was not read in full (an error, a cancelled caller) is closed rather
    than handed back out of step; NOSCRIPT (a
    restarted server) loads the script and runs it again, since it did
    not run."""
    try:
        return await _run_once(client.connection_pool, script.sha, keys, args)
    except redis_errors.NoScriptError:
        script.sha = await guard(client.script_load(script.script))
    return await _run_once(client.connection_pool, script.sha, keys, args)


def pack_command(*parts: Any) -> bytes:
    """One command in RESP, packed by hiredis. hiredis encodes text as
    strict UTF-8, and a secret in its record form (``worker.codec``) read
    back from Redis is text that holds raw bytes through ``surrogateescape``:
    a command carrying one is packed again with each text as the bytes it
    stands for, which is what redis-py's own encoder does with
    ``ENCODING_ERRORS``."""
    try:
        packed: bytes = hiredis.pack_command(parts)
    except UnicodeEncodeError:
        packed = hiredis.pack_command(tuple(_wire(part) for part in parts))
    return packed


def pack_evalsha(sha: str, keys: Sequence[str], args: Sequence[Any]) -> bytes:
    """One EVALSHA (``pack_command``)."""
    return pack_command("EVALSHA", sha, len(keys), *keys, *args)


def _wire(part: Any) -> Any:
    return part.encode("utf-8", ENCODING_ERRORS) if isinstance(part, str) else part


async def _run_once(pool: Any, sha: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
    command = pack_evalsha(sha, keys, args)
    conn = await guard(pool.get_connection())
    try:
        await guard(conn.send_packed_command(command))
        return await guard(conn.read_response())
    except redis_errors.ResponseError:
        raise  # a whole error reply was read: the connection is in step
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)


def script_source(name: str) -> str:
    """The exact source sent for a credential script: ``record.lua`` in
    front of ``worker/scripts/<name>.lua`` (non-Python consumers load the
    same text, so its SHA is the one the Python client uses)."""
    folder = resources.files("worker") / "scripts"
    return (folder / "record.lua").read_text() + (folder / f"{name}.lua").read_text()


def load_script(client: aioredis.Redis, name: str) -> AsyncScript:
    """One credential script (see ``script_source``); ``worker.client``
    loads its own this way."""
    return client.register_script(script_source(name))


def load_plain_script(client: aioredis.Redis, name: str) -> AsyncScript:
    """A script that does not read credential records (no ``record.lua``
    in front): ``worker/scripts/<name>.lua`` as it is."""
    return client.register_script(
        (resources.files("worker") / "scripts" / f"{name}.lua").read_text()
    )


def load_scripts(client: aioredis.Redis) -> Scripts:
    def load(name: str) -> AsyncScript:
        return load_script(client, name)

    return Scripts(
        claim=load("claim"),
        spend=load("spend"),
        commit=load("commit"),
        upsert=load("upsert"),
        delete=load("delete"),
        resume=load("resume"),
        get=load("get"),
    )


@asynccontextmanager
async def connect(
    url: str, *, max_connections: int = 64, **kwargs: Any
) -> AsyncIterator[aioredis.Redis]:
    """One client (bounded pool) per process. Socket timeouts keep a paused or
    partitioned server from hanging a worker forever; health checks catch
    half-open connections after a failover.

    ``redis+sentinel://[user:password@]host:port[,host:port...]/service`` asks
    Sentinel for the current primary and follows failovers; see
    ``parse_sentinel_url`` for TLS (``rediss+sentinel://``) and the options.
    ``redis+cluster://[user:password@]host:port[,host:port...]`` is a Redis
    Cluster (``worker.cluster``; ``rediss+cluster://`` for TLS)."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": ENCODING_ERRORS,
        "socket_timeout": kwargs.pop("socket_timeout", 10.0),
        "socket_connect_timeout": kwargs.pop("socket_connect_timeout", 5.0),
        "health_check_interval": kwargs.pop("health_check_interval", 30),
        # No silent retries: a spend or commit whose reply was lost may have
        # run, and only the caller knows how to find out (see Refresher).
        "retry": Retry(NoBackoff(), 0),
    }
    pool_timeout = kwargs.pop("pool_timeout", 10.0)
    options.update(kwargs)
    validate_url(url)
    if url.lower().startswith(CLUSTER_SCHEMES):
        async with (
            connect_cluster(
                url, options, max_connections=max_connections, pool_timeout=pool_timeout
            ) as cluster,
            _translated(url),
        ):
            yield cluster
        return
    sentinel: Sentinel | None = None
    if url.startswith(SENTINEL_SCHEMES):
        target = parse_sentinel_url(url)
        # The sentinels get the same timeouts, retries (none: discovery already
        # tries each sentinel in turn) and TLS as the primary; redis-py would
        # give them none of it once sentinel_kwargs is passed.
        timeouts = {k: v for k, v in options.items() if k.startswith("socket_") or k == "retry"}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            target.hosts,
            sentinel_kwargs={**timeouts, **target.sentinel_auth, **target.tls},
            **options,
            **target.auth,
            **target.tls,
        )
        # Sentinel pools do not block when full: size them past the busiest
        # moment instead of queueing (a full pool would read as an outage).
        client = sentinel.master_for(target.service, max_connections=max_connections * 4)
    else:
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=pool_timeout, **options
            )
        except (ValueError, TypeError) as exc:  # a bad port, an unknown option
            raise ConfigError(f"REFRESHD_REDIS_URL is not a usable Redis URL: {exc}") from None
        # A blocking pool makes bursts of concurrent refreshes queue for a
        # connection instead of failing with "Too many connections".
        client = aioredis.Redis.from_pool(pool)  # the client owns (and closes) the pool
    try:
        async with _translated(url):
            yield client
    finally:
        await client.aclose()
        if sentinel is not None:
            for node in sentinel.sentinels:
                await node.aclose()


@asynccontextmanager
async def _translated(url: str) -> AsyncIterator[None]:
    """Errors leaving a connection's scope say where the server was."""
    try:
        yield
    except StoreUnavailable as exc:
        raise StoreUnavailable(f"{exc} (at {describe_url(url)})") from exc
    except redis_errors.InvalidResponse as exc:
        # an HTTP server or another service on the port: its first byte is
        # not a RESP reply
        raise StoreUnavailable(
            f"the server at {describe_url(url)} does not speak the Redis protocol "
            "(is REFRESHD_REDIS_URL pointing at another service?)"
        ) from exc


SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
_SCHEMES = ("redis://", "rediss://", "unix://", *SENTINEL_SCHEMES, *CLUSTER_SCHEMES)


def validate_url(url: str) -> None:
    """A URL redis-py would refuse with a ValueError deep in a pool (or
    misread: ``http://`` is not Redis) is a ConfigError naming the schemes;
    the message never repeats the URL, which may carry a password."""
    if not url.lower().startswith(_SCHEMES):
        scheme = url.partition("://")[0] if "://" in url else "no scheme"
        raise ConfigError(
            f"REFRESHD_REDIS_URL must start with {', '.join(_SCHEMES)} (got {scheme[:20]!r})"
        )
    if url.lower().startswith(CLUSTER_SCHEMES):
        parse_cluster_url(url)  # its errors are one line each, at start


def describe_url(url: str) -> str:
    """Where a URL points, without its password: ``host:port``, the socket
    path, or the sentinels and service."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path or "a unix socket"
    hostlist = parts.netloc.rpartition("@")[2] or "localhost"
    if url.lower().startswith(CLUSTER_SCHEMES):
        return describe_cluster_url(url)
    if url.startswith(SENTINEL_SCHEMES):
        return f"sentinels {hostlist} (service {parts.path.strip('/') or '?'})"
    return hostlist if ":" in hostlist else f"{hostlist}:6379"


_SENTINEL_OPTIONS = frozenset({"sentinel_password", "sentinel_username", *TLS_OPTIONS})


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """What a Sentinel URL says: where the sentinels are, which service,
    credentials for the primary and for the sentinels, and the TLS options
    (empty when plain) used for both."""

    hosts: list[tuple[str, int]]
    service: str
    auth: dict[str, str]
    sentinel_auth: dict[str, str]
    tls: dict[str, Any]


def parse_sentinel_url(url: str) -> SentinelTarget:
    """``redis+sentinel://`` (plain) or ``rediss+sentinel://`` (TLS to the
    sentinels and the primary, like ``rediss://``)
    ``[user:password@]host:port[,host:port...]/service`` with the options
    ``sentinel_password``, ``sentinel_username``, ``ssl=true`` (the same as
    ``rediss+``), ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` (paths),
    ``ssl_cert_reqs`` (required, optional, none) and ``ssl_check_hostname``.
    An unknown option, or a TLS option on a plain URL, is an error: a
    silently ignored ``ssl=true`` would send the password in clear."""
    parts = urlsplit(url)
    creds, _, hostlist = parts.netloc.rpartition("@")
    hosts = parse_hosts(
        hostlist,
        default_port="26379",
        bad=lambda item: f"sentinel address {item!r} is not host:port",
        check_range=False,
    )
    service = parts.path.strip("/")
    if not service:
        raise ConfigError("a redis+sentinel:// URL names the service: .../mymaster")
    query = parse_options(parts, _SENTINEL_OPTIONS, "sentinel")
    sentinel_auth = {
        key: query[f"sentinel_{key}"]
        for key in ("username", "password")
        if f"sentinel_{key}" in query
    }
    tls = tls_options(parts.scheme, query, what="sentinel")
    return SentinelTarget(hosts, service, parse_auth(creds), sentinel_auth, tls)
