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
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from ssl import SSLContext

import aiohttp
from multidict import CIMultiDict

from worker import __version__
from worker.connpool import KEEPALIVE_S, PoolConnector, ServerClosedFirst, fresh_connection
from worker.egress import EgressRefused, allow_private_network
from worker.errors import Ambiguous, NotSent, Permanent
from worker.tlstrust import trust_context

__all__ = [
    "MAX_BODY_BYTES",
    "HttpAnswer",
    "TokenRequest",
    "make_http_client",
    "send",
]

MAX_BODY_BYTES = 64 * 1024
USER_AGENT = f"refreshd/{__version__}"
#: aiohttp's words when a request's first write finds the connection already
#: closing: nothing of the request left this process.
_CLOSED_BEFORE_WRITE = "Cannot write to closing transport"

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
    #: the profile's ``fresh_connection``: a new connection, closed after
    #: the answer (``worker.connpool``)
    fresh_connection: bool = False


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: bytes
    truncated: bool


def make_http_client(
    *, max_connections: int = 256, max_per_host: int = 0, ca_file: str = ""
) -> aiohttp.ClientSession:
    """One session (connection pool) per process, on ``PoolConnector``.
    aiohttp would add its own User-Agent; refreshd sets its own (and keeps
    aiohttp's Content-Type off a body-less request, ``send``). No cookie
    jar: one session serves every tenant, and a cookie set in one
    credential's answer must never ride along with another's request.
    ``max_per_host`` (0: no cap) keeps a catch-up from opening every
    connection to one provider; ``ca_file`` adds a CA to the system store
    for every request (``worker.tlstrust``)."""
    connector = PoolConnector(
        limit=max_connections,
        limit_per_host=max_per_host,
        keepalive_timeout=KEEPALIVE_S,
        ssl=trust_context(ca_file) or True,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT},
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
    # aiohttp silently sends a GET or PUT again when its connection breaks
    # after sending (RFC 9112 §9.3.1.1): a refresh token would go out twice.
    # The unknown-outcome rule decides instead (as aiohttp's own test client).
    session._retry_connection = False
    return session


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
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert = exc.certificate_error
        detail = getattr(cert, "verify_message", "") or str(cert)
        return NotSent("tls_error", f"certificate: {detail}"[:200])
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return NotSent("tls_error", f"handshake: {exc.os_error}"[:200])
    if isinstance(exc, _NOT_SENT):
        return NotSent("connect_error", type(exc).__name__)
    if isinstance(exc, ServerClosedFirst):
        return NotSent("connection_closed", "the server closed before the request reached it")
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
    session: aiohttp.ClientSession,
    request: TokenRequest,
    *,
    timeout_s: float,
    ssl: SSLContext | None = None,
) -> HttpAnswer:
    """Send ``request`` and read at most ``MAX_BODY_BYTES`` of the answer,
    all within ``timeout_s`` (the caller has already fitted it inside the
    lease). Raises ``NotSent`` or ``Ambiguous``, or ``Permanent`` when the
    egress guard refused the address (nothing sent); never a foreign error.
    ``ssl``: the profile's trust (its ``ca_pem``), else the session's."""
    req = request
    allow_private_network.set(req.allow_private_network)  # read by the connector
    fresh_connection.set(req.fresh_connection)  # likewise
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
                ssl=True if ssl is None else ssl,
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
