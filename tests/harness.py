"""Building blocks for end-to-end tests: real Redis, real HTTP, real workers.

Everything goes through the same wiring as `refreshd run` (``worker.app``),
so a test exercises what ships.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from worker.app import build_refresher, build_worker, open_store, watch_server
from worker.cli.credentials import import_lines
from worker.errors import StoreUnavailable
from worker.eventsub import EventSubscription
from worker.fakeprovider import FakeProvider, IssuedGrant
from worker.logs import fingerprint
from worker.metrics import Metrics
from worker.models import Claimed, Status
from worker.oauth2 import TokenSet, build_refresh_request, parse_token_answer
from worker.profiles import ProfileStore
from worker.redisio import REDIS_UNAVAILABLE
from worker.runner import Worker
from worker.scheduling import Schedule
from worker.settings import Settings
from worker.store import Store
from worker.transport import make_http_client, send

__all__ = [
    "Events",
    "RunningWorker",
    "acme_profile",
    "add_grants",
    "claim_spend_send",
    "make_settings",
    "run_demo",
    "seed",
    "wait_for",
    "worker_running",
]


def run_demo(redis_url: str, cwd: Path) -> tuple[dict[str, Any], str]:
    """``python -m worker demo`` (60 credentials, 4 s) against ``redis_url``
    with no other ``REFRESHD_*`` from the environment, as a user runs it;
    returns its JSON summary and stderr once it exited 0 without a
    traceback. One runner for the single-server and the cluster test, so
    both check the same demo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    env |= {"REFRESHD_REDIS_URL": redis_url, "REFRESHD_LOG_LEVEL": "error"}
    done = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--credentials", "60", "--duration", "4",
         "--lifetime", "3"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary, done.stderr


def make_settings(redis_url: str, **overrides: Any) -> Settings:
    """Settings for tests: short leases so takeovers happen in seconds."""
    base: dict[str, Any] = {
        "redis_url": redis_url,
        "http_port": 0,
        "lease_s": 5.0,
        "spend_margin_s": 0.5,
        "drain_grace_s": 5.0,
        "idle_wakeup_s": 1.0,
        "backoff_base_s": 0.2,
        "backoff_max_s": 1.0,
        "concurrency": 32,
    }
    return Settings(**(base | overrides))


async def seed(
    store: Store,
    provider: FakeProvider,
    count: int,
    *,
    profile: dict[str, Any] | None = None,
    expires_in: float | Callable[[int], float] = 0.0,
    prefix: str = "cred",
) -> dict[str, IssuedGrant]:
    """Create profile ``p`` for ``provider`` and ``count`` credentials with
    real grants. Returns credential id -> the grant it started with."""
    fields: dict[str, Any] = {
        "id": "p",
        "token_url": provider.url,
        "client_id": provider.config.client_id,
        "client_secret": provider.config.client_secret,
        "allow_http": True,
        "allow_private_network": True,
        "rotation": "always",
        "timeout_s": 2,
    }
    await ProfileStore(store).create(fields | (profile or {}))
    return await add_grants(store, provider, count, profile_id="p", expires_in=expires_in,
                            prefix=prefix)  # fmt: skip


async def add_grants(
    store: Store,
    provider: FakeProvider,
    count: int,
    *,
    profile_id: str,
    expires_in: float | Callable[[int], float] = 0.0,
    prefix: str = "cred",
) -> dict[str, IssuedGrant]:
    """``count`` credentials with real grants in an existing profile, imported
    the way `credential import` does it (workers are woken)."""
    grants: dict[str, IssuedGrant] = {}
    lines = []
    for n in range(count):
        grant = provider.issue_grant()
        cred_id = f"{prefix}-{n:05d}"
        grants[cred_id] = grant
        ttl = expires_in(n) if callable(expires_in) else expires_in
        line = {
            "id": cred_id,
            "profile": profile_id,
            "access_token": grant.access_token,
            "refresh_token": grant.refresh_token,
            "expires_in": ttl,
            "scope": grant.scope,
        }
        lines.append(json.dumps(line))
    summary = await import_lines(store, lines, schedule=Schedule(), replace=False)
    assert summary["failed"] == 0, summary["errors"]
    return grants


@dataclasses.dataclass
class RunningWorker:
    worker: Worker
    metrics: Metrics
    lags: list[float]


