"""Guarded egress: token requests go to public addresses unless a profile allows private ones.

A token request carries a client secret and a refresh token; pointed at a
cloud metadata service, the cluster's API server or an internal admin
port, it would hand them over (or fetch credentials for an attacker who
controls a profile). Two layers:

- ``check_token_host`` refuses the obvious cases when a profile is
  written (literal private IPs, ``localhost``, ``*.svc``,
  ``*.cluster.local``, ``metadata.google.internal``, single-label names
  that a cluster's DNS search path would complete). It lives in
  ``worker.tokenhosts`` (re-exported here), which needs no aiohttp.
- At run time, the connector's socket factory checks every address a
  new connection is about to connect to, whatever produced it (a literal
  IP, a cached or fresh DNS answer): a name that resolves, or later
  re-resolves (DNS rebinding), to a refused address never gets a
  connection. A pooled connection is checked again on reuse, since the
  pool is keyed by host, not by profile. The check costs one cached
  lookup per connection and a context-variable read per request.

The policy for the request in progress travels in a context variable set
by ``worker.transport.send`` (the connector runs in the same task), so one
session serves profiles with and without ``allow_private_network``.
A refused address raises ``EgressRefused`` before anything is sent.
"""

from __future__ import annotations

import contextvars
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.client_reqrep import ClientRequest
from aiohttp.tracing import Trace

from worker.tokenhosts import HINT, check_token_host, refused_address

__all__ = [
    "EgressRefused",
    "GuardedConnector",
    "allow_private_network",
    "check_connect_address",
    "check_token_host",
    "refused_address",
]

#: Whether the request in progress may reach private addresses. The default
#: is the safe one: code that forgets to say gets the guard.
allow_private_network: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "refreshd_allow_private_network", default=False
)

SocketFactory = Callable[[Any], socket.socket]


class EgressRefused(OSError):
    """The address a token request was about to connect to is not public.
    Its text is the same for every address (the happy-eyeballs connector
    raises one of several failures only when their texts are equal); the
    class of address is in ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__("egress refused: the token host's address is not public")
        self.kind = kind

    @property
    def reason(self) -> str:
        return f"the token host resolves to a {self.kind} address ({HINT})"


def check_connect_address(addr_info: Any) -> None:
    """Refuse the address a new connection attempt is about to connect to,
    unless the request in progress allows private networks."""
    if not allow_private_network.get():
        kind = refused_address(addr_info[4][0])
        if kind is not None:
            raise EgressRefused(kind)


def guarded_socket(addr_info: Any) -> socket.socket:
    """aiohappyeyeballs' socket factory: called with the exact address each
    new connection attempt is about to connect to."""
    check_connect_address(addr_info)
    family, type_, proto, _, _ = addr_info
    return socket.socket(family=family, type=type_, proto=proto)


class GuardedConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` whose new connections go through ``guarded_socket``
    and whose reused ones are checked against the current request's policy
    (a connection opened for a profile that allows private networks may be
    pooled under the same host as one that does not)."""

    def __init__(self, *, socket_factory: SocketFactory | None = None, **kwargs: Any) -> None:
        if socket_factory is None:
            factory: SocketFactory = guarded_socket
        else:  # a caller's own factory (socket options, say) runs after the check
            inner = socket_factory

            def factory(addr_info: Any) -> socket.socket:
                check_connect_address(addr_info)
                return inner(addr_info)

        super().__init__(socket_factory=factory, **kwargs)

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> aiohttp.connector.Connection:
        conn = await super().connect(req, traces, timeout)
        if allow_private_network.get():
            return conn
        transport = conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        kind = refused_address(peer[0]) if peer else "unknown"
        if kind is not None:
            conn.close()  # never back to the pool
            raise aiohttp.ClientConnectorError(req.connection_key, EgressRefused(kind))
        return conn
