"""`refreshd demo`: the whole system on the default setup, end to end.

A built-in token endpoint that rotates refresh tokens and treats a second
use of one as theft (it revokes the grant, as strict providers do); N
credentials with short lifetimes; several real workers racing over them
through Redis; a live progress line; and a summary that exits non-zero if
any refresh token was ever presented twice.

A consumer runs alongside, as an application would: a separate process on
the client library (``worker.democonsumer``) that follows the durable event
log and reads a few tokens with ``get(id, min_ttl=...)``. The demo SIGKILLs
it once mid-run and starts it again; it resumes from its saved cursor. The
demo also fails unless the consumer received exactly one event per commit.

Demo data lives under its own key prefix (``<prefix>demo:``), so it never
touches real credentials, and is removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from worker.app import build_refresher, build_worker, open_store, resolve_redis_url, schedule_from
from worker.cli.common import human_number
from worker.cli.credentials import import_lines
from worker.democonsumer import ConsumerProcess
from worker.errors import ConfigError, RefreshdError
from worker.eventsub import EventSubscription
from worker.fakeprovider import FakeProvider, FakeProviderConfig
from worker.metrics import Metrics
from worker.profiles import ProfileStore
from worker.redisio import guard
from worker.runner import Worker
from worker.settings import Settings
from worker.store import Store
from worker.transport import make_http_client

__all__ = ["LIMITS", "DemoOptions", "run_demo"]

#: option -> (lowest, highest): named by ``--help`` and checked before anything starts
LIMITS: dict[str, tuple[float, float]] = {
    "credentials": (1, 1_000_000),
    "lifetime_s": (2, 86_400),
    "duration_s": (1, 86_400),
    "workers": (1, 64),
}
_FLAGS = {"credentials": "--credentials", "lifetime_s": "--lifetime",
          "duration_s": "--duration", "workers": "--workers"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class DemoOptions:
    credentials: int = 2000
    lifetime_s: float = 20.0
    duration_s: float = 30.0
    workers: int = 2
    keep: bool = False

    def __post_init__(self) -> None:
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(
                    f"{_FLAGS[name]} must be between {human_number(low)} and {human_number(high)}"
                )


#: ``get(id, min_ttl=...)`` calls the consumer makes during a run
MIN_TTL_READS = 5


@dataclass(slots=True)
class _Tally:
    events: dict[str, int] = dataclasses.field(default_factory=dict)
    lags: list[float] = dataclasses.field(default_factory=list)
    consumer: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def refreshed(self) -> int:
        return self.events.get("token.refreshed", 0)


async def _wipe(store: Store) -> None:
    """Delete every key under the demo prefix (hash-tagged ones included)."""
    prefix = store.keys.prefix
    for pattern in (f"{prefix}*", f"{{{prefix}*"):
        batch: list[str] = []
        async for key in store.client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await guard(store.client.unlink(*batch))
                batch.clear()
        if batch:
            await guard(store.client.unlink(*batch))


async def _seed(
    store: Store, provider: FakeProvider, settings: Settings, opts: DemoOptions
) -> None:
    await ProfileStore(store).create(
        {
            "id": "demo",
            "name": "built-in demo endpoint (rotates, revokes on reuse)",
            "token_url": provider.url,
            "client_id": provider.config.client_id,
            "client_secret": provider.config.client_secret,
            "rotation": "always",
            "allow_http": True,
            "allow_private_network": True,
            "timeout_s": 5,
        }
    )
    rng = random.Random(7)
    lines = []
    for n in range(opts.credentials):
        grant = provider.issue_grant()
        lines.append(
            json.dumps(
                {
                    "id": f"demo-{n:06d}",
                    "profile": "demo",
                    "access_token": grant.access_token,
                    "refresh_token": grant.refresh_token,
                    # spread expiries so the run shows a catch-up burst, then a steady state
                    "expires_in": rng.uniform(1, opts.lifetime_s),
                }
            )
        )
    summary = await import_lines(store, lines, schedule=schedule_from(settings), replace=False)
    if summary["failed"]:
        raise RefreshdError(f"demo import failed: {summary['errors'][:3]}")


async def _count_events(store: Store, tally: _Tally, *, task_status: TaskStatus[None]) -> None:
    async with EventSubscription(store.client, store.keys) as events:
        task_status.started()
        while True:
            data = await events.get(1.0)
            if data is not None:
                kind = json.loads(data)["type"]
                tally.events[kind] = tally.events.get(kind, 0) + 1


def _progress(
    elapsed: float,
    tally: _Tally,
    provider: FakeProvider,
    final: bool = False,
    consumer: ConsumerProcess | None = None,
) -> None:
    rate = tally.refreshed / elapsed if elapsed else 0.0
    failed = sum(v for k, v in tally.events.items() if k != "token.refreshed")
    line = (
        f"[{elapsed:5.1f}s] refreshed {tally.refreshed:7d}  ({rate:7.1f}/s)  "
        f"failed {failed:4d}  reuse detected {len(provider.stats.reuse_events)}"
    )
    if consumer is not None:
        line += f"  consumer events {consumer.lines():7d}"
    if sys.stderr.isatty():
        print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
    elif final or int(elapsed) % 5 == 0:
        print(line, file=sys.stderr, flush=True)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]


async def run_demo(settings: Settings, opts: DemoOptions) -> int:
    """Ctrl-C ends the run early, not the demo: the summary is printed and
    the demo's keys are removed as after a full run (exit 130)."""
    settings = dataclasses.replace(settings, prefix=f"{settings.prefix}demo:", http_port=0,
                                   event_log=True)  # fmt: skip
    config = FakeProviderConfig(lifetime_s=max(int(opts.lifetime_s), 2), rotate=True,
                                revoke_on_reuse=True, access_token_bytes=800)  # fmt: skip
    tally = _Tally()
    stop = anyio.Event()
    elapsed = 0.0
    async with (
        FakeProvider(config) as provider,
        open_store(settings) as store,
        anyio.create_task_group() as outer,
    ):
        outer.start_soon(_stop_on_interrupt, stop)
        workdir = Path(tempfile.mkdtemp(prefix="refreshd-demo-"))
        consumer = ConsumerProcess(workdir, await _consumer_env(settings),
                                   credentials=opts.credentials, min_ttl=0.75 * opts.lifetime_s,
                                   reads=MIN_TTL_READS, spread=0.5 * opts.duration_s)  # fmt: skip
        try:
            await _wipe(store)
            print(f"seeding {opts.credentials} credentials (lifetime {opts.lifetime_s:g}s)...",
                  file=sys.stderr)  # fmt: skip
            with anyio.CancelScope() as seeding:
                outer.start_soon(_cancel_when, stop, seeding)
                await _seed(store, provider, settings, opts)
            if not stop.is_set():
                elapsed = await _race(settings, store, opts, tally, provider, stop, consumer)
            _progress(elapsed, tally, provider, final=True, consumer=consumer)
        finally:
            with anyio.CancelScope(shield=True):
                await consumer.stop()
            shutil.rmtree(workdir, ignore_errors=True)
            if not opts.keep:
                with anyio.CancelScope(shield=True):
                    await _wipe(store)
            outer.cancel_scope.cancel()
    code = _report(opts, elapsed, tally, provider)
    if stop.is_set():
        print("interrupted: the demo's keys were removed" if not opts.keep
              else "interrupted", file=sys.stderr)  # fmt: skip
        code = 130
    if not settings.redis_url:
        print(
            f"the embedded Valkey server (data in {settings.data_dir}) keeps running for other "
            "refreshd commands; `refreshd server stop` stops it",
            file=sys.stderr,
        )
    return code


