"""Pooled connections and unknown outcomes (issue 10, finding 4).

A request written onto a connection the server is closing fails in a way
that reads as "the provider may have it": under strict rotation that
quarantines a credential although the provider never saw the request.
These tests use real servers on loopback: a small threaded one whose
hang-ups the test times exactly, and ``tests.idle_closer`` (its own
process), which closes idle connections at random times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import anyio
import pytest
from multidict import CIMultiDict

from worker.connpool import KEEPALIVE_S, _tcp_says_closed_first
from worker.errors import Ambiguous, NotSent
from worker.profile import AuthMethod, Profile
from worker.strategies import build_request
from worker.transport import TokenRequest, _classify, make_http_client, send

pytestmark = pytest.mark.anyio

_ANSWER = b'{"access_token": "at", "token_type": "Bearer", "expires_in": 3600}'


class ThreadedServer:
    """Answers each request on the connection it came on, records which
    connection that was, and hangs up on an idle connection when told."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[tuple[int, bytes]] = []  # (connection number, body)
        self.open: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        number = 0
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            number += 1
            with self._lock:
                self.open[number] = conn
            threading.Thread(target=self._serve, args=(number, conn), daemon=True).start()

    def _serve(self, number: int, conn: socket.socket) -> None:
        buffer = b""
        with conn, self._forgotten(number):
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                head, sep, rest = buffer.partition(b"\r\n\r\n")
                if not sep:
                    continue
                length = next(
                    (int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
                     if k.strip().lower() == b"content-length"),
                    0,
                )  # fmt: skip
                if len(rest) < length:
                    continue
                buffer = rest[length:]
                with self._lock:
                    self.requests.append((number, rest[:length]))
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(_ANSWER), _ANSWER)
                )

    @contextmanager
    def _forgotten(self, number: int) -> Iterator[None]:
        try:
            yield
        finally:
            with self._lock:
                self.open.pop(number, None)

    def hang_up_all(self) -> None:
        with self._lock:
            for conn in self.open.values():
                conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        self.hang_up_all()


@contextmanager
def threaded_server() -> Iterator[ThreadedServer]:
    server = ThreadedServer()
    try:
        yield server
    finally:
        server.close()


def _request(port: int, body: str = "grant_type=refresh_token&refresh_token=x") -> TokenRequest:
    headers = CIMultiDict({"Content-Type": "application/x-www-form-urlencoded"})
    url = f"http://127.0.0.1:{port}/token"
    return TokenRequest("POST", url, headers, body.encode(), allow_private_network=True)


async def test_a_hang_up_the_loop_has_not_read_yet_is_seen_before_the_request_is_written() -> None:
    """The server closes an idle connection while the worker's event loop is
    busy: the hang-up sits unread in the kernel when the next refresh takes
    a connection. Before: that connection was handed out, the request was
    refused by the closing transport and read as an unknown outcome. Now the
    pool sees the hang-up and the request goes out on a new connection."""
    with threaded_server() as server:
        async with make_http_client(max_connections=4) as http:
            await send(http, _request(server.port, "first"), timeout_s=5)
            server.hang_up_all()
            time.sleep(0.2)  # noqa: ASYNC251 - the loop must be busy when the FIN arrives
            answer = await send(http, _request(server.port, "second"), timeout_s=5)
    assert answer.status == 200
    assert [body for _, body in server.requests] == [b"first", b"second"]
    assert server.requests[1][0] == 2  # on a new connection


async def test_the_most_recently_used_connection_is_reused_first() -> None:
    """aiohttp hands out the longest-idle connection first: the one a server
    is likeliest to be closing. The pool takes the freshest instead."""
    with threaded_server() as server:
        async with make_http_client(max_connections=4) as http:
            await asyncio.gather(*(send(http, _request(server.port), timeout_s=5) for _ in "ab"))
            for _ in range(4):
                await send(http, _request(server.port), timeout_s=5)
    later = {number for number, _ in server.requests[2:]}
    assert len(later) == 1, f"sequential requests spread over connections {sorted(later)}"


async def test_an_idle_connection_is_not_reused_past_the_keep_alive() -> None:
    assert KEEPALIVE_S < 2.0  # under gunicorn's 2 s, the shortest common server idle timeout
    with threaded_server() as server:
        async with make_http_client(max_connections=4) as http:
            await send(http, _request(server.port), timeout_s=5)
            await asyncio.sleep(KEEPALIVE_S + 0.3)
            await send(http, _request(server.port), timeout_s=5)
    assert [number for number, _ in server.requests] == [1, 2]


def test_a_write_refused_by_a_closing_connection_is_not_sent() -> None:
    """aiohttp's own words when the connection was closing before the
    request's single write: nothing left the process."""
    refused = aiohttp.ClientConnectionResetError("Cannot write to closing transport")
    wrapped = aiohttp.ClientOSError(None, "Can not write request body for http://x/token")
    wrapped.__cause__ = refused
    assert isinstance(_classify(wrapped), NotSent)
    lost = aiohttp.ClientOSError(None, "Can not write request body for http://x/token")
    lost.__cause__ = aiohttp.ClientConnectionResetError("Connection lost")
    assert isinstance(_classify(lost), Ambiguous)
    assert isinstance(_classify(aiohttp.ServerDisconnectedError()), Ambiguous)


