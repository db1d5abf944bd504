"""A strict local OAuth 2.0 token endpoint for the demo, the test suite and the benchmarks.

refreshd promises that a refresh token is never sent twice. Providers that rotate refresh
tokens treat a second presentation as theft and revoke the whole grant, so this server does
the same, and counts every presentation of every refresh token (`send_counts`) so that tests
can prove the promise rather than assume it. Injected faults reproduce the failures that make
the promise hard: the token was consumed, but the answer never arrived.

Everything runs on one event loop and each refresh is processed without awaiting, so the
lookup-and-rotate step is atomic without locks. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import secrets
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, Self, get_args
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web
from multidict import CIMultiDict

FaultKind = Literal[
    "status", "hang", "process_then_hang", "process_then_drop", "drop", "malformed", "delay"
]
_AUTH_METHODS = frozenset({"client_secret_basic", "client_secret_post", "none", "any"})
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1
_FORM = "application/x-www-form-urlencoded"
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER 0: close() sends RST, not FIN
_MALFORMED_BODY = b'{"access_token": "trunc'
# Only a client stuck mid-body can outlive the closing event; don't wait long for it.
_SHUTDOWN_TIMEOUT_S = 1.0

_Params = dict[str, str]
_Outcome = tuple[int, dict[str, object], dict[str, str] | None]


@dataclass(frozen=True, slots=True)
class FakeProviderConfig:
    """How the provider behaves; each knob mirrors a quirk of some real provider."""

    client_id: str = "demo-client"
    client_secret: str = "demo-secret"  # noqa: S105 - a published demo credential
    #: client_secret_basic | client_secret_post | none (client_id only) | any of them;
    #: a request authenticating another way gets 401 invalid_client.
    auth_method: str = "client_secret_basic"
    lifetime_s: int = 3600
    #: Rotation only happens when the new token is also returned; otherwise the grant
    #: would be unusable after its first refresh.
    rotate: bool = True
    #: A superseded refresh token keeps working for this long (Okta-style grace).
    reuse_grace_s: float = 0.0
    revoke_on_reuse: bool = True
    #: Length in characters of access tokens; benchmarks use JWT-like sizes (~800).
    access_token_bytes: int = 64
    latency_s: float = 0.0
    expires_in_as_string: bool = False
    omit_expires_in: bool = False
    #: GitHub-style ``refresh_token_expires_in`` in each answer (0: not sent)
    refresh_token_expires_in: int = 0
    return_refresh_token: bool = True
    accept_json_body: bool = True

    def __post_init__(self) -> None:
        if self.auth_method not in _AUTH_METHODS:
            raise ValueError(f"auth_method must be one of {sorted(_AUTH_METHODS)}")
        if self.access_token_bytes < 1 or self.lifetime_s < 0:
            raise ValueError("access_token_bytes must be >= 1 and lifetime_s >= 0")
        if self.reuse_grace_s < 0 or self.latency_s < 0:
            raise ValueError("reuse_grace_s and latency_s must be >= 0")


@dataclass(frozen=True, slots=True)
class IssuedGrant:
    """Credentials minted by `FakeProvider.issue_grant`, to seed a client under test."""

    grant_id: str
    access_token: str
    refresh_token: str
    expires_in: int
    scope: str


@dataclass(frozen=True, slots=True)
class GrantState:
    """A snapshot of one grant, so tests can check what the client should now hold."""

    grant_id: str
    access_token: str
    refresh_token: str
    scope: str
    revoked: bool
    refreshes: int


@dataclass(frozen=True, slots=True)
class ReuseEvent:
    """A superseded refresh token was presented outside the grace window: the bug refreshd
    exists to prevent. `at` is wall-clock time (time.time()) for correlating with logs."""

    grant_id: str
    at: float
    refresh_token: str = ""


@dataclass(slots=True)
class ProviderStats:
    """Counters for assertions. `rejected` counts error answers of the provider's own logic
    (not injected faults); `faults` counts requests that consumed a fault."""

    requests: int = 0
    refreshed: int = 0
    reuse_events: list[ReuseEvent] = field(default_factory=list)
    rejected: int = 0
    revoked_grants: int = 0
    faults: int = 0


@dataclass(frozen=True, slots=True)
class Fault:
    """One misbehaviour, consumed by the next request (presenting `match_refresh_token`, if
    set). `delay_s` is slept first whatever the kind. For "status", `body` is sent as given:
    a mapping as JSON, str as text/plain, bytes raw, unless `headers` sets Content-Type.
    For "malformed", `body` replaces the default truncated JSON."""

    kind: FaultKind
    match_refresh_token: str | None = None
    status: int = 500
    body: str | bytes | Mapping[str, object] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in get_args(FaultKind):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if not 100 <= self.status <= 599 or self.delay_s < 0:
            raise ValueError("status must be 100..599 and delay_s >= 0")


@dataclass(slots=True)
class _Grant:
    """Server-side grant, mutated in place on every refresh."""

    grant_id: str
    scope: str
    access_token: str
    refresh_token: str
    revoked: bool = False
    refreshes: int = 0


class FakeProvider:
    """The token endpoint. Use `async with FakeProvider(config) as p:` and point the client
    at `p.url`. Superseded refresh tokens are remembered forever (that is how reuse is
    detected), so memory grows by one small entry per rotation."""

    def __init__(
        self,
        config: FakeProviderConfig | None = None,
        *,
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = cfg = config or FakeProviderConfig()
        self.stats = ProviderStats()
        #: How many times each refresh token value arrived, whatever the outcome.
        self.send_counts: dict[str, int] = {}
        #: Every access and refresh token this provider issued, oldest first (tests
        #: look for each of them where no token may be; grows like the spent list).
        self.minted: list[str] = []
        #: FIFO of pending faults; `inject` appends.
        self.faults: deque[Fault] = deque()
        self._port = port
        #: serve https with this context (tests of private CAs), else http
        self._ssl = ssl_context
        self._runner: web.ServerRunner | None = None
        self._closing = asyncio.Event()
        self._grants: dict[str, _Grant] = {}
        self._live: dict[str, _Grant] = {}  # current refresh token -> grant
        self._spent: dict[str, tuple[_Grant, float]] = {}  # superseded -> (grant, monotonic)
        self._seq = 0
        self._rotate = cfg.rotate and cfg.return_refresh_token
        self._at_nbytes = -(-cfg.access_token_bytes * 3 // 4)  # base64 of this >= the length
        self._client_id = cfg.client_id.encode()
        self._client_secret = cfg.client_secret.encode()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Listen on 127.0.0.1. The low-level server skips routing, middleware and access
        logging: one endpoint does not need them and benchmarks feel their cost."""
        if self._runner is not None:
            raise RuntimeError("FakeProvider already started")
        self._closing = asyncio.Event()
        runner = web.ServerRunner(
            web.Server(self._handle, access_log=None), shutdown_timeout=_SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self._port, ssl_context=self._ssl).start()
            self._port = runner.addresses[0][1]
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def aclose(self) -> None:
        """Stop. Hanging handlers wake on the closing event and drop their connections, so
        shutdown does not wait for them."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        await runner.cleanup()

    @property
    def url(self) -> str:
        """The token endpoint, http://127.0.0.1:PORT/token (https with a context)."""
        if self._runner is None:
            raise RuntimeError("FakeProvider is not running")
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://127.0.0.1:{self._port}/token"

    def issue_grant(self, scope: str = "read write") -> IssuedGrant:
        """Mint a grant without HTTP, standing in for the authorization-code step."""
        self._seq += 1
        g = _Grant(f"grant-{self._seq}", " ".join(scope.split()), self._access_token(), "")
        g.refresh_token = rt = self._refresh_token()
        self._grants[g.grant_id] = self._live[rt] = g
        return IssuedGrant(g.grant_id, g.access_token, rt, self.config.lifetime_s, g.scope)

    def grant_state(self, grant_id: str) -> GrantState:
        """Current tokens of a grant; raises KeyError for an unknown id."""
        g = self._grants[grant_id]
        return GrantState(
            g.grant_id, g.access_token, g.refresh_token, g.scope, g.revoked, g.refreshes
        )

    def revoke_grant(self, grant_id: str) -> None:
        """Revoke as a user withdrawing consent would; later refreshes get invalid_grant."""
        self._revoke(self._grants[grant_id])

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each is consumed by one matching request, in order."""
        self.faults.extend(faults)

    # --- HTTP ---------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.stats.requests += 1
        if request.path != "/token":
            self.stats.rejected += 1
            return web.Response(status=404)
        if request.method != "POST":
            self.stats.rejected += 1
            return web.Response(status=405, headers={"Allow": "POST"})
        params, parse_error = self._parse(request.content_type, await request.read())
        rt = params.get("refresh_token")
        if rt is not None:
            self.send_counts[rt] = self.send_counts.get(rt, 0) + 1
        authorization = request.headers.get("Authorization")
        fault = self._take_fault(rt) if self.faults else None
        if fault is not None:
            self.stats.faults += 1
            if fault.delay_s > 0 and await self._pause(fault.delay_s):
                return _abandon(request)
            if fault.kind != "delay":
                process = partial(self._process, params, parse_error, authorization)
                return await self._apply(fault, request, process)
        if self.config.latency_s > 0 and await self._pause(self.config.latency_s):
            return _abandon(request)
        return _json(*self._process(params, parse_error, authorization))

    async def _apply(
        self, fault: Fault, request: web.BaseRequest, process: Callable[[], object]
    ) -> web.StreamResponse:
        kind = fault.kind
        if kind == "status":
            return _fault_response(fault)
        if kind in ("process_then_hang", "process_then_drop", "malformed"):
            process()  # the outcome is lost on purpose: the token is spent all the same
        if kind == "malformed":
            body = fault.body.encode() if isinstance(fault.body, str) else fault.body
            body = body if isinstance(body, bytes) else _MALFORMED_BODY
            return web.Response(body=body, content_type="application/json", headers=_NO_STORE)
        if kind in ("hang", "process_then_hang"):
            await self._closing.wait()
        return _abandon(request)

    async def _pause(self, seconds: float) -> bool:
        """Sleep, waking early if the server closes; True means it is closing."""
        try:
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        except TimeoutError:
            return False
        return True

    def _take_fault(self, refresh_token: str | None) -> Fault | None:
        for i, fault in enumerate(self.faults):
            if fault.match_refresh_token is None or fault.match_refresh_token == refresh_token:
                del self.faults[i]
                return fault
        return None

    def _parse(self, content_type: str, raw: bytes) -> tuple[_Params, str | None]:
        """Decode the body strictly: RFC 6749 §3.1 forbids repeated parameters."""
        try:
            if content_type == _FORM:
                pairs = parse_qsl(raw.decode(), keep_blank_values=True)
                params = dict(pairs)
                if len(params) != len(pairs):
                    return params, "repeated parameter"
                return params, None
            if content_type == "application/json" and self.config.accept_json_body:
                doc = json.loads(raw)
                if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
                    return {}, "JSON body must be an object of strings"
                return doc, None
        except (UnicodeDecodeError, ValueError):
            return {}, "malformed body"
        return {}, f"unsupported content type {content_type!r}"

    # --- OAuth --------------------------------------------------------------------------

    def _process(
        self, params: _Params, parse_error: str | None, authorization: str | None
    ) -> _Outcome:
        """Validate and redeem one refresh request; never awaits, so it is atomic."""
        if parse_error is not None:
            return self._error(400, "invalid_request", parse_error)
        client_error = self._client_error(params, authorization)
        if client_error is not None:
            challenge = {"WWW-Authenticate": 'Basic realm="token"'} if authorization else None
            return self._error(401, "invalid_client", client_error, challenge)
        if params.get("grant_type") != "refresh_token":
            return self._error(400, "unsupported_grant_type", "only refresh_token is supported")
        rt = params.get("refresh_token")
        if not rt:
            return self._error(400, "invalid_request", "missing refresh_token")
        return self._redeem(rt, params.get("scope"))

    def _client_error(self, params: _Params, authorization: str | None) -> str | None:
        """Identify the one authentication method used (RFC 6749 §2.3), then check it."""
        body_id, secret = params.get("client_id"), params.get("client_secret")
        client_id: str | None = body_id
        if authorization is not None:
            if secret is not None:
                return "more than one client authentication method"
            method = "client_secret_basic"
            credentials = _parse_basic(authorization)
            if credentials is None:
                return "malformed Basic credentials"
            client_id, secret = credentials
            if body_id is not None and body_id != client_id:
                return "client_id does not match the Basic credentials"
        elif secret is not None:
            method = "client_secret_post"
        elif body_id is not None:
            method = "none"
        else:
            return "client authentication required"
        if self.config.auth_method not in (method, "any"):
            return f"client must use {self.config.auth_method}, not {method}"
        ok = client_id is not None and hmac.compare_digest(client_id.encode(), self._client_id)
        if secret is not None:
            ok = hmac.compare_digest(secret.encode(), self._client_secret) and ok
        return None if ok else "unknown client or wrong secret"

    def _redeem(self, rt: str, scope: str | None) -> _Outcome:
        cfg = self.config
        now = time.monotonic()
        grant = self._live.get(rt)
        if grant is None:
            spent = self._spent.get(rt)
            if spent is None:
                return self._error(400, "invalid_grant", "unknown refresh token")
            grant, superseded_at = spent
            if not now - superseded_at < cfg.reuse_grace_s:
                self.stats.reuse_events.append(ReuseEvent(grant.grant_id, time.time(), rt))
                if cfg.revoke_on_reuse:
                    self._revoke(grant)
                return self._error(400, "invalid_grant", "refresh token already used")
        if grant.revoked:
            return self._error(400, "invalid_grant", "grant revoked")
        if scope:
            wanted = scope.split()
            if not set(wanted) <= set(grant.scope.split()):
                return self._error(400, "invalid_scope", "scope exceeds the grant")
            scope = " ".join(wanted)
        else:
            scope = grant.scope
        grant.access_token = self._access_token()
        grant.refreshes += 1
        if self._rotate:
            old = grant.refresh_token
            del self._live[old]
            self._spent[old] = (grant, now)
            grant.refresh_token = new = self._refresh_token()
            self._live[new] = grant
        self.stats.refreshed += 1
        body: dict[str, object] = {"access_token": grant.access_token, "token_type": "Bearer"}
        if not cfg.omit_expires_in:
            lifetime = cfg.lifetime_s
            body["expires_in"] = str(lifetime) if cfg.expires_in_as_string else lifetime
        if cfg.refresh_token_expires_in:
            body["refresh_token_expires_in"] = cfg.refresh_token_expires_in
        if cfg.return_refresh_token:
            body["refresh_token"] = grant.refresh_token
        body["scope"] = scope
        return 200, body, None

    def _error(
        self, status: int, error: str, description: str, headers: dict[str, str] | None = None
    ) -> _Outcome:
        self.stats.rejected += 1
        return status, {"error": error, "error_description": description}, headers

    def _revoke(self, grant: _Grant) -> None:
        if not grant.revoked:
            grant.revoked = True
            self.stats.revoked_grants += 1

    def _access_token(self) -> str:
        token = secrets.token_urlsafe(self._at_nbytes)[: self.config.access_token_bytes]
        self.minted.append(token)
        return token

    def _refresh_token(self) -> str:
        token = secrets.token_urlsafe(32)
        self.minted.append(token)
        return token


def _parse_basic(authorization: str) -> tuple[str, str] | None:
    """RFC 6749 §2.3.1: id and secret are form-encoded before Basic encoding, so a '+' that
    the client failed to encode arrives as a space and fails, as at strict providers."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    return (unquote_plus(client_id), unquote_plus(secret)) if sep else None


def _json(status: int, body: dict[str, object], headers: dict[str, str] | None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
        headers=_NO_STORE if headers is None else {**_NO_STORE, **headers},
    )


def _fault_response(fault: Fault) -> web.Response:
    headers: CIMultiDict[str] = CIMultiDict(fault.headers)
    body = fault.body
    if isinstance(body, str):
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        data = body.encode()
    elif body is None or isinstance(body, bytes):
        data = body or b""
    else:
        headers.setdefault("Content-Type", "application/json")
        data = json.dumps(dict(body)).encode()
    return web.Response(status=fault.status, body=data, headers=headers)


def _abandon(request: web.BaseRequest) -> web.Response:
    """Reset the connection without answering. aiohttp then fails to write the returned
    response, which it treats as a client disconnect: no log, no warning."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()
    return web.Response(status=500)
