"""The health server, against a real aiohttp server on a free loopback port."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import httpx
import prometheus_client
import pytest
import structlog

from worker.health import HealthServer, Heartbeat
from worker.logs import configure_logging

pytestmark = pytest.mark.anyio


class Probe:
    """Switchable answers for the server's alive/ready callbacks."""

    def __init__(self) -> None:
        self.live = True
        self.ready_answer = True
        self.ready_error: Exception | None = None
        self.ready_hangs = False

    def alive(self) -> bool:
        return self.live

    async def ready(self) -> bool:
        if self.ready_hangs:
            await anyio.sleep_forever()
        if self.ready_error is not None:
            raise self.ready_error
        return self.ready_answer


@pytest.fixture
def registry() -> prometheus_client.CollectorRegistry:
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter(
        "refreshd_test_things", "Things counted by a test.", registry=registry
    )
    counter.inc(3)
    return registry


@pytest.fixture
def probe() -> Probe:
    return Probe()


@asynccontextmanager
async def serving(
    registry: prometheus_client.CollectorRegistry, probe: Probe
) -> AsyncIterator[httpx.AsyncClient]:
    server = HealthServer("127.0.0.1", 0, registry, alive=probe.alive, ready=probe.ready)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            yield client
        tg.cancel_scope.cancel()


async def test_metrics(registry: prometheus_client.CollectorRegistry, probe: Probe) -> None:
    async with serving(registry, probe) as client:
        plain = await client.get("/metrics")
        openmetrics = await client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert plain.status_code == 200
    assert plain.headers["content-type"] == prometheus_client.CONTENT_TYPE_PLAIN_0_0_4
    assert "refreshd_test_things_total 3.0" in plain.text
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


async def test_healthz_follows_alive(
    registry: prometheus_client.CollectorRegistry, probe: Probe
) -> None:
    async with serving(registry, probe) as client:
        up = await client.get("/healthz")
        probe.live = False
        down = await client.get("/healthz")
    assert (up.status_code, up.text) == (200, "ok\n")
    assert down.status_code == 503


async def test_healthz_never_asks_readiness(
    registry: prometheus_client.CollectorRegistry, probe: Probe
) -> None:
    probe.ready_hangs = True  # e.g. Redis unreachable: liveness must not care
    async with serving(registry, probe) as client:
        with anyio.fail_after(1):
            response = await client.get("/healthz")
    assert response.status_code == 200


async def test_readyz_follows_ready(
    registry: prometheus_client.CollectorRegistry, probe: Probe
) -> None:
    async with serving(registry, probe) as client:
        ready = await client.get("/readyz")
        probe.ready_answer = False
        not_ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert not_ready.status_code == 503


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    yield stream
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_readyz_failure_is_503_and_logged_redacted(
    registry: prometheus_client.CollectorRegistry, probe: Probe, log_stream: io.StringIO
) -> None:
    probe.ready_error = ConnectionError("redis://:hunter2pw@redis:6379 refused")
    async with serving(registry, probe) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert "hunter2pw" not in log_stream.getvalue()
    events = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    failed = next(e for e in events if e["event"] == "health.ready.failed")
    assert failed["error_type"] == "ConnectionError"


async def test_readyz_hanging_check_times_out(
    registry: prometheus_client.CollectorRegistry, probe: Probe
) -> None:
    probe.ready_hangs = True
    async with serving(registry, probe) as client:
        started = time.monotonic()
        response = await client.get("/readyz")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert 1.9 <= elapsed < 3.0


async def test_unknown_path_is_404(
    registry: prometheus_client.CollectorRegistry, probe: Probe
) -> None:
    async with serving(registry, probe) as client:
        response = await client.get("/nope?token=abc")
    assert response.status_code == 404


async def test_cancellation_closes_the_port(
    registry: prometheus_client.CollectorRegistry, probe: Probe
) -> None:
    server = HealthServer("127.0.0.1", 0, registry, alive=probe.alive, ready=probe.ready)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve)
            tg.cancel_scope.cancel()
    async with httpx.AsyncClient(timeout=5) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/healthz")


async def test_heartbeat_tracks_the_event_loop() -> None:
    heartbeat = Heartbeat()
    assert heartbeat.alive(max_age_s=1.0)  # alive from the start
    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat.run, 0.01)
        await anyio.sleep(0.1)
        assert heartbeat.alive(max_age_s=0.05)
        # A blocked loop cannot beat: exactly what liveness must catch.
        time.sleep(0.1)  # noqa: ASYNC251
        assert not heartbeat.alive(max_age_s=0.05)
        await anyio.sleep(0.05)
        assert heartbeat.alive(max_age_s=0.05)
        tg.cancel_scope.cancel()


async def test_heartbeat_stops_when_not_run() -> None:
    heartbeat = Heartbeat()
    await anyio.sleep(0.05)
    assert not heartbeat.alive(max_age_s=0.01)
    heartbeat.beat()
    assert heartbeat.alive(max_age_s=0.01)