@contextmanager
def _idle_closer(min_idle_s: float) -> Iterator[int]:
    with subprocess.Popen(
        [sys.executable, "-m", "tests.idle_closer", "--min-idle", str(min_idle_s),
         "--max-idle", "0.2"],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        yield int(proc.stdout.readline().split()[1])
        proc.terminate()


@pytest.fixture
def idle_closer() -> Iterator[int]:
    """``tests.idle_closer`` in its own process: every idle connection is
    closed within 200 ms, at a random moment."""
    with _idle_closer(0.0) as port:
        yield port


def _seen(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/seen") as reply:
        return set(reply.read().decode().split("\n"))


async def _race(port: int, *, fresh: bool) -> tuple[list[str], list[str], set[str]]:
    """30 flows of 40 requests at random moments: (unknown, not sent, read
    by the server). Every tenth request is one the server swallows."""
    unknown: list[str] = []
    not_sent: list[str] = []
    async with make_http_client(max_connections=64) as http:

        async def flow(n: int) -> None:
            for i in range(40):
                await asyncio.sleep(random.uniform(0, 0.25))
                token = f"{'swallow' if i % 10 == 9 else 'rt'}-{n}-{i}"
                request = _request(port, f"grant_type=refresh_token&refresh_token={token}")
                if fresh:
                    request.headers["Connection"] = "close"
                    request = dataclasses.replace(request, fresh_connection=True)
                try:
                    await send(http, request, timeout_s=5)
                except Ambiguous:
                    unknown.append(token)
                except NotSent:
                    not_sent.append(token)

        await asyncio.gather(*(flow(n) for n in range(30)))
    seen = await anyio.to_thread.run_sync(_seen, port)
    assert [t for t in not_sent if t in seen] == []  # a request read is never "not sent"
    swallowed = [t for t in seen if t.startswith("swallow")]
    assert len(swallowed) >= 100
    assert set(swallowed) <= set(unknown)
    return unknown, not_sent, seen


async def test_against_a_server_closing_idle_connections_at_random_times(idle_closer: int) -> None:
    """The safety direction first: a request the server read is never
    reported as not sent (it would be retried: a double send), and one it
    read and then hung up on is an unknown outcome. Then the other: a
    request the server never read is rarely reported as an unknown outcome
    (each one quarantines a credential under strict rotation). The closes
    here cross requests in flight far more often than any real server's
    would; the crossings that remain (bare resets) cannot be told apart
    from a lost answer over HTTP/1.1 (see the README)."""
    unknown, _, seen = await _race(idle_closer, fresh=False)
    false_unknown = [t for t in unknown if t not in seen]
    # measured over 4,000 requests: 8-16 before, 1-4 after (bare resets) on a
    # quiet machine; a loaded one stretches every race window
    assert len(false_unknown) <= 12, f"{len(false_unknown)} of 1200 requests read as unknown"


async def test_fresh_connections_leave_no_false_unknown_outcome() -> None:
    """A profile with ``fresh_connection``: no request ever rides on a
    connection a server may be closing, so every unknown outcome is a
    request the server really read. (This server closes even brand-new
    idle connections, but not within 50 ms of opening them.)"""
    with _idle_closer(0.05) as port:
        unknown, _, seen = await _race(port, fresh=True)
    assert [t for t in unknown if t not in seen] == []


def test_a_fresh_connection_profile_asks_for_one() -> None:
    profile = Profile(
        id="p", token_url="https://idp.example/token", auth_method=AuthMethod.NONE, client_id="app",
        fresh_connection=True,
    )  # fmt: skip
    request = build_request(profile, secret="rt")
    assert request.fresh_connection
    assert request.headers["Connection"] == "close"
    assert not build_request(
        dataclasses.replace(profile, fresh_connection=False), secret="rt"
    ).fresh_connection


async def test_a_fresh_connection_request_never_reuses_one() -> None:
    with threaded_server() as server:
        async with make_http_client(max_connections=4) as http:
            await send(http, _request(server.port), timeout_s=5)  # pooled
            for _ in range(3):
                request = dataclasses.replace(_request(server.port), fresh_connection=True)
                request.headers["Connection"] = "close"
                await send(http, request, timeout_s=5)
    assert [number for number, _ in server.requests] == [1, 2, 3, 4]


class _SocketOnly:
    """What ``_tcp_says_closed_first`` asks of a transport."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> socket.socket | None:
        return self.sock if name == "socket" else None


@pytest.mark.parametrize("server_reads_first", [False, True])
def test_tcp_tells_a_close_before_the_request_from_one_after_it(server_reads_first: bool) -> None:
    """Real sockets on loopback. A server that closed before our bytes
    arrived answers them with a reset behind its FIN: the server never had
    them. A server that read them and then closed sends a FIN that
    acknowledges them: it may have acted on them."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            if server_reads_first:
                client.sendall(b"POST /token HTTP/1.1\r\n\r\n")
                server.recv(1024)
                server.close()
            else:
                server.close()
                time.sleep(0.05)  # the FIN is in; then our request crosses it
                client.sendall(b"POST /token HTTP/1.1\r\n\r\n")
            time.sleep(0.05)
            assert _tcp_says_closed_first(_SocketOnly(client)) is not server_reads_first
