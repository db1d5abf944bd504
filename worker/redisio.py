"""Connecting to Redis, loading the Lua scripts, translating redis errors.

Scripts live as ``.lua`` files next to this module and are registered once
per client; redis-py's ``AsyncScript`` sends EVALSHA and reloads the source
on NOSCRIPT (after a restart or failover), so callers never see it. Each
credential script is sent with ``record.lua`` in front of it: the packed
credential record's layout lives in that one file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from worker.errors import ConfigError, StoreUnavailable

__all__ = [
    "REDIS_UNAVAILABLE",
    "Scripts",
    "connect",
    "guard",
    "load_scripts",
    "parse_sentinel_url",
]

# Errors that mean "the server is not there right now", never "bad input".
REDIS_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.TryAgainError,
    redis_errors.ReadOnlyError,
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


def load_scripts(client: aioredis.Redis) -> Scripts:
    folder = resources.files("worker") / "scripts"
    record = (folder / "record.lua").read_text()

    def load(name: str) -> AsyncScript:
        return client.register_script(record + (folder / f"{name}.lua").read_text())

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
    Sentinel for the current primary and follows failovers (``?sentinel_password=``
    when the sentinels have their own)."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": kwargs.pop("socket_timeout", 10.0),
        "socket_connect_timeout": kwargs.pop("socket_connect_timeout", 5.0),
        "health_check_interval": kwargs.pop("health_check_interval", 30),
        # No silent retries: a spend or commit whose reply was lost may have
        # run, and only the caller knows how to find out (see Refresher).
        "retry": Retry(NoBackoff(), 0),
    }
    pool_timeout = kwargs.pop("pool_timeout", 10.0)
    options.update(kwargs)
    sentinel: Sentinel | None = None
    if url.startswith("redis+sentinel://"):
        hosts, service, auth, sentinel_auth = parse_sentinel_url(url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs=sentinel_auth, **options, **auth
        )
        # Sentinel pools do not block when full: size them past the busiest
        # moment instead of queueing (a full pool would read as an outage).
        client = sentinel.master_for(service, max_connections=max_connections * 4)
    else:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout, **options
        )
        # A blocking pool makes bursts of concurrent refreshes queue for a
        # connection instead of failing with "Too many connections".
        client = aioredis.Redis.from_pool(pool)  # the client owns (and closes) the pool
    try:
        yield client
    finally:
        await client.aclose()
        if sentinel is not None:
            for node in sentinel.sentinels:
                await node.aclose()


def parse_sentinel_url(
    url: str,
) -> tuple[list[tuple[str, int]], str, dict[str, str], dict[str, str]]:
    """(sentinel hosts, service name, primary auth, sentinel auth)."""
    parts = urlsplit(url)
    creds, _, hostlist = parts.netloc.rpartition("@")
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item, "", "26379")
        if not host or not port.isdigit():
            raise ConfigError(f"sentinel address {item!r} is not host:port")
        hosts.append((host.strip("[]"), int(port)))
    service = parts.path.strip("/")
    if not service:
        raise ConfigError("a redis+sentinel:// URL names the service: .../mymaster")
    auth: dict[str, str] = {}
    if creds:
        user, _, password = creds.partition(":")
        if user:
            auth["username"] = unquote(user)
        if password:
            auth["password"] = unquote(password)
    query = parse_qs(parts.query)
    sentinel_auth = (
        {"password": query["sentinel_password"][0]} if "sentinel_password" in query else {}
    )
    return hosts, service, auth, sentinel_auth
