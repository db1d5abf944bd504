"""Helpers for the fault tests: captured logs, seeding against any endpoint,
and small real servers on 127.0.0.1 that misbehave in ways the fake
provider cannot (rewritten answers, broken HTTP, a connect that never
completes)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import aiohttp
import anyio
import structlog
from aiohttp import web

from tests.harness import Events, RunningWorker, add_grants, worker_running
from worker.fakeprovider import FakeProvider, IssuedGrant
from worker.logs import configure_logging
from worker.profiles import ProfileStore
from worker.settings import Settings
from worker.store import Store

__all__ = [
    "AnswerRewriter",
    "add_grants",
    "blackhole_port",
    "captured_logs",
    "closed_port",
    "log_events",
    "raw_http_server",
    "running",
    "seed_profile",
]


@contextmanager
def captured_logs(level: str = "debug") -> Iterator[io.StringIO]:
    """Every log line of the process (structlog and stdlib) as rendered JSON
    text; the previous configuration is put back afterwards."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging(level, "json", stream=stream)
    try:
        yield stream
    finally:
        structlog.configure(**config)
        root.handlers[:] = handlers
        root.setLevel(root_level)


def log_events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def seed_profile(
    store: Store,
    provider: FakeProvider,
    count: int,
    *,
    profile: dict[str, Any],
    prefix: str = "cred",
    expires_in: float = 0.0,
) -> dict[str, IssuedGrant]:
    """Like ``harness.seed`` but for any profile id and token URL (the
    provider need not be listening yet, nor be the endpoint at all)."""
    fields: dict[str, Any] = {
        "client_id": provider.config.client_id,
        "client_secret": provider.config.client_secret,
        "allow_http": True,
        "allow_private_network": True,
        "rotation": "always",
        "timeout_s": 2,
    } | profile
    await ProfileStore(store).create(fields)
    return await add_grants(
        store, provider, count, profile_id=fields["id"], prefix=prefix, expires_in=expires_in
    )


@asynccontextmanager
async def running(
    settings: Settings, store: Store, count: int = 1
) -> AsyncIterator[tuple[Events, list[RunningWorker]]]:
    """Workers plus an event listener; on exit the workers drain and the
    events published meanwhile are collected."""
    events = Events()
    async with anyio.create_task_group() as tg:
        await tg.start(events.listen, store)
        async with worker_running(settings, count) as workers:
            yield events, workers
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def blackhole_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: the kernel drops new SYNs,
    so a connect neither succeeds nor fails - like a firewalled or
    unreachable token endpoint. No request byte can ever reach it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(filler)
            filler.setblocking(False)
            with suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            pass
        else:
            raise AssertionError("the accept queue is not full; connects still succeed")
        finally:
            probe.close()
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@asynccontextmanager
async def raw_http_server(reply: bytes) -> AsyncIterator[str]:
    """A TCP server that reads one request and answers ``reply`` verbatim
    (broken HTTP on purpose). Yields its token URL."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            writer.write(reply)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/token"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


class AnswerRewriter:
    """A token endpoint in front of a provider that passes requests through
    unchanged and rewrites the provider's JSON answers: the provider really
    rotates the grant, and the client sees a subtly different answer."""

    def __init__(self, upstream: str, rewrite: Callable[[dict[str, Any]], dict[str, Any]]):
        self.upstream = upstream
        self.rewrite = rewrite
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def __aenter__(self) -> AnswerRewriter:
        self._session = aiohttp.ClientSession()
        self._runner = web.ServerRunner(web.Server(self._handle, access_log=None))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/token"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._session is not None
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in {"authorization", "content-type"}
        }
        body = await request.read()
        async with self._session.post(self.upstream, data=body, headers=headers) as answer:
            status, raw = answer.status, await answer.read()
        doc = json.loads(raw)
        if status == 200:
            doc = self.rewrite(doc)
        return web.Response(status=status, body=json.dumps(doc), content_type="application/json")
