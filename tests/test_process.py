"""`refreshd run` as a real process: killed, drained, probed.

The worker runs as ``python -m worker run`` with settings from the
environment; the provider and Redis run in the test process (fixtures), so
the test sees every request the process sent and every key it left.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import PIPE
from typing import Any

import anyio
import httpx
import pytest
import structlog
from anyio.abc import ByteReceiveStream, Process

from tests.faultkit import running
from tests.harness import all_current, is_current, make_settings, seed, wait_for
from tests.redis_server import RedisServer, free_port
from worker.app import open_store
from worker.fakeprovider import FakeProvider, FakeProviderConfig, Fault
from worker.logs import get_logger
from worker.models import Status
from worker.store import Store

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class WorkerProcess:
    process: Process
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    def output(self) -> str:
        return (self.stdout + self.stderr).decode(errors="replace")

    def log_events(self) -> list[str]:
        events = []
        for line in self.output().splitlines():
            try:
                events.append(json.loads(line)["event"])
            except (ValueError, KeyError, TypeError):
                continue
        return events


async def _collect(stream: ByteReceiveStream | None, into: bytearray) -> None:
    if stream is None:
        return
    async for chunk in stream:
        into += chunk


@asynccontextmanager
async def worker_process(redis_url: str, **env: str) -> AsyncIterator[WorkerProcess]:
    """``refreshd run`` in a child process, started once it says so; killed
    at exit if the test has not stopped it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    environ |= {
        "REFRESHD_REDIS_URL": redis_url,
        "REFRESHD_HTTP_PORT": "0",
        "REFRESHD_LEASE_SECONDS": "5",
        "REFRESHD_SPEND_MARGIN_SECONDS": "0.5",
        "REFRESHD_LOG_LEVEL": "debug",
        "REFRESHD_IDLE_WAKEUP_SECONDS": "1",
        "REFRESHD_BACKOFF_BASE_SECONDS": "0.2",
        "REFRESHD_BACKOFF_MAX_SECONDS": "1",
        "REFRESHD_WORKER_ID": "child",
    } | env
    process = await anyio.open_process(
        [sys.executable, "-m", "worker", "run"], env=environ, cwd=ROOT, stdout=PIPE, stderr=PIPE
    )
    child = WorkerProcess(process)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_collect, process.stdout, child.stdout)
            tg.start_soon(_collect, process.stderr, child.stderr)
            try:
                await wait_for(
                    lambda: "worker.started" in child.output() or process.returncode is not None,
                    within=20,
                    what="the worker to start",
                )
                assert process.returncode is None, child.output()
                yield child
            finally:
                if process.returncode is None:
                    process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()


async def open_intents(store: Store, ids: list[str]) -> set[str]:
    """Credentials with a recorded spend: their request may be out."""
    records = await store.many_raw_fields(ids)
    return {cred_id for cred_id, f in zip(ids, records, strict=True) if f.get("intent")}


async def lock_keys(store: Store) -> list[str]:
    return [key async for key in store.client.scan_iter(match="*lock:*")]


# -------------------------------------------------------------- 8. SIGKILL


@pytest.mark.parametrize("grace", [True, False], ids=["reuse_grace", "strict_rotation"])
async def test_sigkill_mid_refresh_never_reuses_a_token(redis_url: str, grace: bool) -> None:
    settings = make_settings(redis_url)
    config = FakeProviderConfig(reuse_grace_s=30 if grace else 0)
    profile = {"reuse_grace_s": 30} if grace else {}
    async with FakeProvider(config) as provider, open_store(settings) as store:
        grants = await seed(store, provider, 12, profile=profile)
        provider.inject(*[Fault("delay", delay_s=3)] * 4)  # keep the first requests out
        env = {"REFRESHD_CONCURRENCY": "4", "REFRESHD_CLAIM_BATCH": "4"}
        async with worker_process(redis_url, **env) as child:
            await wait_for(lambda: provider.stats.requests > 0, within=10, what="a request out")
            child.process.send_signal(signal.SIGKILL)
            await child.process.wait()
        provider.faults.clear()  # what the provider does next is normal service

        unknown = await open_intents(store, sorted(grants))
        assert unknown, "the kill caught no request in flight"
        reached = {cid for cid, g in grants.items() if g.refresh_token in provider.send_counts}
        assert reached
        assert reached <= unknown  # nothing is sent without a recorded spend

        async with running(settings, store) as (events, _):
            if grace:
                await wait_for(
                    lambda: all_current(store, provider, grants), within=20, what="all refreshed"
                )
            else:
                others = {k: g for k, g in grants.items() if k not in unknown}
                await wait_for(
                    lambda: len(events.of("credential.quarantined")) == len(unknown),
                    within=20,
                    what="the unknown outcomes quarantined",
                )
                await wait_for(
                    lambda: all_current(store, provider, others), within=10, what="the others"
                )

        assert provider.stats.reuse_events == []
        assert provider.stats.revoked_grants == 0
        print(
            "DEBUG2",
            [provider.grant_state(grants[c].grant_id).refreshes for c in sorted(unknown)],
            [provider.send_counts.get(grants[c].refresh_token) for c in sorted(unknown)],
        )
        if grace:
            # the unknown outcomes were retried with the same token, inside the window
            assert {e["credential_id"] for e in events.of("credential.quarantined")} == set()
            assert max(provider.send_counts.values()) <= 2
        else:
            quarantined = {e["credential_id"] for e in events.of("credential.quarantined")}
            assert quarantined == unknown
            for cid in unknown:
                cred = await store.get(cid)
                assert cred.status is Status.QUARANTINED
                assert cred.refresh_token == grants[cid].refresh_token
            assert max(provider.send_counts.values()) == 1


