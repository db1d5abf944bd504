"""Connection reuse that does not turn a server's hang-up into an unknown outcome.

A request written onto a keep-alive connection that the server is closing
fails after it left this process: ``worker.transport`` must then call it
an unknown outcome (the provider may have rotated the token), and under
strict rotation that quarantines the credential, although the server
never read a byte of it. Four things keep that rare, and the last two turn
the proven cases into "not sent":

- the pool hands out the most recently used connection, not the longest
  idle one (aiohttp's queue order), and none idle past its keep-alive;
- each connection is checked for a hang-up that arrived but that the
  event loop has not read yet (one ``poll``, about a microsecond);
- a write refused because the connection was already closing sent nothing
  (``transport.send`` reads aiohttp's words for it);
- when the server's FIN arrives after our request was written, TCP itself
  says whether the server had the request: a FIN that does not acknowledge
  our bytes, or a reset right behind it (the server's kernel answering data
  that reached a closed socket), was sent before the request arrived, so
  no server read it. Then the failure is ``ServerClosedFirst``.

A profile can rule out even those: with ``fresh_connection`` each of its
requests goes out on a new connection that is closed after the answer
(``Connection: close``), so no server's close can cross it, at the cost of
a TCP (and TLS) handshake per refresh.

What stays unknown otherwise is a bare reset (a server that read the request may
also abort) and any close whose FIN acknowledged the request: those cannot
be told apart from a lost answer over HTTP/1.1.

The overrides below use aiohttp internals (``_get``, ``_release``,
``_factory``); the version is pinned in constraints.txt and
tests/test_keepalive.py covers each one.
"""

from __future__ import annotations

import contextvars
import functools
import select
import socket
import struct
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler

from worker.egress import GuardedConnector

__all__ = ["KEEPALIVE_S", "PoolConnector", "ServerClosedFirst", "fresh_connection"]

#: Longest idle time after which a pooled connection is still reused: under
#: the shortest idle timeout common servers use (gunicorn 2 s; Node.js,
#: Apache and uvicorn 5 s), so a server's own idle close never races a request.
KEEPALIVE_S = 1.5

#: Set per request (``transport.send``): this request takes no pooled
#: connection (its ``Connection: close`` keeps its own out of the pool).
fresh_connection: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "refreshd_fresh_connection", default=False
)

_HUNG_UP = select.POLLIN | select.POLLPRI | getattr(select, "POLLRDHUP", 0)
# Linux ``struct tcp_info``: u8 state, then (after 8 bytes) u32 rto, ato,
# snd_mss, rcv_mss, unacked (segments sent and not yet acknowledged).
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_INFO_SIZE = 28
_STATE_CLOSE = 7  # after a FIN (CLOSE_WAIT) only a reset gets here


class ServerClosedFirst(aiohttp.ServerDisconnectedError):
    """The server closed the connection before our request reached it: its
    FIN did not acknowledge the request, or a reset followed it."""


def _tcp_says_closed_first(transport: Any) -> bool:
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None or _TCP_INFO is None:
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return False
    if len(info) < _TCP_INFO_SIZE:
        return False
    unacked: int = struct.unpack_from("I", info, 24)[0]
    return info[0] == _STATE_CLOSE or unacked > 0


class _Handler(ResponseHandler):
    """aiohttp's protocol, reading TCP's account when the server's FIN
    arrives (the socket is still open then; once the connection is lost
    it is not)."""

    closed_first = False

    def eof_received(self) -> None:
        self.closed_first = _tcp_says_closed_first(self.transport)
        super().eof_received()

    def set_exception(self, exc: BaseException, *cause: BaseException) -> None:
        if self.closed_first and type(exc) is aiohttp.ServerDisconnectedError:
            exc = ServerClosedFirst(exc.message)
        super().set_exception(exc, *cause)


def _still_open(protocol: ResponseHandler) -> bool:
    """Nothing to read on an idle HTTP/1.1 connection: anything there (a
    FIN, a reset, a parting "408") means the server is closing it."""
    transport = protocol.transport
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None:
        return bool(protocol.is_connected())
    poller = select.poll()
    poller.register(sock.fileno(), _HUNG_UP)
    return not poller.poll(0)


class PoolConnector(GuardedConnector):
    """The egress-guarded connector (``worker.egress``) with the reuse rules
    of this module's docstring."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._factory = functools.partial(_Handler, loop=self._loop)  # type: ignore[assignment]

    async def _get(self, key: Any, traces: Any) -> aiohttp.connector.Connection | None:
        if fresh_connection.get():
            return None  # aiohttp then opens a new one
        while True:
            conn = await super()._get(key, traces)
            if conn is None or conn.protocol is None or _still_open(conn.protocol):
                return conn
            conn.close()  # and try the next idle one

    def _release(self, key: Any, protocol: ResponseHandler, *, should_close: bool = False) -> None:
        super()._release(key, protocol, should_close=should_close)
        idle = self._conns.get(key)
        if idle and idle[-1][0] is protocol:
            idle.rotate(1)  # most recently used first
