"""A real ``oidc-provider`` (panva, pinned in ``oidc/package.json``) run as a
loopback child process: the strictest refresh-token peer refreshd has.

Every refresh rotates the refresh token, and presenting a rotated one again
revokes the whole grant (its newest refresh token included). The peer's own
error text is always the generic "grant request is invalid"; ``stats()``
says what it actually saw. See ``oidc/server.mjs`` for the server side.

Install once: ``npm ci --prefix tests/interop/oidc``.

The node process is ours and always reaped: ``stop()`` ends it, a finalizer
ends it if a test forgets, and it exits by itself when its stdin closes, so
even a SIGKILLed pytest cannot leak it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import subprocess
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.lifecycle import StartStop

__all__ = ["MAX_MINT_PER_CALL", "MintedGrant", "OidcPeer", "PeerStats"]

PEER_DIR = Path(__file__).resolve().parent / "oidc"
SERVER_SCRIPT = PEER_DIR / "server.mjs"
INSTALL_HINT = "run `npm ci --prefix tests/interop/oidc`"
MIN_NODE_MAJOR = 20
MAX_MINT_PER_CALL = 500
"""The server's cap per ``POST /__mint``; ``mint()`` splits larger requests."""

_STDERR_TAIL_LINES = 60


@dataclass(frozen=True, slots=True)
class MintedGrant:
    """Tokens from one fresh grant's authorization-code exchange."""

    access_token: str
    refresh_token: str
    expires_in: int
    scope: str


@dataclass(frozen=True, slots=True)
class PeerStats:
    """Counters since the peer started (``GET /__stats``).

    ``refreshes``: successful ``grant_type=refresh_token`` requests.
    ``reuse``: token requests that presented a refresh token the peer had
    already rotated, whatever the outcome; one per request. The peer's own
    detection ("refresh token already used"), a replay after the grant was
    revoked ("refresh token not found") and a loser of two concurrent
    rotations all count. ``reuse_by_reason`` splits it by those reasons.
    ``revoked``: revocations (``grant.revoked`` events, plus the peer's
    concurrent-rotation guard); racing duplicates may revoke one grant twice.
    ``revoked_grants``: distinct grants revoked.
    ``errors``: every token-endpoint error, keyed ``"<error>: <detail>"``.
    ``minted``: grants minted through ``mint()``.
    """

    refreshes: int
    reuse: int
    revoked: int
    revoked_grants: int
    errors: dict[str, int]
    reuse_by_reason: dict[str, int]
    minted: int


def _node_binary() -> str | None:
    return os.environ.get("OIDC_PEER_NODE") or shutil.which("node")