async def _consumer_env(settings: Settings) -> dict[str, str]:
    """The consumer configured like any application: REFRESHD_* variables
    naming the demo's Redis and key prefix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    env |= {
        "REFRESHD_REDIS_URL": await resolve_redis_url(settings, announce=False),
        "REFRESHD_PREFIX": settings.prefix,
        "REFRESHD_PARTITIONS": str(settings.partitions),
        "REFRESHD_LOG_LEVEL": "error",
    }
    return env


async def _stop_on_interrupt(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()


async def _cancel_when(stop: anyio.Event, scope: anyio.CancelScope) -> None:
    await stop.wait()
    scope.cancel()


async def _race(
    settings: Settings,
    store: Store,
    opts: DemoOptions,
    tally: _Tally,
    provider: FakeProvider,
    stop: anyio.Event,
    consumer: ConsumerProcess,
) -> float:
    """The workers race for ``duration_s`` (or until Ctrl-C) while the
    consumer follows, killed once at 40 % of the run; then the consumer
    catches up and is checked. Returns the elapsed time."""
    workers: list[Worker] = []
    kill_at = 0.4 * opts.duration_s
    async with anyio.create_task_group() as tg:
        await tg.start(_count_events, store, tally)
        await consumer.start()
        async with anyio.create_task_group() as racing:
            for n in range(opts.workers):
                await racing.start(_one_worker, settings, n, tally, workers)
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < opts.duration_s and not stop.is_set():
                wait = min(1.0, opts.duration_s - elapsed)
                if not consumer.kills:
                    wait = max(0.0, min(wait, kill_at - elapsed))
                with anyio.move_on_after(wait):
                    await stop.wait()
                if not consumer.kills and time.monotonic() - started >= kill_at:
                    await consumer.kill_and_restart()
                _progress(time.monotonic() - started, tally, provider, consumer=consumer)
            # a short run may end before a restarted consumer made its reads:
            # they need the workers, so those wait for them (bounded)
            deadline = time.monotonic() + 15
            while consumer.reads_made() < MIN_TTL_READS and time.monotonic() < deadline:
                if stop.is_set() or consumer.failed():
                    break
                with anyio.move_on_after(0.1):
                    await stop.wait()
            for worker in workers:
                worker.stop()
        elapsed = time.monotonic() - started
        versions = await _versions(store, opts.credentials)
        deadline = time.monotonic() + 30
        while not (stop.is_set() or consumer.caught_up(versions) or consumer.failed()):
            if time.monotonic() > deadline:
                break
            with anyio.move_on_after(0.2):
                await stop.wait()
        tally.consumer = consumer.report(versions)
        if failure := consumer.failed():
            print(f"the consumer process died:\n{failure}", file=sys.stderr)
        await anyio.sleep(0.2)  # let the last events arrive
        tg.cancel_scope.cancel()
    return elapsed


async def _versions(store: Store, credentials: int) -> dict[str, int]:
    """Each credential's stored version: the number of its commits."""
    ids = [f"demo-{n:06d}" for n in range(credentials)]
    versions: dict[str, int] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        for cred_id, fields in zip(chunk, await store.many_raw_fields(chunk), strict=True):
            versions[cred_id] = int(fields.get("version") or 0)
    return versions


