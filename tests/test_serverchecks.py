"""Defaults are safe: a Redis that could send a refresh token twice or lose
credentials is refused at start, unless the operator accepts each hazard by
name (``REFRESHD_UNSAFE_REDIS``); then every start warns, and a running
worker keeps checking (the policy can change under it with CONFIG SET).

Every server here is real; the unsafe ones are configured the way an
operator would find them (a stock RDB-only redis-server, an evicting policy,
CONFIG or WAITAOF denied by ACL as on managed services).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE

import anyio
import pytest

from tests.cli_helpers import Result, run_refreshd, write_jsonl
from tests.faultkit import captured_logs, log_events
from tests.harness import make_settings, seed, wait_for
from tests.redis_server import RedisServer
from worker.app import open_store, watch_server
from worker.embedded import stop_embedded
from worker.errors import ConfigError
from worker.fakeprovider import FakeProvider, FakeProviderConfig, Fault
from worker.metrics import Metrics
from worker.serverchecks import Hazard, ServerFacts, find_hazards, inspect_server
from worker.settings import UNSAFE_REDIS_HAZARDS, Settings

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
#: a stock redis-server: RDB snapshots only (the save points are irrelevant: the
#: tests take the snapshot themselves)
RDB_ONLY = {"appendonly": "no", "save": "3600 1"}


@pytest.fixture
def rdb_only(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "rdb", config=RDB_ONLY) as server:
        yield server


def _env(url: str, **settings: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    return environ | {"REFRESHD_REDIS_URL": url, "REFRESHD_HTTP_PORT": "0"} | settings


def _events(output: str) -> list[dict[str, object]]:
    found = []
    for line in output.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def gauge(metrics: Metrics, hazard: str, accepted: str) -> float | None:
    return metrics.registry.get_sample_value(
        "refreshd_redis_unsafe", {"hazard": hazard, "accepted": accepted}
    )


# ------------------------------------------------------ 1. RDB only: double send


async def test_rdb_only_redis_is_refused_by_default(rdb_only: RedisServer) -> None:
    with pytest.raises(ConfigError) as refused:
        async with open_store(make_settings(rdb_only.url)):
            pass
    message = str(refused.value)
    assert "appendonly is off and no replica" in message
    assert "REFRESHD_UNSAFE_REDIS=not_durable" in message
    assert "\n" not in message


async def test_refreshd_run_refuses_an_rdb_only_redis_and_the_opt_out_warns(
    rdb_only: RedisServer,
) -> None:
    """`refreshd run` with default settings on a stock redis-server: exit 2,
    one line naming the problem and the setting, nothing sent. With the
    opt-out it runs, and says at warning level what may go wrong."""
    accept = {"REFRESHD_UNSAFE_REDIS": "not_durable"}
    async with FakeProvider(FakeProviderConfig(rotate=True)) as provider:
        async with open_store(
            make_settings(rdb_only.url, unsafe_redis=frozenset(accept.values()))
        ) as store:
            await seed(store, provider, 3)

        refused = await anyio.to_thread.run_sync(
            lambda: run_refreshd("run", env=_env(rdb_only.url), timeout=30)
        )
        assert refused.code == 2, refused
        line = refused.error_line
        assert line.startswith("refreshd: error: refusing to use this Redis: ")
        assert "REFRESHD_UNSAFE_REDIS=not_durable" in line
        assert refused.out == ""
        assert provider.send_counts == {}

        out = bytearray()
        process = await anyio.open_process(
            [sys.executable, "-m", "worker", "run"],
            env=_env(rdb_only.url, **accept),
            cwd=ROOT,
            stdout=PIPE,
            stderr=PIPE,
        )
        async with process, anyio.create_task_group() as tg:
            assert process.stdout is not None

            async def collect() -> None:
                assert process.stdout is not None
                async for chunk in process.stdout:
                    out.extend(chunk)

            tg.start_soon(collect)
            try:
                await wait_for(lambda: provider.stats.refreshed >= 3, within=20, what="refreshes")
            finally:
                process.terminate()
                await process.wait()
    warnings = [e for e in _events(out.decode()) if e.get("event") == "redis.unsafe_accepted"]
    assert [(w["level"], w["hazard"]) for w in warnings] == [("warning", "not_durable")]
    assert "sent twice" in str(warnings[0]["risk"])


async def test_the_opt_out_really_can_send_a_refresh_token_twice(rdb_only: RedisServer) -> None:
    """Why RDB-only is refused, shown: a worker (opted out) is mid-refresh,
    Redis is SIGKILLed and restarts from its snapshot, which holds the
    credential as it was before the spend; the refresh token goes out again.
    (On the old code this happened with default settings.)"""
    accept = frozenset({"not_durable"})
    config = FakeProviderConfig(rotate=True, revoke_on_reuse=True)
    async with FakeProvider(config) as provider:
        async with open_store(make_settings(rdb_only.url, unsafe_redis=accept)) as store:
            grants = await seed(store, provider, 1, profile={"timeout_s": 8})
        with rdb_only.client() as client:
            client.save()  # the snapshot a restart will come back to
        (grant,) = grants.values()
        provider.inject(Fault("delay", delay_s=5))  # the answer is late: the worker waits
        process = await anyio.open_process(
            [sys.executable, "-m", "worker", "run"],
            env=_env(
                rdb_only.url,
                REFRESHD_UNSAFE_REDIS="not_durable",
                REFRESHD_LEASE_SECONDS="15",
                REFRESHD_IDLE_WAKEUP_SECONDS="0.2",
            ),
            cwd=ROOT,
        )
        async with process:
            try:
                await wait_for(lambda: provider.stats.requests >= 1, within=20, what="the send")
                await anyio.to_thread.run_sync(rdb_only.restart)
                await wait_for(
                    lambda: provider.send_counts.get(grant.refresh_token, 0) >= 2,
                    within=20,
                    what="the same refresh token sent again",
                )
            finally:
                process.kill()
                await process.wait()
    assert provider.send_counts[grant.refresh_token] == 2


# ------------------------------------------------------ 2. eviction


def _import(url: str, tmp_path: Path, n: int, **settings: str) -> Result:
    path = write_jsonl(
        tmp_path / f"import-{n}.jsonl",
        [
            {
                "id": f"c{n}-{i}",
                "profile": "p",
                "access_token": f"AT-{i}",
                "refresh_token": f"RT-{i}",
                "expires_in": 3600,
            }
            for i in range(20)
        ],
    )
    return run_refreshd("credential", "import", str(path), env=_env(url, **settings))


async def test_an_import_under_an_evicting_policy_is_refused_and_the_opt_out_warns(
    fresh_redis: RedisServer, tmp_path: Path
) -> None:
    """An import under allkeys-lru reported every record created while the
    server evicted most of them, and nothing said so. Now the import is
    refused (exit 2, nothing written) unless `eviction` is accepted, and then
    a warning names the hazard."""
    async with FakeProvider() as provider, open_store(make_settings(fresh_redis.url)) as store:
        await seed(store, provider, 0)
    with fresh_redis.client(decode_responses=True) as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
        keys_before = client.dbsize()

        refused = await anyio.to_thread.run_sync(lambda: _import(fresh_redis.url, tmp_path, 1))
        assert refused.code == 2, refused
        assert "maxmemory-policy is 'allkeys-lru'" in refused.error_line
        assert "REFRESHD_UNSAFE_REDIS=eviction" in refused.error_line
        assert client.dbsize() == keys_before  # nothing written

        accepted = await anyio.to_thread.run_sync(
            lambda: _import(fresh_redis.url, tmp_path, 2, REFRESHD_UNSAFE_REDIS="eviction")
        )
    assert accepted.code == 0, accepted
    assert json.loads(accepted.out)["created"] == 20
    warnings = [e for e in _events(accepted.err) if e.get("event") == "redis.unsafe_accepted"]
    assert [(w["level"], w["hazard"]) for w in warnings] == [("warning", "eviction")]


async def test_a_running_worker_notices_a_policy_changed_at_runtime(
    fresh_redis: RedisServer,
) -> None:
    settings = make_settings(fresh_redis.url)
    metrics = Metrics()
    with captured_logs("info") as logs:
        async with open_store(settings) as store, anyio.create_task_group() as tg:
            await tg.start(watch_server, store, settings, metrics, 0.05)
            assert gauge(metrics, "eviction", "false") == 0
            assert gauge(metrics, "not_durable", "false") == 0
            await store.client.config_set("maxmemory-policy", "volatile-lru")
            await wait_for(lambda: gauge(metrics, "eviction", "false") == 1, within=5, what="set")
            await store.client.config_set("maxmemory-policy", "noeviction")
            await wait_for(lambda: gauge(metrics, "eviction", "false") == 0, within=5, what="clear")
            tg.cancel_scope.cancel()
    found = [e for e in log_events(logs) if e["event"] == "redis.unsafe_config"]
    assert [(e["level"], e["hazard"]) for e in found] == [("error", "eviction")]


@pytest.mark.parametrize("accepted", [False, True], ids=["refused", "accepted"])
async def test_aof_switched_off_at_runtime_does_not_make_spends_undurable(
    fresh_redis: RedisServer, accepted: bool
) -> None:
    """A worker keeps waiting for the fsync it can no longer get (its spends
    are refused and retried, not sent undurably) unless `not_durable` is
    accepted; either way the gauge says so."""
    unsafe = frozenset({"not_durable"}) if accepted else frozenset()
    settings = make_settings(fresh_redis.url, unsafe_redis=unsafe)
    metrics = Metrics()
    label = str(accepted).lower()
    async with open_store(settings) as store, anyio.create_task_group() as tg:
        await tg.start(watch_server, store, settings, metrics, 0.05)
        assert store.durability.fsync is True
        await store.client.config_set("appendonly", "no")
        await wait_for(lambda: gauge(metrics, "not_durable", label) == 1, within=5, what="gauge")
        await anyio.sleep(0.2)  # a few more checks
        assert store.durability.fsync is not accepted
        tg.cancel_scope.cancel()


# ------------------------------------------------------ 3. WAITAOF


async def test_a_server_without_waitaof_is_refused(fresh_redis: RedisServer) -> None:
    """WAITAOF denied (as on a server older than 7.2, which has no such
    command): nothing could confirm a spend reached the disk."""
    with fresh_redis.client() as client:
        client.execute_command("ACL", "SETUSER", "default", "-waitaof")
    settings = make_settings(fresh_redis.url)
    with pytest.raises(ConfigError, match=r"no WAITAOF .*REFRESHD_UNSAFE_REDIS=no_waitaof"):
        async with open_store(settings):
            pass
    with pytest.raises(ConfigError, match=r"REFRESHD_DURABILITY=fsync needs WAITAOF"):
        async with open_store(
            make_settings(
                fresh_redis.url, durability="fsync", unsafe_redis=frozenset({"no_waitaof"})
            )
        ):
            pass
    accepted = make_settings(fresh_redis.url, unsafe_redis=frozenset({"no_waitaof"}))
    async with open_store(accepted) as store:
        assert store.durability.fsync is False  # a WAITAOF would fail every spend


def test_a_server_older_than_7_2_has_the_no_waitaof_hazard() -> None:
    old = ServerFacts(aof=True, replicas=0, policy="noeviction", waitaof=False, version="7.0.15")
    assert list(find_hazards(old, "auto")) == [Hazard.NO_WAITAOF]
    assert "7.0.15" in find_hazards(old, "auto")[Hazard.NO_WAITAOF]
    assert find_hazards(old, "replica") == {}  # WAIT alone needs no WAITAOF


# ------------------------------------------------------ what the checks accept


async def test_config_refused_makes_the_policy_unknown(fresh_redis: RedisServer) -> None:
    """Managed services refuse CONFIG: refuse unless the operator, having
    checked the policy, says so."""
    with fresh_redis.client() as client:
        client.execute_command("ACL", "SETUSER", "default", "-config")
    with pytest.raises(ConfigError, match=r"cannot be read .*REFRESHD_UNSAFE_REDIS=policy_unknown"):
        async with open_store(make_settings(fresh_redis.url)):
            pass
    settings = make_settings(fresh_redis.url, unsafe_redis=frozenset({"policy_unknown"}))
    async with open_store(settings) as store:
        assert store.durability.fsync is True


async def test_a_connected_replica_makes_an_rdb_only_primary_durable(
    rdb_only: RedisServer, tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "replica") as replica:
        with replica.client() as client:
            client.replicaof("127.0.0.1", rdb_only.port)
        with rdb_only.client(decode_responses=True) as client:
            for _ in range(200):
                if client.info("replication")["connected_slaves"] == 1:
                    break
                await anyio.sleep(0.05)
        async with open_store(make_settings(rdb_only.url)) as store:
            assert (store.durability.fsync, store.durability.replicas) == (False, 1)


async def test_an_explicit_durability_the_server_cannot_keep_is_named_first(
    rdb_only: RedisServer,
) -> None:
    for mode, message in [("replica", "needs at least one connected replica"),
                          ("fsync", "needs appendonly yes")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"REFRESHD_DURABILITY={mode} {message}"):
            async with open_store(make_settings(rdb_only.url, durability=mode)):
                pass


async def test_durability_none_is_its_own_opt_out(fresh_redis: RedisServer) -> None:
    async with open_store(make_settings(fresh_redis.url, durability="none")) as store:
        facts = await inspect_server(store.client)
        assert list(find_hazards(facts, "none")) == [Hazard.NOT_DURABLE]
        assert (store.durability.fsync, store.durability.replicas) == (False, 0)


async def test_the_test_servers_are_safe(redis_url: str) -> None:
    async with open_store(make_settings(redis_url)) as store:
        assert find_hazards(await inspect_server(store.client), "auto") == {}


async def test_the_embedded_server_is_safe(tmp_path: Path) -> None:
    """No REFRESHD_REDIS_URL: the embedded Valkey (AOF, fsync always,
    noeviction) passes the default check with nothing to accept."""
    settings = Settings(data_dir=tmp_path / "data", http_port=0)
    try:
        async with open_store(settings) as store:
            assert find_hazards(await inspect_server(store.client), "auto") == {}
            assert store.durability.fsync is True
    finally:
        await anyio.to_thread.run_sync(stop_embedded, settings.data_dir)


def test_hazard_names_are_the_settings_names() -> None:
    assert {str(h) for h in Hazard} == UNSAFE_REDIS_HAZARDS


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, frozenset()),
        ({"REFRESHD_UNSAFE_REDIS": " eviction, not_durable ,"}, {"eviction", "not_durable"}),
    ],
)
def test_unsafe_redis_setting(environ: dict[str, str], expected: frozenset[str]) -> None:
    assert Settings.from_env(environ).unsafe_redis == expected


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"REFRESHD_UNSAFE_REDIS": "all"}, "REFRESHD_UNSAFE_REDIS takes a comma-separated list"),
        ({"REFRESHD_STRICT_SERVER": "false"}, "REFRESHD_STRICT_SERVER=false no longer"),
    ],
)
def test_unsafe_redis_setting_refuses(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(environ)
