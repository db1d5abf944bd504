"""refreshd on a real Valkey Cluster (3 primaries + 3 replicas, ``tests.redis_cluster``).

The tests on the shared ``redis_cluster`` kill nothing and move no slot;
the redirection test has a cluster of its own (``fresh_cluster``).
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.cli_helpers import Cli, cred_line, provider_thread, write_jsonl
from tests.faultkit import running
from tests.harness import add_grants, all_current, make_settings, run_demo, seed, wait_for
from tests.redis_cluster import RedisCluster, key_slot
from tests.test_cli import _restore_logging  # noqa: F401 - autouse: logging put back
from tests.test_process import worker_process
from worker.acl import (
    CONSUMER_USER,
    OPERATOR_USER,
    WORKER_USER,
    acl_rules,
    operator_acl_rules,
    worker_acl_rules,
)
from worker.app import open_store, watch_server
from worker.client import Refreshed, connect
from worker.cluster import parse_cluster_url, router_of
from worker.clusterbatch import ClusterBatcher
from worker.clusterrate import ClusterRate
from worker.codec import RECORD_MARK
from worker.errors import ConfigError
from worker.eventsub import EventSubscription
from worker.fakeprovider import FakeProvider, FakeProviderConfig
from worker.keys import Keyspace
from worker.logs import fingerprint
from worker.metrics import Metrics
from worker.models import Claimed
from worker.profiles import ProfileStore
from worker.redisio import describe_url, validate_url
from worker.store import Durability, Store

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------ the URL


def test_cluster_urls_are_read_like_the_others() -> None:
    plain = parse_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7001")
    assert plain.hosts == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert plain.auth == {}
    assert plain.tls == {}
    assert parse_cluster_url("redis+cluster://node").hosts == [("node", 6379)]
    acl = parse_cluster_url("redis+cluster://app:p%40ss@h:1/0")
    assert acl.auth == {"username": "app", "password": "p@ss"}
    tls = parse_cluster_url(
        "rediss+cluster://h:1?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required&ssl_check_hostname=no"
    )
    assert tls.tls == {"ssl": True, "ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": "required",
                       "ssl_check_hostname": False}  # fmt: skip
    assert parse_cluster_url("redis+cluster://h:1?ssl=true").tls == {"ssl": True}
    validate_url("redis+cluster://h:1")
    validate_url("REDISS+CLUSTER://h:1")
    where = describe_url("redis+cluster://app:topsecret@h1:7000,h2:7001")
    assert where == "cluster nodes h1:7000,h2:7001"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://h:port", "'h:port' is not host:port"),
        ("redis+cluster://h:1,:2", "':2' is not host:port"),
        ("redis+cluster://h:99999", "is not host:port"),
        ("redis+cluster://h:1/2", "database 0 only"),
        ("redis+cluster://h:1?timeout=3", "unknown option(s) in the cluster URL: timeout"),
        ("redis+cluster://h:1?ssl_certfile=/c", "use rediss+cluster:// for TLS"),
        ("rediss+cluster://h:1?ssl=false", "ssl=false contradicts it"),
        ("rediss+cluster://h:1?ssl_cert_reqs=maybe", "ssl_cert_reqs is one of"),
        ("cluster://h:1", "REFRESHD_REDIS_URL must start with"),
    ],
)
def test_a_bad_cluster_url_is_one_line(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_url(url)
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_cli_names_a_bad_or_unreachable_cluster_in_one_line(
    cli_env: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REFRESHD_REDIS_URL", "redis+cluster://u:hunter2@127.0.0.1:notaport")
    assert "is not host:port" in cli_env.fails(2, "status")
    monkeypatch.setenv("REFRESHD_REDIS_URL", "redis+cluster://u:hunter2@127.0.0.1:1")
    line = cli_env.fails(1, "status")
    assert line.startswith("redis cluster unavailable")
    assert "127.0.0.1:1" in line
    assert "hunter2" not in cli_env.everything


# ----------------------------------------------------------- partitions


def test_partitions_map_to_slots_of_every_primary(redis_cluster: RedisCluster) -> None:
    """The spread README "Running on a Redis Cluster" quotes: each partition
    is one slot, so how many land on each primary follows CRC16."""
    owners = redis_cluster.primaries()
    for partitions in (3, 12, 48):
        count = Counter(
            redis_cluster.owner_of(key_slot(f"{{refreshd:{n}}}")).index for n in range(partitions)
        )
        assert set(count) == {node.index for node in owners}, partitions
    with redis_cluster.nodes[0].client() as client:
        assert key_slot("{refreshd:7}:due") == client.execute_command(
            "CLUSTER", "KEYSLOT", "{refreshd:7}:due"
        )


# -------------------------------------------------------------- workers


async def test_three_worker_processes_race_over_two_thousand_credentials(
    redis_cluster: RedisCluster, cluster_url: str
) -> None:
    """Every partition on every primary is claimed, every credential is
    refreshed (twice: short lifetimes), no refresh token is sent twice, and
    every commit's event reaches a sharded subscriber and the event log."""
    count = 2000
    settings = make_settings(cluster_url, partitions=12)
    config = FakeProviderConfig(lifetime_s=4, reuse_grace_s=0)
    async with FakeProvider(config) as provider, open_store(settings) as store:
        grants = await seed(store, provider, count, expires_in=lambda n: 1 + (n % 7) * 0.5)
        env = {"REFRESHD_PARTITIONS": "12", "REFRESHD_CONCURRENCY": "64",
               "REFRESHD_LOG_LEVEL": "info"}  # fmt: skip
        events: list[dict[str, Any]] = []

        async def listen(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            async with EventSubscription(store.client, store.keys) as sub:
                assert await sub.confirm(5.0)
                task_status.started()
                while True:
                    data = await sub.get(1.0)
                    if data is not None:
                        events.append(json.loads(data))

        async def refreshed_twice() -> bool:
            records = await store.many_raw_fields(sorted(grants))
            return all(int(r.get("version") or 0) >= 2 for r in records)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            await tg.start(listen)
            async with (
                worker_process(cluster_url, **env, REFRESHD_WORKER_ID="a") as a,
                worker_process(cluster_url, **env, REFRESHD_WORKER_ID="b") as b,
                worker_process(cluster_url, **env, REFRESHD_WORKER_ID="c") as c,
            ):
                await wait_for(refreshed_twice, within=45, what="every credential refreshed twice")
                for child in (a, b, c):
                    assert child.process.returncode is None, child.output()
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()
        elapsed = time.monotonic() - started

        assert provider.stats.reuse_events == []
        assert provider.stats.revoked_grants == 0
        assert max(provider.send_counts.values()) == 1
        refreshed = [e for e in events if e["type"] == "token.refreshed"]
        assert len(refreshed) >= 2 * count
        assert {e["credential_id"] for e in refreshed} == set(grants)
        # the event log holds the same commits, partition by partition, on all nodes
        router = router_of(store.client)
        assert router is not None
        lengths = {part.index: await store.client.xlen(part.log)
                   for part in store.keys.all_partitions()}  # fmt: skip
        assert sum(lengths.values()) >= 2 * count
        assert all(lengths.values())
        nodes = {router.address_of(part.log) for part in store.keys.all_partitions()}
        assert len(nodes) == 3
        print(f"cluster race: {count} credentials, {len(refreshed)} refreshes in {elapsed:.1f} s")


@pytest.mark.parametrize("ring", ["", "k1:" + base64.b64encode(bytes(range(32))).decode()],
                         ids=["plain", "encrypted"])  # fmt: skip
async def test_in_process_workers_keep_every_credential_current(
    cluster_url: str, ring: str
) -> None:
    """Encrypted, each record holds the record form (raw bytes), which the
    per-node group commit packs and every node's client reads back."""
    settings = make_settings(cluster_url, partitions=6, encryption_keys=ring)
    async with (
        FakeProvider(FakeProviderConfig(reuse_grace_s=0)) as provider,
        open_store(settings) as store,
    ):
        grants = await seed(store, provider, 60, expires_in=2)
        async with running(settings, store, count=2) as (events, _):
            await wait_for(lambda: all_current(store, provider, grants), within=30,
                           what="all refreshed")  # fmt: skip
            await wait_for(lambda: len(events.of("token.refreshed")) >= 60, within=5,
                           what="every event")  # fmt: skip
        assert provider.stats.reuse_events == []
        raw = await store.many_raw_fields(sorted(grants))
        assert all(r["refresh_token"].startswith(RECORD_MARK) == bool(ring) for r in raw)


# --------------------------------------------------------------- client


async def test_the_client_reads_refreshes_and_follows_events_on_a_cluster(
    cluster_url: str,
) -> None:
    settings = make_settings(cluster_url, partitions=6)
    async with (
        FakeProvider() as provider,
        open_store(settings) as store,
        connect(settings, poll_interval=5) as client,
    ):
        grants = await seed(store, provider, 24, expires_in=30)
        ids = sorted(grants)
        assert len({store.keys.partition_of(i).index for i in ids}) == 6
        stored = await client.get(ids[0], min_ttl=10)
        assert stored.version == 0
        async with running(settings, store) as (_events, _):
            started = time.monotonic()
            fresh = await client.get(ids[0], min_ttl=60, timeout=10)
            # the answer is the commit's event (sharded), not the 5 s re-read
            assert time.monotonic() - started < 4
            for cred_id in ids[1:]:
                await client.get(cred_id, min_ttl=60, timeout=10)
        assert fresh.version == 1
        assert fresh.access_token == provider.grant_state(grants[ids[0]].grant_id).access_token
        assert provider.stats.reuse_events == []

        log = [e async for e in client.events(since="start", follow=False)]
        assert sorted(e.credential_id for e in log) == ids
        assert all(isinstance(e.event, Refreshed) for e in log)
        resumed = [e async for e in client.events(since=log[5].cursor, follow=False)]
        assert [e.stream_id for e in resumed] == [e.stream_id for e in log[6:]]

        grant = provider.issue_grant()
        assert await client.put({"id": "put-1", "profile": "p", "expires_in": 3600,
                                 "access_token": grant.access_token,
                                 "refresh_token": grant.refresh_token})  # fmt: skip
        assert (await client.get("put-1")).access_token == grant.access_token
        await client.delete("put-1")
        listed = await client.list(limit=100)
        assert sorted(c.credential_id for c in listed.rows) == ids


async def test_a_following_consumer_and_a_group_see_commits_on_every_node(
    cluster_url: str,
) -> None:
    settings = make_settings(cluster_url, partitions=6)
    followed: list[str] = []
    grouped: list[str] = []
    async with (
        FakeProvider() as provider,
        open_store(settings) as store,
        connect(settings) as client,
    ):
        # no token cache on a cluster (README "Consuming tokens")
        assert client.cache_stats() is None
        assert client._link is None

        async def follow() -> None:
            async for entry in client.events(since="now", block=0.3):
                followed.append(entry.credential_id)

        async def group() -> None:
            async for entry in client.events(group="g", consumer="c1", block=0.3):
                grouped.append(entry.credential_id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            tg.start_soon(group)
            await anyio.sleep(0.5)  # both blocked on empty logs
            grants = await seed(store, provider, 18)
            async with running(settings, store):
                await wait_for(lambda: len(followed) == len(grouped) == 18, within=20,
                               what="18 events each")  # fmt: skip
            tg.cancel_scope.cancel()
    assert sorted(followed) == sorted(grouped) == sorted(grants)


# ------------------------------------------------------------------ CLI


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """The CLI in-process, as ``tests.test_cli`` runs it; its autouse
    ``_restore_logging`` (imported above) puts logging back after each test."""
    for name in list(os.environ):
        if name.startswith("REFRESHD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("REFRESHD_LOG_LEVEL", "error")
    return Cli(capsys, monkeypatch)


def test_cli_import_list_status_on_a_cluster_url(
    redis_cluster: RedisCluster,
    cluster_url: str,
    cli_env: Cli,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("REFRESHD_REDIS_URL", cluster_url)
    monkeypatch.setenv("REFRESHD_PARTITIONS", "6")
    monkeypatch.setenv("CL_SECRET", "cl-secret")
    with provider_thread() as provider:
        cli_env.ok(
            "profile", "create", "cl", "--token-url", provider.url, "--client-id", "c",
            "--client-secret-env", "CL_SECRET", "--allow-http", "true",
            "--allow-private-network", "true",
        )  # fmt: skip
        path = write_jsonl(tmp_path / "creds.jsonl",
                           [cred_line(f"c{n:03d}", "cl", n) for n in range(30)])  # fmt: skip
        summary = cli_env.ok("credential", "import", str(path))
        assert summary["failed"] == 0, summary
        rows = cli_env.ok("credential", "list", "--limit", "100")["result"]
        assert sorted(r["id"] for r in rows) == [f"c{n:03d}" for n in range(30)]
        status = cli_env.ok("status")
        assert status["credentials"] == 30
        assert status["by_status"] == {"active": 30}
        assert status["by_profile"] == {"cl": 30}
        assert status["scheduled"] == 30
        spread = status["partitions_by_primary"]
        assert sorted(spread) == sorted(n.address for n in redis_cluster.primaries())
        assert sum(spread.values()) == 6
        table = cli_env("status", "--table")
        assert table.code == 0
        assert f"partitions_by_primary.{redis_cluster.primaries()[0].address}" in table.out
        assert [p["id"] for p in cli_env.ok("profile", "list")["result"]] == ["cl"]
        cli_env.ok("profile", "delete", "cl", "--force")
        assert cli_env.ok("status")["credentials"] == 0
    assert "cl-secret" not in cli_env.everything


# ------------------------------------------------------- MOVED and ASK


async def test_scripts_follow_moved_and_ask_while_a_slot_moves(
    fresh_cluster: RedisCluster,
) -> None:
    """A partition's slot moved under a running batcher and a one-off
    pipeline: each script reaches the node that has the keys (ASK halfway,
    MOVED after), and none runs twice."""
    cluster = fresh_cluster
    settings = make_settings(cluster.url, partitions=3)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 30, expires_in=3600)
        part = store.keys.partition_of("cred-00000")
        slot = key_slot(part.due)
        ids = [i for i in sorted(grants) if store.keys.partition_of(i) == part]
        source = cluster.owner_of(slot)
        target = next(n for n in cluster.primaries() if n is not source)
        router = router_of(store.client)
        assert router is not None
        batcher = ClusterBatcher(store, router, connections=2)
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.run)
            store.batcher = batcher
            # halfway: the due set and half the records on the target (ASK
            # for scripts whose keys all moved, TRYAGAIN for split ones)
            cluster.begin_migration(slot, target)
            with source.client() as raw:
                keys = raw.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
            moved = [k for k in keys if k == part.due or k == part.stats or k == part.log]
            moved += [part.cred(i) for i in ids[: len(ids) // 2]]
            with source.client(socket_timeout=10) as raw:
                raw.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                                    "KEYS", *moved)  # fmt: skip
            first = ids[0]
            await store.set_due(first, 0)  # through the cluster client: ASK to the target
            # claim (one-off pipeline) and spend (batcher): ASK, all their keys moved
            item = await spent(store, await claim(store, first))
            # the commit also writes the event log, not created yet: TRYAGAIN
            # (keys split) until the migration ends, then MOVED
            async with anyio.create_task_group() as inner:
                inner.start_soon(commit, store, item)
                await anyio.sleep(0.3)
                cluster.migrate_keys(slot, target, count=1000)
                cluster.finish_migration(slot, target)
            # after: MOVED for every script of the partition
            for cred_id in ids[1:3]:
                await store.set_due(cred_id, 0)
                await commit(store, await spent(store, await claim(store, cred_id)))
            tg.cancel_scope.cancel()
        store.batcher = None
        assert batcher.redirects["ask"] >= 1  # the spend
        assert batcher.redirects["again"] >= 1  # the first commit, keys split
        assert batcher.redirects["moved"] >= 3  # that commit, then the others' spends and commits
        assert cluster.owner_of(slot) is target
        for cred_id in ids[:3]:
            cred = await store.get(cred_id)
            assert cred.version == 1
            assert cred.access_token == f"new-{cred_id}"


async def test_claims_on_live_nodes_are_kept_when_another_node_is_down(
    fresh_cluster: RedisCluster,
) -> None:
    """A claim round over every partition while one primary is dead (before
    its replica takes over): the live nodes' claims hold leases, so they
    are handed to the worker at once, not dropped until the lease ends."""
    cluster = fresh_cluster
    settings = make_settings(cluster.url, partitions=6)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 60, expires_in=3600)
        for cred_id in grants:
            await store.set_due(cred_id, 0)
        parts = [store.keys.partition(i) for i in range(6)]
        dead = cluster.owner_of(key_slot(parts[0].due))
        cluster.kill(dead)
        live = [p for p in parts if cluster.owner_of(key_slot(p.due)) is not dead]
        assert live, "every partition on the killed primary"
        results = await store.claim_many(
            [(p, 100, uuid.uuid4().hex) for p in parts], lease_ms=30_000
        )
        claimed = {c.id for _, items in results for c in items}
        expected = {i for i in grants if store.keys.partition_of(i) in live}
        assert claimed == expected


async def claim(store: Store, cred_id: str) -> Claimed:
    """Claim one due credential the way a worker does (``claim_many``)."""
    part = store.keys.partition_of(cred_id)
    [(_, claimed)] = await store.claim_many([(part, 10, uuid.uuid4().hex)], lease_ms=10_000)
    [item] = [c for c in claimed if c.id == cred_id]
    return item


async def spent(store: Store, item: Claimed) -> Claimed:
    spend = await store.spend(item, timeout_ms=2000, margin_ms=500,
                              rt_hash=fingerprint(item.refresh_token))  # fmt: skip
    assert spend.ok, spend
    return item


async def commit(store: Store, item: Claimed) -> None:
    res = await store.commit(item, "refreshed", next_due=int(time.time() * 1000) + 3_600_000,
                             fields={"access_token": f"new-{item.id}"},
                             event='{"schema":1,"type":"token.refreshed"}')  # fmt: skip
    assert res.ok, res


# ------------------------------------------------------------------- ACL


async def test_the_shipped_acl_users_work_on_a_cluster(
    redis_cluster: RedisCluster, cluster_url: str
) -> None:
    """The operator user seeds; the worker user may SPUBLISH on the shard
    channels; the consumer may read the slot map, read tokens and wait on
    the shard channels."""
    keys = Keyspace(partitions=6)
    users = {
        OPERATOR_USER: operator_acl_rules(keys),
        WORKER_USER: worker_acl_rules(keys),
        CONSUMER_USER: acl_rules(keys, refresh=True),
    }
    for node in redis_cluster.nodes:
        with node.client() as admin:
            for name, rules in users.items():
                admin.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *rules)
    try:
        hosts = cluster_url.removeprefix("redis+cluster://")
        operator = make_settings(f"redis+cluster://{OPERATOR_USER}:pw@{hosts}", partitions=6)
        worker = make_settings(f"redis+cluster://{WORKER_USER}:pw@{hosts}", partitions=6)
        consumer = make_settings(f"redis+cluster://{CONSUMER_USER}:pw@{hosts}", partitions=6)
        async with FakeProvider() as provider:
            async with open_store(operator) as seeding:
                grants = await seed(seeding, provider, 12, expires_in=30)
            async with (
                open_store(worker) as store,
                running(worker, store),
                connect(consumer, poll_interval=5) as client,
            ):
                started = time.monotonic()
                for cred_id in grants:
                    token = await client.get(cred_id, min_ttl=60, timeout=10)
                    assert token.version == 1
                assert time.monotonic() - started < 8  # events, not the 5 s re-reads
        assert provider.stats.reuse_events == []
    finally:
        for node in redis_cluster.nodes:
            with node.client() as admin:
                admin.acl_deluser(*users)


# ------------------------------------------------------ durability per node


async def test_each_primary_waits_for_what_it_offers_after_a_failover(
    fresh_cluster: RedisCluster,
) -> None:
    """WAIT for a replica on every primary that has one; the primary a
    failover promoted has none (its old primary is dead), so its batches
    wait for the fsync alone, and only there."""
    cluster = fresh_cluster
    settings = make_settings(cluster.url, partitions=3)
    async with open_store(settings) as store:
        addresses = [n.address for n in cluster.primaries()]
        assert {store.durability_at(a) for a in addresses} == {Durability(fsync=True, replicas=1)}
        victim = cluster.primaries()[0]
        promoted = await anyio.to_thread.run_sync(cluster.fail_primary, victim)
        async with anyio.create_task_group() as tg:
            metrics = Metrics()
            await tg.start(watch_server_until_settled, store, settings, metrics, promoted.address)
            tg.cancel_scope.cancel()
        assert store.durability_at(promoted.address) == Durability(fsync=True, replicas=0)
        for address in addresses[1:]:
            assert store.durability_at(address) == Durability(fsync=True, replicas=1)
        # and a spend on every shard is durable, the promoted one included
        grants_by_part: dict[int, str] = {}
        async with FakeProvider() as provider:
            grants = await add_grants(
                store, provider, 30, profile_id=await any_profile(store, provider)
            )
        batcher = ClusterBatcher(store, router_of(store.client), connections=2)  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.run)
            store.batcher = batcher
            for cred_id in sorted(grants):
                grants_by_part.setdefault(store.keys.partition_of(cred_id).index, cred_id)
            for cred_id in grants_by_part.values():
                await store.set_due(cred_id, 0)
                await spent(store, await claim(store, cred_id))
            tg.cancel_scope.cancel()
        store.batcher = None
        assert len(grants_by_part) == 3


