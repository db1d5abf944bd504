"""Wiring: settings in, a running worker (or a store for the CLI) out.

Everything is built here and passed explicitly; nothing below this module
reads the environment.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.codec import PlainCodec
from worker.embedded import ensure_embedded
from worker.errors import StoreUnavailable
from worker.eventlog import Retention
from worker.health import HealthServer, Heartbeat
from worker.horizon import Horizon
from worker.keys import Keyspace
from worker.logs import get_logger
from worker.metrics import Metrics
from worker.profiles import ProfileCache, ProfileStore
from worker.redisio import connect
from worker.refresher import Refresher, RefreshTiming
from worker.runner import Worker, WorkerConfig
from worker.scheduling import Schedule
from worker.serverchecks import (
    Hazard,
    ServerFacts,
    check_hazards,
    combine,
    durability_for,
    find_hazards,
    inspect_nodes,
    inspect_server,
    is_accepted,
)
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
    "watch_server",
]

log = get_logger("refreshd")


async def resolve_redis_url(settings: Settings, *, announce: bool = True) -> str:
    if settings.redis_url:
        return settings.redis_url
    server = await anyio.to_thread.run_sync(ensure_embedded, settings.data_dir)
    _warn_of_legacy_data_dir(settings)
    # "started" or "joined": a second process must say it shares the server
    (log.info if announce or server.started else log.debug)(
        "redis.embedded.started" if server.started else "redis.embedded.joined",
        data_dir=str(server.data_dir),
        started=server.started,
        pid=server.pid,
        note="REFRESHD_REDIS_URL is not set: using the embedded Valkey server "
        "(`refreshd server info` shows how a consumer connects)",
    )
    return server.url


def _warn_of_legacy_data_dir(settings: Settings) -> None:
    """Before the default data directory was per user it was ``.refreshd``
    in the working directory: credentials imported there are not lost, but
    the shared server does not hold them, so say where they are."""
    legacy = Path(".refreshd")
    if (legacy / "embedded.json").exists() and not _same_path(legacy, settings.data_dir):
        log.warning(
            "redis.embedded.legacy_data_dir",
            legacy_dir=str(legacy.absolute()),
            data_dir=str(settings.data_dir),
            note="data from an earlier release's default (.refreshd in the working directory) "
            "is not in the shared server; set REFRESHD_DATA_DIR=.refreshd to use it",
        )


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


async def probe_durability(
    client: aioredis.Redis, settings: Settings, *, refuse: bool = True
) -> Durability:
    """Decide what a spend and a commit wait for, after refusing a server
    that could send a refresh token twice or lose credentials (see
    ``worker.serverchecks``) unless the operator accepted each hazard by
    name; each accepted one is logged at warning level on every start."""
    facts = await inspect_server(client)
    # An explicit REFRESHD_DURABILITY the server cannot keep is named first:
    # no hazard setting could make it work.
    durability = durability_for(facts, settings.durability)
    found = find_hazards(facts, settings.durability)
    if refuse:
        check_hazards(found, settings.unsafe_redis, settings.durability)
    for hazard, risk in found.items():
        log.warning(
            "redis.unsafe_accepted" if refuse else "redis.unsafe_config",
            hazard=str(hazard),
            risk=risk,
            accepted=is_accepted(hazard, settings.unsafe_redis, settings.durability),
        )
    return durability


@asynccontextmanager
async def open_store(
    settings: Settings,
    *,
    pool_size: int = 32,
    announce: bool = False,
    refuse_unsafe: bool = True,
) -> AsyncIterator[Store]:
    """Every command that writes goes through the same server check as the
    worker (an import under an evicting policy would report records that
    are gone); ``refuse_unsafe=False`` is for read-only commands, which
    warn instead so that an operator can still look at an unsafe Redis."""
    url = await resolve_redis_url(settings, announce=announce)
    async with connect(url, max_connections=pool_size) as client:
        durability = await probe_durability(client, settings, refuse=refuse_unsafe)
        store = Store(client, Keyspace(settings.prefix, settings.partitions), PlainCodec(),
                      durability, Retention.from_settings(settings))  # fmt: skip
        if store.router is not None and settings.durability == "auto":
            _follow_node_durability(store, await inspect_nodes(client))
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
            rate_wait_max_s=settings.lease_s / 3,
        ),
        ca_file=settings.ca_file,
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
        open_store(settings, pool_size=pool, announce=True) as store,
        make_http_client(
            max_connections=settings.concurrency,
            max_per_host=settings.max_connections_per_host,
            ca_file=settings.ca_file,
        ) as http,
    ):
        # commits a stopped worker left, of this prefix only
        spool = Spool(settings.spool_path, store.codec, scope=settings.prefix)
        await replay_spool(spool, store, metrics)  # before any claim: see worker.spool
        refresher = build_refresher(settings, store, http, metrics)
        refresher.spool = spool
        worker = build_worker(settings, store, refresher, metrics)
        heartbeat = Heartbeat()

        async def ready() -> bool:
            return not worker.draining and await store.ping()

        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat.run)
            await tg.start(watch_server, store, settings, metrics)
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
            tg.start_soon(Horizon(store, metrics).run)
            log.info("worker.started", worker_id=settings.worker_id,
                     concurrency=settings.concurrency)  # fmt: skip
            task_status.started(worker)
            await worker.run()
            tg.cancel_scope.cancel()


async def watch_server(
    store: Store,
    settings: Settings,
    metrics: Metrics,
    interval_s: float = 5.0,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The start check, repeated: ``CONFIG SET`` can switch the eviction
    policy or the AOF at any time, and a failover changes the replicas.
    Each hazard is exported as ``refreshd_redis_unsafe`` (an alert watches
    the ones not accepted) and logged when it appears."""
    reported: set[Hazard] | None = None  # None: the start check already spoke
    started = False
    while True:
        try:
            nodes = await inspect_nodes(store.client)
        except (StoreUnavailable, RedisError) as exc:
            log.debug("redis.check_failed", error=type(exc).__name__)
        else:
            facts = combine(list(nodes.values()))
            found = find_hazards(facts, settings.durability)
            _report_hazards(found, reported, settings, metrics)
            reported = set(found)
            if settings.durability == "auto":
                _follow_durability(store, facts, settings)
                if store.router is not None:
                    _follow_node_durability(store, nodes)
        if not started:
            started = True
            task_status.started()
        await anyio.sleep(interval_s)


