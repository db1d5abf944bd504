"""The HTTP boundary: one aiohttp session per process, bounded reads, and
the one place where transport errors become refreshd's failure types.

The key question for every failure is "could the provider have received
the refresh token?" Only a failure *before* the request left is ``NotSent``
(safe to retry); anything later is ``Ambiguous`` and goes to the rotation
rule. aiohttp's exception types say which: a connector error (DNS,
refused, TLS handshake) or a connect timeout happens before any request
byte is written; a disconnect, reset or read timeout happens after.

Requests go straight to aiohttp: measured on the benchmark, the httpx
layer on top (client, models, URL parsing, the httpx-aiohttp adapter) was
about a fifth of the worker's CPU per refresh, and its error mapping hid
exactly the distinction above (every connection error became
``httpx.ConnectTimeout``).
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict

from worker import __version__
from worker.egress import EgressRefused, GuardedConnector, allow_private_network
from worker.errors import Ambiguous, NotSent, Permanent

__all__ = [
    "KEEPALIVE_S",
    "MAX_BODY_BYTES",
    "HttpAnswer",
    "PoolConnector",
    "TokenRequest",
    "make_http_client",
    "send",
]

MAX_BODY_BYTES = 64 * 1024
USER_AGENT = f"refreshd/{__version__}"
#: Longest idle time after which a pooled connection is still reused: under
#: the shortest idle timeout common servers use (gunicorn 2 s; Node.js,
#: Apache and uvicorn 5 s), so a server's own idle close never races a request.
KEEPALIVE_S = 1.5
#: aiohttp's words when a request's first write finds the connection already
#: closing: nothing of the request left this process.
_CLOSED_BEFORE_WRITE = "Cannot write to closing transport"
_HUNG_UP = select.POLLIN | select.POLLPRI | getattr(select, "POLLRDHUP", 0)

_NOT_SENT: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,  # DNS, refused, TLS handshake: no request bytes sent
    aiohttp.ConnectionTimeoutError,  # waiting for a connection or a connect
    aiohttp.InvalidURL,
)


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """What a strategy sends. Headers are case-insensitive."""

    method: str
    url: str
    headers: CIMultiDict[str]
    content: bytes = b""
    #: the profile's ``allow_private_network``: may the connection go to a
    #: loopback, private or link-local address (``worker.egress``)
    allow_private_network: bool = False


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: bytes
    truncated: bool


def _still_open(protocol: ResponseHandler) -> bool:
    """Has the server hung up on this idle connection, in a way our event
    loop has not read yet? An idle HTTP/1.1 connection has nothing to read:
    anything there (a FIN, a reset, a parting "408") means the server is
    closing it, and a request written now would cross that close and read
    as an unknown outcome. One ``poll`` with no wait: about a microsecond."""
    transport = protocol.transport
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None:
        return protocol.is_connected()
    poller = select.poll()
    poller.register(sock.fileno(), _HUNG_UP)
    return not poller.poll(0)


class PoolConnector(GuardedConnector):
    """The egress-guarded connector (``worker.egress``), reusing connections
    so that a request is not
    written onto one the server is closing (``send`` says why that matters
    more here than anywhere): the most recently used connection first, not
    the longest idle one (aiohttp's queue order), none idle past
    ``KEEPALIVE_S``, and each checked for a pending hang-up just before it
    is handed out. The two overrides are aiohttp internals, pinned in
    constraints.txt and covered by tests/test_keepalive.py."""

    async def _get(self, key: Any, traces: Any) -> aiohttp.connector.Connection | None:
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


def make_http_client(*, max_connections: int = 256) -> aiohttp.ClientSession:
    """One session (connection pool) per process, on ``PoolConnector``.
    aiohttp would add its own User-Agent; refreshd sets its own (and keeps
    aiohttp's Content-Type off a body-less request, ``send``). No cookie
    jar: one session serves every tenant, and a cookie set in one
    credential's answer must never ride along with another's request."""
    connector = PoolConnector(limit=max_connections, keepalive_timeout=KEEPALIVE_S)
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT},
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


#: aiohttp would declare a Content-Type on a body-less PUT (Workato's
#: rotation call). Asked per request, only where there is no body: a
#: session-wide skip list sent every request down aiohttp's slow header path.
_NO_BODY_HEADERS = ("Content-Type",)


@lru_cache(maxsize=64)
def _timeout(total_s: float) -> aiohttp.ClientTimeout:
    """The connect gets its own, shorter budget: a connect that never
    completes is then a clean "not sent" instead of running into the overall
    deadline (``send``), where the outcome would be unknown. aiohttp's own
    total and read timeouts stay off: measured, its timer machinery cost
    ~35 us per request, seven times what ``asyncio.timeout`` does."""
    connect = min(max(total_s / 2, 0.2), 5.0)
    return aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect,
                                 sock_read=None)  # fmt: skip


def _egress_refusal(exc: aiohttp.ClientError) -> Permanent | None:
    """A connection the egress guard refused: nothing was sent, and retrying
    cannot help until an operator fixes the profile (or its DNS), so it is
    a permanent ``egress_refused`` failure (the credential needs attention)."""
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, EgressRefused):
        return Permanent("egress_refused", exc.os_error.reason)
    return None


def _classify(exc: aiohttp.ClientError) -> NotSent | Ambiguous | Permanent:
    if (refused := _egress_refusal(exc)) is not None:
        return refused
    if isinstance(exc, _NOT_SENT):
        return NotSent("connect_error", type(exc).__name__)
    if _closed_before_write(exc):
        return NotSent("connection_closed", "closed before the request was written")
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return Ambiguous("timeout", type(exc).__name__)
    if isinstance(exc, aiohttp.ClientPayloadError):  # e.g. a broken gzip body
        return Ambiguous("invalid_response", type(exc).__name__)
    # resets, disconnects, bad status lines, oversized headers, bad chunks
    return Ambiguous("transport_error", type(exc).__name__)


def _closed_before_write(exc: BaseException) -> bool:
    """The server's hang-up reached our event loop after the connection was
    handed to this request but before its one write (headers and body go
    out together): aiohttp refuses the write, and nothing was sent."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectionResetError) and str(cause) == (
            _CLOSED_BEFORE_WRITE
        ):
            return True
        cause = cause.__cause__
    return False


async def send(
    session: aiohttp.ClientSession, request: TokenRequest, *, timeout_s: float
) -> HttpAnswer:
    """Send ``request`` and read at most ``MAX_BODY_BYTES`` of the answer,
    all within ``timeout_s`` (the caller has already fitted it inside the
    lease). Raises ``NotSent`` or ``Ambiguous``, or ``Permanent`` when the
    egress guard refused the address (nothing sent); never a foreign error."""
    req = request
    allow_private_network.set(req.allow_private_network)  # read by the connector
    try:
        # the whole exchange - connect, send, read the body - fits in timeout_s
        async with (
            asyncio.timeout(timeout_s),
            session.request(
                req.method,
                req.url,
                headers=req.headers,
                data=req.content or None,
                skip_auto_headers=None if req.content else _NO_BODY_HEADERS,
                allow_redirects=False,
                timeout=_timeout(timeout_s),
            ) as response,
        ):
            chunks: list[bytes] = []
            size = 0
            truncated = False
            while chunk := await response.content.readany():
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    truncated = True
                    break
            headers = response.headers  # immutable, outlives the response
            status = response.status
    except aiohttp.ClientError as exc:
        # first: aiohttp's timeouts are also TimeoutErrors, and a connect
        # timeout means nothing was sent
        raise _classify(exc) from exc
    except TimeoutError:
        raise Ambiguous("timeout", f"no answer within {timeout_s:g}s") from None
    return HttpAnswer(status, headers, b"".join(chunks), truncated)