# ------------------------------------------------------------- 9. SIGTERM


async def test_sigterm_drains_in_flight_refreshes(redis_url: str) -> None:
    settings = make_settings(redis_url)
    async with (
        FakeProvider(FakeProviderConfig(latency_s=1.0)) as provider,
        open_store(settings) as store,
    ):
        grants = await seed(store, provider, 12)
        env = {
            "REFRESHD_CONCURRENCY": "4",
            "REFRESHD_CLAIM_BATCH": "4",
            "REFRESHD_DRAIN_GRACE_SECONDS": "5",
        }
        async with worker_process(redis_url, **env) as child:
            await wait_for(lambda: provider.stats.requests > 0, within=10, what="a request out")
            child.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            with anyio.fail_after(5 + 3):
                code = await child.process.wait()
            took = time.monotonic() - started
        assert code == 0, child.output()
        assert took < 5, f"drain took {took:.1f}s with 1 s requests"
        events = child.log_events()
        assert "worker.draining" in events
        assert "worker.stopped" in events
        assert "refresh.crashed" not in events

        sent = {cid for cid, g in grants.items() if g.refresh_token in provider.send_counts}
        assert sent, "nothing was in flight"
        for cid in sent:  # the in-flight refreshes were committed
            assert await is_current(store, provider, cid, grants[cid]), cid
        assert await lock_keys(store) == []
        assert await open_intents(store, sorted(grants)) == set()
        now_ms = int(time.time() * 1000)
        for cid in set(grants) - sent:  # handed back or never claimed: due now
            cred = await store.get(cid)
            assert cred.status is Status.ACTIVE
            assert cred.version == 0
            assert cred.due_at_ms is not None
            assert cred.due_at_ms <= now_ms
            assert not cred.in_flight

        async with running(settings, store):
            await wait_for(lambda: all_current(store, provider, grants), within=15, what="the rest")
        assert provider.stats.reuse_events == []
        assert max(provider.send_counts.values()) == 1


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("_restore_logging")
def test_run_logs_to_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.cli.common import load_settings

    for name in list(os.environ):
        if name.startswith("REFRESHD_"):
            monkeypatch.delenv(name)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    load_settings(log_to_stderr=False)  # what `refreshd run` does
    get_logger("probe").info("probe.line")
    assert "probe.line" in out.getvalue()
    assert "probe.line" not in err.getvalue()


# ------------------------------------------------------------- 10. probes


async def test_health_and_readiness_of_a_running_process(fresh_redis: RedisServer) -> None:
    port = free_port()
    async with (
        worker_process(fresh_redis.url, REFRESHD_HTTP_PORT=str(port)) as child,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
    ):

        async def status(path: str) -> int:
            try:
                return (await http.get(path)).status_code
            except httpx.TransportError:
                return 0

        await wait_for(lambda: _equals(status("/readyz"), 200), within=10, what="ready")
        assert await status("/healthz") == 200
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert "refreshd_refreshes_total" in metrics.text

        fresh_redis.pause()
        try:
            started = time.monotonic()
            assert await status("/readyz") == 503
            assert time.monotonic() - started < 5  # a bounded check, not a hang
            assert await status("/healthz") == 200  # liveness never depends on Redis
        finally:
            fresh_redis.resume()
        await wait_for(lambda: _equals(status("/readyz"), 200), within=15, what="ready again")

        child.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):
            assert await child.process.wait() == 0


async def _equals(value: Any, expected: int) -> bool:
    return bool(await value == expected)