def _report_hazards(
    found: Mapping[Hazard, str],
    reported: set[Hazard] | None,
    settings: Settings,
    metrics: Metrics,
) -> None:
    for hazard in Hazard:
        accepted = is_accepted(hazard, settings.unsafe_redis, settings.durability)
        metrics.redis_unsafe.labels(str(hazard), str(accepted).lower()).set(int(hazard in found))
        if reported is not None and hazard in found and hazard not in reported:
            (log.warning if accepted else log.error)(
                "redis.unsafe_config", hazard=str(hazard), risk=found[hazard], accepted=accepted
            )


def _follow_durability(store: Store, facts: ServerFacts, settings: Settings) -> None:
    """In ``auto`` mode what a spend and a commit wait for follows the
    server: after a failover the promoted primary may have no replica yet
    but an AOF, and waiting for a replica that does not exist would stop
    every refresh. It never drops to waiting for nothing unless
    ``not_durable`` is accepted: spends that cannot be made durable are
    then refused (retried later), not sent."""
    current = durability_for(facts, "auto")
    waits = current.fsync or current.replicas
    if not waits and not is_accepted(Hazard.NOT_DURABLE, settings.unsafe_redis, "auto"):
        return
    if current != store.durability:
        log.warning("redis.durability_changed", fsync=current.fsync, replicas=current.replicas)
        store.durability = current


def _follow_node_durability(store: Store, nodes: Mapping[str, ServerFacts]) -> None:
    """On a cluster, each primary's batches wait for what that primary
    offers (``Store.durability_at``); a primary that offers nothing durable
    keeps the store-wide setting (its spends are then refused, not sent)."""
    for address, facts in nodes.items():
        current = durability_for(facts, "auto")
        if not (current.fsync or current.replicas):
            continue
        if store.node_durability.get(address) != current:
            if address in store.node_durability:
                log.warning("redis.durability_changed", node=address, fsync=current.fsync,
                            replicas=current.replicas)  # fmt: skip
            store.node_durability[address] = current


async def _stop_on_signal(worker: Worker) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("worker.signal", signal=signal.Signals(signum).name)
            worker.stop()