async def _serve(
    settings: Settings, *, task_status: TaskStatus[RunningWorker] = anyio.TASK_STATUS_IGNORED
) -> None:
    async with open_store(settings) as store, make_http_client() as http:
        metrics = Metrics()
        refresher = build_refresher(settings, store, http, metrics)
        running = RunningWorker(build_worker(settings, store, refresher, metrics), metrics, [])
        refresher.on_lag = running.lags.append
        async with anyio.create_task_group() as tg:
            if store.router is not None:
                # on a cluster, follow each primary's durability as `refreshd
                # run` does: a failover leaves the promoted one without a replica
                tg.start_soon(watch_server, store, settings, metrics, 1.0)

            async def work(*, task_status: TaskStatus[None]) -> None:
                await running.worker.run(task_status=task_status)
                tg.cancel_scope.cancel()  # the watch ends with the worker

            await tg.start(work)
            task_status.started(running)


@asynccontextmanager
async def worker_running(settings: Settings, count: int = 1) -> AsyncIterator[list[RunningWorker]]:
    """``count`` real workers (separate Redis pools, separate HTTP clients)
    racing over the same Redis; stopped (drained) on exit."""
    async with anyio.create_task_group() as tg:
        workers = [
            await tg.start(_serve, dataclasses.replace(settings, worker_id=f"test-worker-{n}"))
            for n in range(count)
        ]
        try:
            yield workers
        finally:
            for w in workers:
                w.worker.stop()


async def wait_for(predicate: Callable[[], Any], *, within: float = 20.0, what: str = "") -> None:
    """Poll an async or sync predicate until it is truthy."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if hasattr(result, "__await__"):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or predicate}")
        await anyio.sleep(0.05)


class Events:
    """Collects every event published on the events channel."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.items if e["type"] == kind]

    async def listen(
        self, store: Store, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        # one channel, or every partition's shard channel on a cluster;
        # subscribed again after an outage (a failover, a restart): what was
        # published meanwhile is not seen, as for any pub/sub consumer
        started = False
        while True:
            try:
                async with EventSubscription(store.client, store.keys) as events:
                    await events.confirm(5.0)
                    if not started:
                        task_status.started()
                        started = True
                    while True:
                        data = await events.get(1.0)
                        if data is not None:
                            self.items.append(json.loads(data))
            except (StoreUnavailable, *REDIS_UNAVAILABLE):
                if not started:
                    raise
                await anyio.sleep(0.2)


async def is_current(
    store: Store, provider: FakeProvider, cred_id: str, grant: IssuedGrant
) -> bool:
    """Nothing lost: the stored tokens are the ones the provider honours now."""
    cred = await store.get(cred_id)
    state = provider.grant_state(grant.grant_id)
    return (
        cred.status is Status.ACTIVE
        and cred.version >= 1
        and cred.refresh_token == state.refresh_token
        and cred.access_token == state.access_token
        and not state.revoked
    )


async def all_current(store: Store, provider: FakeProvider, grants: dict[str, IssuedGrant]) -> bool:
    """(False while the test's own Redis connection is broken by a restart.)"""
    try:
        for cred_id, grant in grants.items():
            if not await is_current(store, provider, cred_id, grant):
                return False
    except StoreUnavailable:
        return False
    return True


async def claim_spend_send(
    store: Store, cred_id: str, *, token: str, lease_ms: int, spend_timeout_ms: int | None = None
) -> tuple[Claimed, TokenSet]:
    """Claim, spend and send like a worker, and read the answer; the commit
    is left to the test. The spend intent lasts ``spend_timeout_ms`` (the
    profile's timeout when None) plus a 500 ms margin."""
    part = store.keys.partition_of(cred_id)
    profile = await ProfileStore(store).load("p")
    _, _, [claimed] = await store.claim(
        part, limit=1, lease_ms=lease_ms, token=token, ids=[cred_id]
    )
    timeout_ms = int(profile.timeout_s * 1000) if spend_timeout_ms is None else spend_timeout_ms
    spend = await store.spend(
        claimed, timeout_ms=timeout_ms, margin_ms=500, rt_hash=fingerprint(claimed.refresh_token)
    )
    assert spend.ok
    request = build_refresh_request(
        profile, refresh_token=claimed.refresh_token, granted_scope=claimed.scope
    )
    async with make_http_client() as http:
        answer = await send(http, request, timeout_s=profile.timeout_s)
    tokens = parse_token_answer(
        answer,
        profile,
        now_ms=int(time.time() * 1000),
        old_refresh_token=claimed.refresh_token,
        old_scope=claimed.scope,
    )
    return claimed, tokens


async def acme_profile(store: Store, fake: FakeProvider) -> None:
    """Profile ``acme`` for the fake provider, rotating, as the README's
    consumer examples use it."""
    await ProfileStore(store).create(
        {"id": "acme", "token_url": fake.url, "client_id": fake.config.client_id,
         "client_secret": fake.config.client_secret, "allow_http": True,
         "allow_private_network": True, "rotation": "always"}
    )  # fmt: skip
