"""Operator experience (issue 14): honest listings, one line for every bad
input, progress with a total, bare flags, clear import messages.

Real Valkey, real HTTP on loopback; the CLI runs in-process (``Cli``) except
where a real process is the point (a signal, a second server).
"""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from tests.cli_helpers import (
    Cli,
    ProviderThread,
    cred_line,
    provider_thread,
    raw_redis,
    run_refreshd,
    wait_until,
    write_jsonl,
)
from tests.harness import make_settings
from tests.redis_server import free_port
from tests.test_cli import _restore_logging, fake_profile, import_grant, make_profile
from worker.app import open_store, schedule_from
from worker.cli.credentials import import_lines
from worker.cli.progress import Progress
from worker.demo import DemoOptions
from worker.errors import ConfigError
from worker.fakeprovider import FakeProviderConfig, Fault
from worker.health import HealthServer
from worker.keys import Keyspace
from worker.metrics import Metrics
from worker.profiles import ProfileStore

__all__ = ["_restore_logging"]  # the autouse fixture, shared with test_cli

KEYS = Keyspace()


@pytest.fixture
def cli(redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    for name in list(os.environ):
        if name.startswith("REFRESHD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("REFRESHD_REDIS_URL", redis_url)
    monkeypatch.setenv("REFRESHD_LOG_LEVEL", "error")
    monkeypatch.setenv("TEST_CLIENT_SECRET", "s3cr3t-operator")
    return Cli(capsys, monkeypatch)


@pytest.fixture
def provider() -> Iterator[ProviderThread]:
    with provider_thread(FakeProviderConfig(lifetime_s=3600)) as running:
        yield running


def _id_in_last_partition(stem: str) -> str:
    """An id that a scan of partitions 0, 1, ... reaches last."""
    n = 0
    while KEYS.partition_of(f"{stem}-{n}").index != KEYS.partitions - 1:
        n += 1
    return f"{stem}-{n}"


# ------------------------------------------------------------------ listings


def test_list_filters_over_all_credentials_then_pages(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, provider: ProviderThread
) -> None:
    """Finding 1: the old list took the first 1,000 ids, then filtered."""
    make_profile(cli, "bulk")
    bulk = [cred_line(f"b-{n:05d}", "bulk", n) for n in range(1500)]
    cli.ok("credential", "import", str(write_jsonl(tmp_path / "bulk.jsonl", bulk)))
    fake_profile(cli, monkeypatch, provider)
    stopped = _id_in_last_partition("zz-stopped")
    grant = import_grant(cli, tmp_path, provider, stopped)
    provider.inject(Fault("status", match_refresh_token=grant.refresh_token, status=400,
                          body={"error": "invalid_grant"}))  # fmt: skip
    assert cli("credential", "refresh", stopped).json()["outcome"] == "needs_reauth"
    assert cli.ok("status")["by_status"] == {"active": 1500, "needs_reauth": 1}

    only = cli.ok("credential", "list", "--status", "needs_reauth")
    assert [row["id"] for row in only["result"]] == [stopped]
    assert (only["total"], only["truncated"], only["next_cursor"]) == (1, False, None)
    assert cli.ok("credential", "list", "--profile", "fp")["total"] == 1
    by_both = cli.ok("credential", "list", "--profile", "bulk", "--status", "needs_reauth")
    assert (by_both["result"], by_both["total"]) == ([], 0)

    first = cli.ok("credential", "list")
    ids = [row["id"] for row in first["result"]]
    assert len(ids) == 1000
    assert ids == sorted(ids)
    assert (first["total"], first["truncated"], first["next_cursor"]) == (1501, True, ids[-1])
    second = cli.ok("credential", "list", "--after", first["next_cursor"])
    more = [row["id"] for row in second["result"]]
    assert (len(more), second["truncated"], second["next_cursor"]) == (501, False, None)
    assert ids + more == sorted({*(c["id"] for c in bulk), stopped})
    for row in first["result"] + second["result"]:
        assert row["refresh_token"] in ("[hidden]", "")

    page = cli("credential", "list", "--limit", "2", "--after", "b-00010", "--table")
    assert page.code == 0
    assert [line.split()[0] for line in page.out.splitlines()[1:]] == ["b-00011", "b-00012"]
    assert page.err.strip() == "2 of 1501; next page: --after b-00012"


def test_list_limit_is_bounded(cli: Cli) -> None:
    for bad in ("0", "10001", "x"):
        assert "--limit" in cli.fails(2, "credential", "list", "--limit", bad)


def test_bulk_delete_reports_progress_with_a_total(redis_url: str) -> None:
    """Finding 9: a forced profile delete says how far it got, against the total."""

    async def scenario() -> list[tuple[int, int]]:
        heard: list[tuple[int, int]] = []
        async with open_store(make_settings(redis_url)) as store:
            profiles = ProfileStore(store)
            await profiles.create({"id": "bulk", "token_url": "https://auth.example.com/t",
                                   "client_id": "c", "client_secret": "s"})  # fmt: skip
            await profiles.create({"id": "other", "token_url": "https://auth.example.com/t",
                                   "client_id": "c", "client_secret": "s"})  # fmt: skip
            lines = [json.dumps(cred_line(f"c{n}", "bulk", n)) for n in range(300)]
            lines.append(json.dumps(cred_line("keep", "other", 1)))
            await import_lines(store, lines, schedule=schedule_from(make_settings(redis_url)),
                               replace=False)  # fmt: skip
            removed = await profiles.delete(
                "bulk", force=True, progress=lambda n, total: heard.append((n, total))
            )
            assert removed == 300
            assert (await store.counters()).get("profile:other") == 1
        return heard

    heard = anyio.run(scenario)
    assert {total for _, total in heard} == {300}
    assert sum(n for n, _ in heard) == 300
    assert len(heard) > 1


def test_progress_line_has_a_total_a_share_and_a_rate() -> None:
    stream = io.StringIO()
    bar = Progress("importing", 20_000, unit="lines", stream=stream, enabled=True,
                   interval_s=0)  # fmt: skip
    bar.advance(10_000)
    line = bar.line(now=bar._started + 2.0)
    assert line == "importing: 10,000 of 20,000 lines (50%), 5,000 lines/s, 2 s left"
    bar.close()
    assert stream.getvalue().endswith("\n")
    assert "of 20,000 lines" in stream.getvalue()
    unknown = Progress("importing", None, unit="lines", stream=io.StringIO(), enabled=True)
    unknown.advance(7)
    assert unknown.line(now=unknown._started + 1.0) == "importing: 7 lines, 7 lines/s"
    quiet = io.StringIO()
    off = Progress("importing", 10, stream=quiet, enabled=False)
    off.advance(10)
    off.close()
    assert quiet.getvalue() == ""


def test_import_progress_counts_against_the_file_total(redis_url: str) -> None:
    """The old "progress bar" divided by the lines read so far."""

    async def scenario() -> str:
        stream = io.StringIO()
        async with open_store(make_settings(redis_url)) as store:
            profile = {"id": "acme", "client_id": "c", "client_secret": "s",
                       "token_url": "https://auth.example.com/t"}  # fmt: skip
            await ProfileStore(store).create(profile)
            lines = [json.dumps(cred_line(f"c{n}", "acme", n)) for n in range(600)]
            bar = Progress("importing", 600, unit="lines", stream=stream, enabled=True,
                           interval_s=0)  # fmt: skip
            await import_lines(store, lines, schedule=schedule_from(make_settings(redis_url)),
                               replace=False, progress=bar)  # fmt: skip
        return stream.getvalue()

    shown = anyio.run(scenario)
    assert "importing: 1 of 600 lines (0%)" in shown
    assert "importing: 600 of 600 lines (100%)" in shown


# --------------------------------------------------------------- bad input


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *_: Any) -> None:  # not on the captured stderr
        pass


class _HttpServer:
    """A plain HTTP server: what a URL pointing at the wrong port finds."""

    def __enter__(self) -> int:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return int(self.server.server_address[1])

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


#: every command that reaches Redis (``watch`` is covered with its own rework)
COMMANDS = [
    ["status"],
    ["status", "--table"],
    ["credential", "list"],
    ["credential", "get", "c1"],
    ["credential", "delete", "c1"],
    ["credential", "resume", "c1"],
    ["credential", "refresh", "c1"],
    ["credential", "import", "-"],
    ["profile", "list"],
    ["profile", "get", "p1"],
    ["profile", "delete", "p1", "--force"],
    ["profile", "create", "p1", "--token-url", "https://a.example.com/t", "--client-id", "c",
     "--client-secret-env", "TEST_CLIENT_SECRET"],
    ["profile", "update", "p1", "--timeout", "5"],
    ["demo", "--credentials", "5", "--duration", "1"],
    ["run"],
]  # fmt: skip


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv[:2]))
def test_every_command_answers_bad_settings_and_dead_redis_in_one_line(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    """No traceback for a bad URL, a non-Redis port, a dead Redis or a bad
    setting: one line on stderr and the documented exit code."""
    monkeypatch.setenv("REFRESHD_HTTP_PORT", "0")
    stdin = json.dumps(cred_line("c1", "p1", 1)) + "\n"
    cases: list[tuple[dict[str, str], int, str]] = [
        ({"REFRESHD_REDIS_URL": "http://x"}, 2, "must start with redis://"),
        ({"REFRESHD_REDIS_URL": "redis://127.0.0.1:notaport/0"}, 2, "not a usable Redis URL"),
        ({"REFRESHD_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, 1, "127.0.0.1:"),
        ({"REFRESHD_CONCURRENCY": "many"}, 2, "REFRESHD_CONCURRENCY"),
    ]
    with _HttpServer() as port:
        cases.append(({"REFRESHD_REDIS_URL": f"redis://127.0.0.1:{port}/0"}, 1,
                      "does not speak the Redis protocol"))  # fmt: skip
        for env, code, message in cases:
            with monkeypatch.context() as patch:
                for name, value in env.items():
                    patch.setenv(name, value)
                assert message in cli.fails(code, *argv, stdin=stdin), (argv, env)


def test_watch_answers_bad_settings_in_one_line_and_waits_out_a_dead_redis(
    tmp_path: Path,
) -> None:
    """``watch`` follows for ever, so a dead Redis is not an exit: one line
    per outage on stderr while it reconnects, never a traceback. Bad
    settings and URLs are one line and exit 2, as for every other command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    env["REFRESHD_DATA_DIR"] = str(tmp_path)
    argv = [sys.executable, "-m", "worker", "watch"]
    for bad, message in (
        ({"REFRESHD_REDIS_URL": "http://x"}, "must start with redis://"),
        ({"REFRESHD_CONCURRENCY": "many"}, "REFRESHD_CONCURRENCY"),
    ):
        done = subprocess.run(
            argv, env=env | bad, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    dead = env | {"REFRESHD_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with subprocess.Popen(
        argv, env=dead, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        time.sleep(4)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err
    assert "reconnecting" in err
    assert len([line for line in err.splitlines() if "unavailable" in line]) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--workers", "0"],
        ["demo", "--credentials", "0"],
        ["demo", "--lifetime", "1"],
        ["demo", "--duration", "0"],
        ["demo", "--workers", "many"],
        ["credential", "list", "--status", "sleepy"],
        ["credential", "bogus"],
        ["profile", "create"],
        ["profile", "create", "p1", "--allow-http", "perhaps"],
        ["profile", "create", "p1", "--client-secret", "inline"],
        ["server", "restart"],
        ["nonsense"],
        [],
    ],
    ids=lambda argv: " ".join(argv) or "(none)",
)
def test_bad_arguments_are_one_line_exit_2(cli: Cli, argv: list[str]) -> None:
    """argparse used to print its usage block (30 lines) before the error,
    and the demo's limits were a traceback."""
    line = cli.fails(2, *argv)
    assert "--help" in line
    assert "inline" not in line


def test_demo_help_names_its_limits(cli: Cli) -> None:
    out = " ".join(cli("demo", "--help").out.split())
    for text in ("1 to 1,000,000", "2 to 86,400", "1 to 86,400", "1 to 64"):
        assert text in out
    with pytest.raises(ConfigError, match="--workers must be between 1 and 64"):
        DemoOptions(workers=0)


def test_a_redis_user_without_info_gets_one_line(
    cli: Cli, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with raw_redis(redis_url) as client:
        client.acl_setuser(
            "noinfo", enabled=True, passwords=["+pw"], keys=["~*"], channels=["&*"],
            commands=["+@all", "-info"],
        )  # fmt: skip
    try:
        host_port = redis_url.split("//", 1)[1].split("/", 1)[0].rpartition("@")[2]
        monkeypatch.setenv("REFRESHD_REDIS_URL", f"redis://noinfo:pw@{host_port}/0")
        for argv in (["status"], ["credential", "list"], ["profile", "list"]):
            assert "lacks a permission" in cli.fails(1, *argv)
    finally:
        with raw_redis(redis_url) as client:
            client.acl_deluser("noinfo")


def test_an_internal_error_says_so_before_its_traceback(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.cli.ops as ops

    async def broken(_: object) -> int:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(ops, "_status", broken)
    result = cli("status")
    assert result.code == 70
    assert result.err.startswith("refreshd: internal error (ZeroDivisionError); this is a bug")
    assert "Traceback" in result.err


def test_second_run_on_a_busy_port_is_one_line_exit_2(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 2: a second `refreshd run` printed 44 lines of traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("REFRESHD_HTTP_PORT", str(port))
        line = cli.fails(2, "run")
    assert f"127.0.0.1:{port}" in line
    assert "REFRESHD_HTTP_PORT" in line


def test_health_server_on_a_busy_port_raises_a_config_error() -> None:
    async def scenario() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            server = HealthServer("127.0.0.1", taken.getsockname()[1], Metrics().registry,
                                  alive=lambda: True, ready=_ready)  # fmt: skip
            with pytest.raises(ConfigError, match="in use"):
                await server.serve()

    anyio.run(scenario)


async def _ready() -> bool:
    return True


# ------------------------------------------------------------ flags, tables


def test_yes_no_knobs_are_bare_flags_and_still_take_values(cli: Cli) -> None:
    created = cli.ok(
        "profile", "create", "local", "--token-url", "http://127.0.0.1:9/token",
        "--client-id", "c", "--client-secret-env", "TEST_CLIENT_SECRET",
        "--allow-http", "--allow-private-network", "--client-id-in-body", "--fresh-connection",
    )  # fmt: skip
    assert (created["allow_http"], created["allow_private_network"]) == (True, True)
    assert created["client_id_in_body"] is True
    assert created["fresh_connection"] is True
    updated = cli.ok("profile", "update", "local", "--client-id-in-body", "false",
                     "--allow-http", "true")  # fmt: skip
    assert (updated["client_id_in_body"], updated["allow_http"]) == (False, True)


def test_version_and_tables(cli: Cli) -> None:
    from worker import __version__

    version = cli("--version")
    assert (version.code, version.out.strip()) == (0, f"refreshd {__version__}")
    make_profile(cli, "acme")
    status = cli("status", "--table")
    assert status.code == 0
    assert status.out.split()[:4] == ["WHAT", "VALUE", "credentials", "0"]
    presets = cli("profile", "presets", "--table")
    assert presets.code == 0
    assert presets.out.split()[0] == "PRESET"
    assert "workato_secret" in presets.out


# ---------------------------------------------------------- import messages


def test_import_messages_are_plain(cli: Cli, tmp_path: Path) -> None:
    """Finding 11: "got None", 3.456e+07, "use replace", half a diagnosis."""
    make_profile(cli, "acme")
    cli.ok("credential", "import", str(write_jsonl(tmp_path / "a.jsonl",
                                                   [cred_line("dup", "acme", 1)])))  # fmt: skip
    lines = [
        {"profile": "acme", "refresh_token": "r", "expires_in": 60},
        cred_line("big", "acme", 2, expires_in=10**9),
        cred_line("dup", "acme", 3),
        {"id": "bare", "profile": "acme"},
    ]
    result = cli("credential", "import", str(write_jsonl(tmp_path / "b.jsonl", lines)))
    assert result.code == 1
    errors = {e["line"]: e["error"] for e in result.json()["errors"]}
    assert errors[1] == "credential id is missing"
    assert "between 0 and 34,560,000" in errors[2]
    assert "e+0" not in errors[2]
    assert "--replace" in errors[3]
    assert "expires_in" in errors[4]
    assert "no access_token or refresh_token" in errors[4]


# --------------------------------------------------------------------- demo


def test_demo_interrupted_prints_its_summary_and_removes_its_keys(tmp_path: Path) -> None:
    """Finding 8: Ctrl-C left the demo's keys behind and printed nothing;
    the embedded server it leaves running is named."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    env |= {"REFRESHD_DATA_DIR": str(tmp_path / "data"), "REFRESHD_LOG_LEVEL": "error"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "demo", "--credentials", "40", "--duration", "60",
         "--lifetime", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        info = _server_info(env)
        url = info["url"]
        with raw_redis(url) as client:
            wait_until(lambda: bool(client.keys("{refreshd:demo:*")), within=20,
                       what="the demo's credentials")  # fmt: skip
            time.sleep(1.5)  # racing
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 130, err
            summary = json.loads(out)
            assert summary["credentials"] == 40
            assert summary["refresh_tokens_sent_twice"] == 0
            assert "interrupted: the demo's keys were removed" in err
            assert "keeps running" in err
            assert "refreshd server stop" in err
            assert "Traceback" not in err
            assert client.keys("refreshd:demo:*") == []
            assert client.keys("{refreshd:demo:*") == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        run_refreshd("server", "stop", env=env)


def _server_info(env: dict[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        result = run_refreshd("server", "info", "--show-password", env=env)
        info: dict[str, Any] = result.json()
        if info["running"]:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"the embedded server never came up: {result}")
        time.sleep(0.1)


# --------------------------------------------------------- embedded server


def test_one_embedded_server_per_user_whatever_the_directory(tmp_path: Path) -> None:
    """Finding 6: `status` from another directory started a second, empty
    server; nothing said whether a command started or joined one."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    env.pop("XDG_DATA_HOME", None)
    env |= {"HOME": str(home), "REFRESHD_LOG_LEVEL": "info"}
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    data_dir = home / ".local" / "share" / "refreshd"
    try:
        first = _run_in(here, env, "run")
        assert "redis.embedded.started" in first
        joined = _run_in(there, env, "run")
        assert "redis.embedded.joined" in joined
        assert not (here / ".refreshd").exists()
        assert not (there / ".refreshd").exists()
        info = run_refreshd("server", "info", env=env).json()
        assert info["running"] is True
        assert info["data_dir"] == str(data_dir)
        assert "********" in info["url"]
        password = json.loads((data_dir / "embedded.json").read_text())["password"]
        assert password not in json.dumps(info)
        assert password not in first + joined
        shown = run_refreshd("server", "info", "--show-password", env=env).json()
        assert redis.Redis.from_url(shown["url"]).ping()
    finally:
        run_refreshd("server", "stop", env=env)


def _run_in(cwd: Path, env: dict[str, str], *argv: str) -> str:
    """`refreshd run` from ``cwd`` until it has started; its log."""
    env = env | {"REFRESHD_HTTP_PORT": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", *argv], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    assert proc.stdout is not None
    log: list[str] = []
    try:
        deadline = time.monotonic() + 30
        for line in proc.stdout:
            log.append(line)
            if "worker.started" in line or time.monotonic() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    return "".join(log) + rest


def test_default_data_dir_does_not_depend_on_the_working_directory() -> None:
    from worker.settings import Settings

    assert Settings.from_env({"HOME": "/home/ann"}).data_dir == Path(
        "/home/ann/.local/share/refreshd"
    )
    assert Settings.from_env({"HOME": "/h", "XDG_DATA_HOME": "/x"}).data_dir == Path("/x/refreshd")
    assert Settings.from_env({"HOME": "/h", "XDG_DATA_HOME": "rel"}).data_dir == Path(
        "/h/.local/share/refreshd"
    )
    assert Settings.from_env({"HOME": "/h", "REFRESHD_DATA_DIR": "/d"}).data_dir == Path("/d")


def test_default_data_dir_without_a_home_is_still_per_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A container user with no passwd entry has no home: settings must still load."""
    from worker.settings import default_data_dir

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert default_data_dir({}).name == f"refreshd-{os.getuid()}"


def test_data_in_the_old_default_directory_is_pointed_at(tmp_path: Path) -> None:
    """Credentials imported under the old default (./.refreshd) are not in the
    shared server: the log says where they are and how to reach them."""
    old = tmp_path / "clone" / ".refreshd"
    old.mkdir(parents=True)
    (old / "embedded.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    env |= {"REFRESHD_DATA_DIR": str(tmp_path / "data"), "REFRESHD_LOG_LEVEL": "warning"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker", "status"], cwd=old.parent, env=env,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "redis.embedded.legacy_data_dir" in done.stderr
        assert "REFRESHD_DATA_DIR=.refreshd" in done.stderr
    finally:
        run_refreshd("server", "stop", env=env)
