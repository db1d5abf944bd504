"""HTTP endpoints for the orchestrator and for Prometheus.

``/healthz`` (liveness) and ``/readyz`` (readiness) answer different
questions and must not be merged:

* liveness asks "is this process wedged?" and is answered from the event-loop
  :class:`Heartbeat` alone. It never touches Redis: if Redis is down, every
  replica would fail liveness together and be restarted in a loop, which
  cures nothing.
* readiness asks "can this process do useful work right now?" and may check
  dependencies, under a hard timeout so that a hanging check reads as "not
  ready" instead of hanging the probe.

The server runs inside the worker's task group and stops with it.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import prometheus_client
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from worker.errors import ConfigError
from worker.logs import get_logger

__all__ = ["HealthServer", "Heartbeat"]

log = get_logger("refreshd.health")


class Heartbeat:
    """Proof that the event loop still runs.

    A task calls :meth:`beat` every second (:meth:`run`); if the loop is
    blocked - a sync call gone wrong, a CPU-bound bug - the beats stop, the
    last one ages, and liveness fails so the orchestrator restarts us.
    """

    def __init__(self) -> None:
        # A fresh process counts as alive until it has had a chance to beat.
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def age(self) -> float:
        """Seconds since the last beat."""
        return time.monotonic() - self._last

    def alive(self, max_age_s: float) -> bool:
        return self.age() <= max_age_s

    async def run(self, interval_s: float = 1.0) -> None:
        """Beat every *interval_s* until cancelled."""
        while True:
            self.beat()
            await anyio.sleep(interval_s)


class HealthServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` with aiohttp."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: prometheus_client.CollectorRegistry,
        *,
        alive: Callable[[], bool],
        ready: Callable[[], Awaitable[bool]],
        ready_timeout_s: float = 2.0,
    ) -> None:
        self.host = host
        self.port = port
        self._registry = registry
        self._alive = alive
        self._ready = ready
        self._ready_timeout_s = ready_timeout_s

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; report the bound port (useful with port 0)."""
        # access_log=None: probes every few seconds would drown the real
        # events, and request lines carry query strings we do not want logged.
        # shutdown_timeout: in-flight probes (at most the readiness timeout)
        # may finish; nothing else here is long-lived.
        runner = web.AppRunner(
            self.make_app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self._ready_timeout_s + 1.0,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            try:
                await site.start()
            except OSError as exc:
                raise self._bind_error(exc) from None
            port = int(runner.addresses[0][1])
            log.info("health.listening", host=self.host, port=port)
            task_status.started(port)
            await anyio.sleep_forever()
        finally:
            # Cancellation is what normally brings us here; the cleanup must
            # still run to completion to close the listening socket.
            with anyio.CancelScope(shield=True):
                await runner.cleanup()

    def _bind_error(self, exc: OSError) -> ConfigError:
        """A second ``refreshd run`` on one machine finds the port taken:
        say which setting moves it rather than a 40-line traceback."""
        where = f"{self.host}:{self.port}"
        if exc.errno == errno.EADDRINUSE:
            return ConfigError(
                f"cannot serve /metrics on {where}: the port is in use (another refreshd "
                "run?); give each process its own REFRESHD_HTTP_PORT, or 0 to serve none"
            )
        return ConfigError(
            f"cannot serve /metrics on {where} ({exc.strerror or exc}); "
            "check REFRESHD_HTTP_HOST and REFRESHD_HTTP_PORT"
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        # Same negotiation as prometheus_client's own server: OpenMetrics
        # when the scraper asks for it, text format 0.0.4 otherwise.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self._registry), headers={"Content-Type": content_type})

    async def _healthz(self, _request: web.Request) -> web.Response:
        if self._alive():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="event loop stalled\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready = False
        with anyio.move_on_after(self._ready_timeout_s) as scope:
            try:
                ready = bool(await self._ready())
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
                log.warning("health.ready.failed", error_type=type(exc).__name__, error=str(exc))
        if scope.cancelled_caught:
            log.warning("health.ready.timeout", timeout_s=self._ready_timeout_s)
        if ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")