async def watch_server_until_settled(
    store: Store, settings: Any, metrics: Metrics, address: str, *, task_status: Any
) -> None:
    """``watch_server`` until it has seen ``address`` (the new primary)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_server, store, settings, metrics, 0.2)
        await wait_for(lambda: address in store.node_durability, within=20,
                       what="the promoted primary checked")  # fmt: skip
        task_status.started()
        tg.cancel_scope.cancel()


async def any_profile(store: Store, provider: FakeProvider) -> str:
    await ProfileStore(store).create({
        "id": "p", "token_url": provider.url, "client_id": provider.config.client_id,
        "client_secret": provider.config.client_secret, "allow_http": True,
        "allow_private_network": True,
    })  # fmt: skip
    return "p"


# ------------------------------------------------------- demo, rate limit


def test_the_demo_runs_on_a_cluster_url(cluster_url: str, tmp_path: Path) -> None:
    summary, _stderr = run_demo(cluster_url, tmp_path)
    assert summary["refreshed"] > 60
    assert summary["refresh_tokens_sent_twice"] == 0
    assert summary["commits"] == summary["events_received"]
    assert summary["events_missing"] == summary["events_duplicated"] == 0


async def test_the_rate_limiter_is_shared_on_a_cluster(cluster_url: str) -> None:
    """One key per profile, each in its own slot: limiters of several
    profiles land on several primaries and each counts for all workers."""
    async with open_store(make_settings(cluster_url)) as store:
        limiters = [ClusterRate(store.client, store.keys) for _ in range(2)]  # two workers
        profiles = [f"rl-{n}" for n in range(6)]
        for profile_id in profiles:
            waits = [await limiters[n % 2].ask(profile_id, 1.0, 3) for n in range(4)]
            assert waits[:3] == [0, 0, 0]  # the burst, shared by both
            assert waits[3] > 0
        router = router_of(store.client)
        assert router is not None
        assert len({router.address_of(store.keys.rate_limit(p)) for p in profiles}) > 1


async def test_idle_workers_wake_on_a_cluster(cluster_url: str) -> None:
    """The wake-up channel reaches sleeping workers: a min-TTL read is
    served at once, not at the next due time (15 s) or the 30 s safety net."""
    settings = make_settings(cluster_url, partitions=6, idle_wakeup_s=30.0)
    async with (
        FakeProvider() as provider,
        open_store(settings) as store,
        connect(settings, poll_interval=5) as client,
    ):
        await seed(store, provider, 6, expires_in=30)
        async with running(settings, store):
            await anyio.sleep(1.0)  # every worker asleep until the first due time
            started = time.monotonic()
            for n in range(6):
                assert (await client.get(f"cred-{n:05d}", min_ttl=60, timeout=10)).version == 1
            assert time.monotonic() - started < 5
