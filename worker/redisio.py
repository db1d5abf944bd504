"""Connecting to Redis, loading the Lua scripts, translating redis errors.

Scripts live as ``.lua`` files next to this module and are registered once
per client; redis-py's ``AsyncScript`` sends EVALSHA and reloads the source
on NOSCRIPT (after a restart or failover), so callers never see it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from worker.errors import StoreUnavailable

__all__ = ["REDIS_UNAVAILABLE", "Scripts", "connect", "guard", "load_scripts"]

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


def load_scripts(client: aioredis.Redis) -> Scripts:
    folder = resources.files("worker") / "scripts"

    def load(name: str) -> AsyncScript:
        return client.register_script((folder / f"{name}.lua").read_text())

    return Scripts(
        claim=load("claim"),
        spend=load("spend"),
        commit=load("commit"),
        upsert=load("upsert"),
        delete=load("delete"),
        resume=load("resume"),
    )


@asynccontextmanager
async def connect(
    url: str, *, max_connections: int = 64, **kwargs: Any
) -> AsyncIterator[aioredis.Redis]:
    """One client (bounded pool) per process. Socket timeouts keep a paused or
    partitioned server from hanging a worker forever; health checks catch
    half-open connections after a failover."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        max_connections=max_connections,
        timeout=kwargs.pop("pool_timeout", 10.0),
        socket_timeout=kwargs.pop("socket_timeout", 10.0),
        socket_connect_timeout=kwargs.pop("socket_connect_timeout", 5.0),
        health_check_interval=kwargs.pop("health_check_interval", 30),
        # No silent retries: a spend or commit whose reply was lost may have
        # run, and only the caller knows how to find out (see Refresher).
        retry=Retry(NoBackoff(), 0),
        **kwargs,
    )
    # A blocking pool makes bursts of concurrent refreshes queue for a
    # connection instead of failing with "Too many connections".
    client = aioredis.Redis.from_pool(pool)  # the client owns (and closes) the pool
    try:
        yield client
    finally:
        await client.aclose()
