"""Wiring: settings in, a running worker (or a store for the CLI) out.

Everything is built here and passed explicitly; nothing below this module
reads the environment.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import anyio
import redis.asyncio as aioredis

from worker.codec import PlainCodec
from worker.embedded import ensure_embedded
from worker.errors import ConfigError, StoreUnavailable
from worker.health import HealthServer, Heartbeat
from worker.keys import Keyspace
from worker.logs import get_logger
from worker.metrics import Metrics
from worker.profiles import ProfileCache, ProfileStore
from worker.redisio import connect, guard
from worker.refresher import Refresher, RefreshTiming
from worker.runner import Worker, WorkerConfig
from worker.scheduling import Schedule
from worker.settings import Settings
from worker.spool import Spool, replay_spool
from worker.store import Durability, Store
from worker.transport import make_http_client

__all__ = [
    "build_refresher",
    "build_worker",
    "open_store",
    "run_worker",
    "schedule_from",
    "tune_gc",
]

log = get_logger("refreshd")


async def resolve_redis_url(settings: Settings, *, announce: bool = True) -> str:
    if settings.redis_url:
        return settings.redis_url
    server = await anyio.to_thread.run_sync(ensure_embedded, settings.data_dir)
    (log.info if announce or server.started else log.debug)(
        "redis.embedded",
        data_dir=str(settings.data_dir),
        started=server.started,
        pid=server.pid,
        note="REFRESHD_REDIS_URL is not set: using the embedded Valkey server",
    )
    return server.url


async def probe_durability(
    client: aioredis.Redis, settings: Settings, *, announce: bool = True
) -> Durability:
    """Decide what a commit waits for, and warn (or refuse) when the server
    could lose credentials: eviction or no persistence breaks integrations."""
    persistence = await guard(client.info("persistence"))
    replication = await guard(client.info("replication"))
    aof = int(persistence.get("aof_enabled", 0)) == 1
    replicas = int(replication.get("connected_slaves", 0))
    problems: list[str] = []
    try:
        policy = (await guard(client.config_get("maxmemory-policy"))).get("maxmemory-policy")
    except aioredis.ResponseError:
        policy = None  # managed services often forbid CONFIG; say so below
    if policy is not None and policy != "noeviction":
        problems.append(f"maxmemory-policy is {policy!r}; credentials may be evicted")
    if not aof and not persistence.get("rdb_last_save_time"):
        problems.append("persistence looks off; a restart would lose every credential")
    if not aof:
        problems.append("appendonly is off: commits cannot wait for fsync (WAITAOF)")
    for problem in problems:
        if settings.strict_server:
            raise ConfigError(f"refusing to start (REFRESHD_STRICT_SERVER): {problem}")
        # the worker says it loudly; operator commands would only add noise
        (log.warning if announce else log.debug)("redis.unsafe_config", problem=problem)
    mode = settings.durability
    if mode == "fsync" and not aof:
        raise ConfigError("REFRESHD_DURABILITY=fsync needs appendonly yes on the server")
    if mode == "replica" and not replicas:
        raise ConfigError("REFRESHD_DURABILITY=replica needs at least one connected replica")
    return Durability(
        fsync=mode == "fsync" or (mode == "auto" and aof),
        replicas=1 if mode == "replica" or (mode == "auto" and replicas) else 0,
    )


@asynccontextmanager
async def open_store(
    settings: Settings, *, pool_size: int = 32, announce: bool = False
) -> AsyncIterator[Store]:
    url = await resolve_redis_url(settings, announce=announce)
    async with connect(url, max_connections=pool_size) as client:
        durability = await probe_durability(client, settings, announce=announce)
        store = Store(client, Keyspace(settings.prefix, settings.partitions), PlainCodec(),
                      durability)  # fmt: skip
        await store.check_layout()
        yield store


def schedule_from(settings: Settings) -> Schedule:
    return Schedule(
        lead_min_s=settings.lead_min_s,
        lead_fraction=settings.lead_fraction,
        lead_max_s=settings.lead_max_s,
        backoff_base_s=settings.backoff_base_s,
        backoff_max_s=settings.backoff_max_s,
    )


def build_refresher(
    settings: Settings, store: Store, http: aiohttp.ClientSession, metrics: Metrics
) -> Refresher:
    return Refresher(
        store=store,
        profiles=ProfileCache(ProfileStore(store)),
        http=http,
        schedule=schedule_from(settings),
        metrics=metrics,
        timing=RefreshTiming(
            lease_ms=int(settings.lease_s * 1000),
            margin_ms=int(settings.spend_margin_s * 1000),
        ),
    )


def build_worker(
    settings: Settings, store: Store, refresher: Refresher, metrics: Metrics
) -> Worker:
    return Worker(
        WorkerConfig(
            worker_id=settings.worker_id,
            concurrency=settings.concurrency,
            claim_batch=settings.claim_batch,
            lease_ms=int(settings.lease_s * 1000),
            idle_wakeup_s=settings.idle_wakeup_s,
            drain_grace_s=settings.drain_grace_s,
        ),
        store=store,
        refresher=refresher,
        metrics=metrics,
    )


def tune_gc() -> None:
    """For a long-running worker process (``refreshd run``), not a library
    caller. Every refresh allocates a few hundred short-lived containers
    (futures, frames, dicts), so with CPython's default threshold of 700
    the cyclic collector ran every few refreshes and rescanned the young
    generation each time: measured on the benchmark, 15-20% of the worker's
    CPU. A threshold of 50,000 collects the same garbage in far fewer passes
    (a few MB held in between). ``gc.freeze`` moves what start-up built
    (modules, settings, the connection pools) out of the collector's sight
    for good, so the rarer full collections do not rescan it either."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def run_worker(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    task_status: anyio.abc.TaskStatus[Worker] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """`refreshd run`: until SIGTERM/SIGINT, then drain and return."""
    metrics = metrics or Metrics()
    pool = min(max(settings.concurrency // 4, 8), 128)
    async with (
        open_store(settings, pool_size=pool) as store,
        make_http_client(max_connections=settings.concurrency) as http,
    ):
        spool = Spool(settings.spool_path, store.codec)  # commits a stopped worker left
        await replay_spool(spool, store, metrics)  # before any claim: see worker.spool
        refresher = build_refresher(settings, store, http, metrics)
        refresher.spool = spool
        worker = build_worker(settings, store, refresher, metrics)
        heartbeat = Heartbeat()

        async def ready() -> bool:
            return not worker.draining and await store.ping()

        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat.run)
            if settings.durability == "auto":
                tg.start_soon(_follow_durability, store, settings)
            if settings.http_port:
                health = HealthServer(
                    settings.http_host,
                    settings.http_port,
                    metrics.registry,
                    alive=lambda: heartbeat.alive(10.0),
                    ready=ready,
                )
                await tg.start(health.serve)
            tg.start_soon(_stop_on_signal, worker)
            log.info("worker.started", worker_id=settings.worker_id,
                     concurrency=settings.concurrency)  # fmt: skip
            task_status.started(worker)
            await worker.run()
            tg.cancel_scope.cancel()


async def _follow_durability(store: Store, settings: Settings, interval_s: float = 5.0) -> None:
    """In ``auto`` mode, what a commit waits for follows the server: after a
    failover the promoted primary may have no replica yet, and waiting for
    one that does not exist would stop every refresh."""
    while True:
        await anyio.sleep(interval_s)
        try:
            current = await probe_durability(store.client, settings, announce=False)
        except StoreUnavailable:
            continue
        if current != store.durability:
            log.warning("redis.durability_changed", fsync=current.fsync, replicas=current.replicas)
            store.durability = current


async def _stop_on_signal(worker: Worker) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("worker.signal", signal=signal.Signals(signum).name)
            worker.stop()