def _pinned_version() -> str | None:
    try:
        manifest = json.loads((PEER_DIR / "package.json").read_text())
        version = manifest["dependencies"]["oidc-provider"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return version if isinstance(version, str) else None


def _installed_version() -> str | None:
    path = PEER_DIR / "node_modules" / "oidc-provider" / "package.json"
    try:
        version = json.loads(path.read_text())["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return version if isinstance(version, str) else None


def _node_major(node: str) -> int | None:
    try:
        out = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        return int(out.strip().lstrip("v").split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class _Child:
    """The process and its output readers, apart from ``OidcPeer`` so the
    finalizer can reach them without keeping the peer alive."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.stdout_lines: queue.Queue[str | None] = queue.Queue()
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        self.readers: list[threading.Thread] = []

    def reap(self, grace: float = 3.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for reader in self.readers:
            reader.join(grace)
        self.readers = []

    def tail(self) -> str:
        return "\n".join(self.stderr_tail) or "(no stderr output)"


def _pump_stdout(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert proc.stdout is not None
    with proc.stdout:
        for line in proc.stdout:
            lines.put(line)
    lines.put(None)


def _pump_stderr(proc: subprocess.Popen[str], tail: deque[str]) -> None:
    assert proc.stderr is not None
    with proc.stderr:
        for line in proc.stderr:
            tail.append(line.rstrip("\n"))


class OidcPeer(StartStop):
    """``node oidc/server.mjs`` on an OS-chosen 127.0.0.1 port.

    One confidential client (``client_secret_basic``; oidc-provider also
    takes the same secret as ``client_secret_post``) with the
    ``authorization_code`` and ``refresh_token`` grants; every grant has
    ``openid offline_access`` and a refresh token.
    """

    def __init__(
        self,
        *,
        client_id: str = "refreshd-interop",
        client_secret: str | None = None,
        access_token_ttl: int = 60,
        refresh_token_ttl: int | None = None,
        startup_timeout: float = 20.0,
        request_timeout: float = 120.0,
    ) -> None:
        if access_token_ttl < 1:
            raise ValueError("access_token_ttl must be >= 1")
        if refresh_token_ttl is not None and refresh_token_ttl < 1:
            raise ValueError("refresh_token_ttl must be >= 1")
        self._client_id = client_id
        # URL-safe alphabet: the Basic header needs no form-encoding.
        self._client_secret = client_secret or secrets.token_urlsafe(32)
        self._access_token_ttl = access_token_ttl
        self._refresh_token_ttl = refresh_token_ttl
        self._startup_timeout = startup_timeout
        self._request_timeout = request_timeout
        self._issuer: str | None = None
        self._port: int | None = None
        self._http: httpx.Client | None = None
        self._child = _Child()
        self._finalizer = weakref.finalize(self, self._child.reap)

    # -- availability ------------------------------------------------------

    @staticmethod
    def available() -> str | None:
        """None if the peer can run here, else why not (for ``pytest.skip``)."""
        node = _node_binary()
        if node is None:
            return "node is not installed (need Node.js >= 20 on PATH or OIDC_PEER_NODE)"
        major = _node_major(node)
        if major is None:
            return f"could not run `{node} --version`"
        if major < MIN_NODE_MAJOR:
            return f"node {major} is too old for oidc-provider (need >= {MIN_NODE_MAJOR})"
        installed = _installed_version()
        if installed is None:
            return f"oidc-provider is not installed: {INSTALL_HINT}"
        pinned = _pinned_version()
        if pinned is not None and installed != pinned:
            return f"oidc-provider {installed} installed but {pinned} pinned: {INSTALL_HINT}"
        if not SERVER_SCRIPT.is_file():
            return f"{SERVER_SCRIPT} is missing"
        return None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Launch and wait for the ready line; raises RuntimeError (with the
        tail of the server's stderr) if it does not come up in time."""
        if self.running:
            return
        self._child.reap()
        reason = self.available()
        if reason is not None:
            raise RuntimeError(f"oidc peer unavailable: {reason}")
        node = _node_binary()
        assert node is not None
        args = [
            node,
            str(SERVER_SCRIPT),
            "--port",
            "0",
            "--client-id",
            self._client_id,
            "--access-token-ttl",
            str(self._access_token_ttl),
            "--exit-with-stdin",
        ]
        if self._refresh_token_ttl is not None:
            args += ["--refresh-token-ttl", str(self._refresh_token_ttl)]
        # The secret goes through the environment: argv is world-readable.
        env = {**os.environ, "OIDC_PEER_CLIENT_SECRET": self._client_secret}
        env.pop("OIDC_PEER_PORT", None)
        child = _Child()
        self._child = child
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, child.reap)
        child.proc = subprocess.Popen(
            args,
            cwd=PEER_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        child.readers = [
            threading.Thread(
                target=_pump_stdout, args=(child.proc, child.stdout_lines), daemon=True
            ),
            threading.Thread(
                target=_pump_stderr, args=(child.proc, child.stderr_tail), daemon=True
            ),
        ]
        for reader in child.readers:
            reader.start()
        try:
            ready = self._await_ready(child)
        except BaseException:
            child.reap()
            raise
        self._port = int(ready["port"])
        self._issuer = str(ready["issuer"])
        self._http = httpx.Client(base_url=self._issuer, timeout=self._request_timeout)

    def _await_ready(self, child: _Child) -> dict[str, Any]:
        deadline = time.monotonic() + self._startup_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"oidc peer not ready within {self._startup_timeout}s\n"
                    f"--- stderr (tail)\n{child.tail()}"
                )
            try:
                line = child.stdout_lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:
                assert child.proc is not None
                code = child.proc.wait()
                for reader in child.readers:
                    reader.join(1.0)
                raise RuntimeError(
                    f"oidc peer exited with status {code} before it was ready\n"
                    f"--- stderr (tail)\n{child.tail()}"
                )
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("ready") is True:
                return message

    def stop(self) -> None:
        """End the process (SIGTERM, then SIGKILL) and wait for it."""
        if self._http is not None:
            self._http.close()
            self._http = None
        self._child.reap()
        self._issuer = None
        self._port = None

    # -- properties --------------------------------------------------------

    @property
    def running(self) -> bool:
        proc = self._child.proc
        return proc is not None and proc.poll() is None and self._issuer is not None

    @property
    def pid(self) -> int:
        if self._child.proc is None:
            raise RuntimeError("oidc peer is not running")
        return self._child.proc.pid

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("oidc peer is not running")
        return self._port

    @property
    def issuer(self) -> str:
        if self._issuer is None:
            raise RuntimeError("oidc peer is not running")
        return self._issuer

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def client_secret(self) -> str:
        return self._client_secret

    @property
    def stderr_tail(self) -> str:
        """The last lines the server wrote to stderr (it logs no secrets)."""
        return self._child.tail()

    # -- admin endpoints ---------------------------------------------------

    def _client(self) -> httpx.Client:
        if self._http is None or not self.running:
            raise RuntimeError("oidc peer is not running")
        return self._http

    def mint(self, n: int = 1) -> list[MintedGrant]:
        """``n`` fresh grants, each through a full authorization-code + PKCE
        flow with an immediately approved login and consent."""
        if n < 1:
            raise ValueError("n must be >= 1")
        client = self._client()
        grants: list[MintedGrant] = []
        while len(grants) < n:
            batch = min(MAX_MINT_PER_CALL, n - len(grants))
            response = client.post("/__mint", params={"n": batch})
            if response.status_code != httpx.codes.OK:
                raise RuntimeError(
                    f"mint failed: {response.status_code} {response.text[:300]}\n"
                    f"--- stderr (tail)\n{self.stderr_tail}"
                )
            grants.extend(
                MintedGrant(
                    access_token=str(item["access_token"]),
                    refresh_token=str(item["refresh_token"]),
                    expires_in=int(item["expires_in"]),
                    scope=str(item["scope"]),
                )
                for item in response.json()
            )
        return grants

    def stats(self) -> PeerStats:
        response = self._client().get("/__stats")
        response.raise_for_status()
        data = response.json()
        return PeerStats(
            refreshes=int(data["refreshes"]),
            reuse=int(data["reuse"]),
            revoked=int(data["revoked"]),
            revoked_grants=int(data["revoked_grants"]),
            errors={str(k): int(v) for k, v in data["errors"].items()},
            reuse_by_reason={str(k): int(v) for k, v in data["reuse_by_reason"].items()},
            minted=int(data["minted"]),
        )