async def _one_worker(
    settings: Settings,
    n: int,
    tally: _Tally,
    workers: list[Worker],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    settings = dataclasses.replace(settings, worker_id=f"{settings.worker_id}-demo{n}")
    async with open_store(settings) as store, make_http_client() as http:
        metrics = Metrics()
        refresher = build_refresher(settings, store, http, metrics)
        refresher.on_lag = tally.lags.append
        worker = build_worker(settings, store, refresher, metrics)
        workers.append(worker)
        task_status.started()
        await worker.run()


def _report(opts: DemoOptions, elapsed: float, tally: _Tally, provider: FakeProvider) -> int:
    reuse = len(provider.stats.reuse_events)
    double_sends = sum(1 for count in provider.send_counts.values() if count > 1)
    summary = {
        "credentials": opts.credentials,
        "workers": opts.workers,
        "duration_s": round(elapsed, 1),
        "refreshed": tally.refreshed,
        "refreshes_per_s": round(tally.refreshed / elapsed, 1) if elapsed else 0,
        "failed": tally.events.get("token.failed", 0),
        "needs_reauth": tally.events.get("credential.needs_reauth", 0),
        "quarantined": tally.events.get("credential.quarantined", 0),
        "reuse_detected": reuse,
        "refresh_tokens_sent_twice": double_sends,
        "lag_p50_ms": round(_percentile(tally.lags, 0.5) * 1000, 1),
        "lag_p99_ms": round(_percentile(tally.lags, 0.99) * 1000, 1),
        **tally.consumer,
    }
    print(json.dumps(summary, indent=2))
    if reuse or double_sends:
        print("FAIL: a refresh token was used twice", file=sys.stderr)
        return 1
    received, commits = tally.consumer.get("events_received"), tally.consumer.get("commits")
    if received != commits or tally.consumer.get("events_missing"):
        print(f"FAIL: the consumer received {received} events for {commits} commits "
              f"({tally.consumer.get('events_missing')} committed versions never seen)",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"OK: {tally.refreshed} refreshes, zero reuse; the consumer (killed and restarted "
          f"{tally.consumer['consumer_kills']}x) received all {received} events, "
          f"{tally.consumer['min_ttl_reads']} min-TTL reads served", file=sys.stderr)  # fmt: skip
    return 0
