"""Processes the benchmark runs and measures: Valkey, the token endpoint,
refreshd workers, arq workers. CPU time is read per process from /proc."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.redis_server import RedisServer, free_port

__all__ = [
    "REPO",
    "Endpoint",
    "ProcGroup",
    "RefreshdWorker",
    "cpu_seconds",
    "fresh_valkey",
    "start_valkey",
]

REPO = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads, from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def start_valkey(data_dir: Path, *, fsync: str) -> RedisServer:
    """A private server as production would run it for refreshd: AOF on,
    no eviction. ``fsync`` is ``appendfsync`` (everysec is the usual
    production choice; always is what the test suite uses)."""
    server = RedisServer(
        data_dir,
        config={
            "appendonly": "yes",
            "appendfsync": fsync,
            "maxmemory-policy": "noeviction",
            "auto-aof-rewrite-percentage": "0",  # no rewrite fork inside a timed window
        },
    )
    server.start()
    return server


def fresh_valkey(work: Path, *, fsync: str) -> RedisServer:
    """``start_valkey`` in ``work/redis`` after emptying ``work``: a
    measurement that reads used_memory must not start from a previous
    run's data."""
    shutil.rmtree(work, ignore_errors=True)
    return start_valkey(work / "redis", fsync=fsync)


def _http_json(url: str, *, method: str = "GET", timeout: float = 5.0) -> Any:
    req = urllib.request.Request(  # noqa: S310 - http://127.0.0.1 only
        url, method=method, data=b"" if method == "POST" else None
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read())


def _http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return str(resp.read().decode())


def _bench_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class Endpoint:
    """The token endpoint (bench.endpoint) in its own process."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self._log = (log_dir / "endpoint.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.endpoint", "--port", str(self.port)],
            env=_bench_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self.stats()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("token endpoint did not start") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict[str, Any]:
        return dict(_http_json(f"http://127.0.0.1:{self.port}/stats"))

    def reset(self, *, expires_in: int) -> None:
        _http_json(f"http://127.0.0.1:{self.port}/reset?expires_in={expires_in}", method="POST")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    dump: Path
    http_port: int = 0
    last_seq: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid


class ProcGroup:
    """Worker processes of one kind with the probe (bench.probe) attached:
    started together, dumped together (SIGUSR1), stopped together."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[_Child] = []
        self._logs: list[Any] = []

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> _Child:
        dump = self.log_dir / f"{name}.dump.json"
        with contextlib.suppress(FileNotFoundError):
            dump.unlink()
        log = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            argv, env=_bench_env(BENCH_DUMP=str(dump), **env), stdout=log,
            stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
        child = _Child(name, proc, dump)
        self.children.append(child)
        return child

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def check_alive(self) -> None:
        for c in self.children:
            if c.proc.poll() is not None:
                raise RuntimeError(
                    f"{c.name} exited with {c.proc.returncode}; see {self.log_dir / c.name}.log"
                )

    def wait_probes(self, timeout: float = 30.0) -> None:
        """Until every child has installed its SIGUSR1 handler (bench.probe)."""
        deadline = time.monotonic() + timeout
        for c in self.children:
            while not c.dump.exists():
                self.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{c.name} did not start")
                time.sleep(0.02)

    def dump(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Ask every child for its probe state and wait for the answers."""
        for c in self.children:
            os.kill(c.pid, signal.SIGUSR1)
        out = []
        deadline = time.monotonic() + timeout
        for c in self.children:
            while True:
                try:
                    state = json.loads(c.dump.read_text())
                    if state["seq"] > c.last_seq:
                        c.last_seq = state["seq"]
                        out.append(state)
                        break
                except (FileNotFoundError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{c.name} did not answer SIGUSR1")
                time.sleep(0.01)
        return out

    def round_trips(self) -> int:
        return sum(s["round_trips"] for s in self.dump())

    def stop(self, timeout: float = 30.0) -> None:
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        for c in self.children:
            try:
                c.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()


class RefreshdWorker(ProcGroup):
    """``count`` real `refreshd run` processes (bench.workerproc)."""

    def start(self, redis_url: str, count: int, *, concurrency: int, extra_env: dict[str, str]
              | None = None) -> None:  # fmt: skip
        for n in range(count):
            port = free_port()
            env = {
                "REFRESHD_REDIS_URL": redis_url,
                "REFRESHD_HTTP_PORT": str(port),
                "REFRESHD_WORKER_ID": f"bench-{n}",
                "REFRESHD_CONCURRENCY": str(concurrency),
                "REFRESHD_LOG_LEVEL": "warning",
                **(extra_env or {}),
            }
            child = self._spawn(f"refreshd-{n}", [sys.executable, "-m", "bench.workerproc"], env)
            child.http_port = port
        self.wait_probes()
        deadline = time.monotonic() + 30
        for c in self.children:
            while True:
                try:
                    _http_text(f"http://127.0.0.1:{c.http_port}/readyz", timeout=1)
                    break
                except OSError:
                    self.check_alive()
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{c.name} not ready") from None
                    time.sleep(0.05)

    def metrics(self) -> list[str]:
        return [_http_text(f"http://127.0.0.1:{c.http_port}/metrics") for c in self.children]

    def refreshed_total(self) -> int:
        total = 0.0
        for text in self.metrics():
            for line in text.splitlines():
                if line.startswith("refreshd_refreshes_total{") and 'outcome="refreshed"' in line:
                    total += float(line.rsplit(" ", 1)[1])
        return int(total)


class ArqWorker(ProcGroup):
    """``count`` arq worker processes running bench.alt_arq in arq's venv."""

    def start(self, redis_url: str, count: int, *, python: str, token_url: str, max_jobs: int,
              poll_delay: float = 0.5, http: str = "aiohttp") -> None:  # fmt: skip
        for n in range(count):
            argv = [python, "-m", "bench.alt_arq", "worker", "--redis", redis_url,
                    "--token-url", token_url, "--max-jobs", str(max_jobs),
                    "--poll-delay", str(poll_delay), "--http", http]  # fmt: skip
            self._spawn(f"arq-{n}", argv, {})
        self.wait_probes()
        # ready once each worker has polled the queue (arq's health-check key)
        time.sleep(1.0)


def run_json(argv: list[str], timeout: float = 600) -> Any:
    out = subprocess.run(argv, env=_bench_env(), cwd=REPO, capture_output=True, timeout=timeout,
                         check=False)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed:\n{out.stderr.decode()[-3000:]}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])
