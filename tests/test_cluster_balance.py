"""`refreshd cluster balance`: the partitions evened over a real cluster's
primaries by moving their slots, while workers refresh, losing nothing.

The plan itself is checked on hand-made slot maps (fast); the moves on a
private 3-primary cluster (``fresh_cluster``), where the default prefix's
16 partitions fall 7 / 4 / 5 and 48 fall 20 / 13 / 15."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from tests.cli_helpers import Cli, Result, run_refreshd
from tests.cluster_load import Workers, grants_refreshed, nothing_lost, refresh_counts
from tests.harness import make_settings, seed, wait_for
from tests.redis_cluster import RedisCluster, key_slot
from tests.test_cli import _restore_logging  # noqa: F401 - autouse: logging put back
from worker.acl import OPERATOR_USER, operator_acl_rules
from worker.app import open_store
from worker.clusterbalance import ClusterView, Move, balanced, migrate_auth, plan_moves
from worker.fakeprovider import FakeProvider, FakeProviderConfig
from worker.keys import Keyspace

# -- the plan, on hand-made slot maps ------------------------------------------


def _view(
    spread: dict[str, list[int]], *, keys: dict[int, int] | None = None,
    shared: dict[int, tuple[int, ...]] | None = None, pending: list[Move] | None = None,
) -> ClusterView:  # fmt: skip
    """Primary -> the slots it owns; one partition per slot (numbered by
    slot) unless ``shared`` says otherwise."""
    owners = {slot: primary for primary, slots in spread.items() for slot in slots}
    parts = {slot: (shared or {}).get(slot, (slot,)) for slot in owners}
    ids = {primary: f"id-{primary}" for primary in spread}
    return ClusterView(ids, {}, owners, parts, keys or {}, pending or [])


def _after(view: ClusterView, moves: list[Move]) -> dict[str, int]:
    load = view.spread()
    for move in moves:
        load[move.source] -= len(move.partitions)
        load[move.target] += len(move.partitions)
    return load


def test_the_fewest_moves_from_the_busiest_to_the_idlest() -> None:
    view = _view({"a": list(range(7)), "b": list(range(7, 11)), "c": list(range(11, 16))})
    moves = plan_moves(view)
    assert [(m.source, m.target) for m in moves] == [("a", "b")]  # 7/4/5 -> 6/5/5
    assert _after(view, moves) == {"a": 6, "b": 5, "c": 5}
    view = _view({"a": list(range(20)), "b": list(range(20, 33)), "c": list(range(33, 48))})
    moves = plan_moves(view)
    assert len(moves) == 4  # 20/13/15 -> 16/16/16: 4 partitions must leave a
    assert {m.source for m in moves} == {"a"}
    assert _after(view, moves) == {"a": 16, "b": 16, "c": 16}
    assert plan_moves(_view({"a": [1, 2], "b": [3], "c": [4, 5]})) == []


def test_the_partition_with_the_fewest_keys_moves() -> None:
    view = _view({"a": [1, 2, 3], "b": [4]}, keys={1: 50, 2: 7, 3: 9})
    [move] = plan_moves(view)
    assert (move.slot, move.keys, move.source, move.target) == (2, 7, "a", "b")
    assert move.to_json() == {"partition": 2, "slot": 2, "from": "a", "to": "b", "keys": 7}


def test_two_partitions_in_one_slot_move_together_or_not_at_all() -> None:
    # slot 1 holds partitions 1 and 9: moving it to b would only swap the imbalance
    view = _view({"a": [1, 2], "b": [3]}, shared={1: (1, 9)})
    [move] = plan_moves(view)
    assert move.slot == 2
    assert _after(view, [move]) == {"a": 2, "b": 2}
    view = _view({"a": [1], "b": []}, shared={1: (1, 9)})
    assert plan_moves(view) == []  # as even as the slots allow
    assert not balanced(view.spread())


def test_a_half_done_move_is_finished_first_and_counted() -> None:
    pending = Move(5, (5,), "a", "c", resumes=True)
    view = _view({"a": [1, 2, 3, 4, 5], "b": [6], "c": [7]}, pending=[pending])
    moves = plan_moves(view)
    assert moves[0] == pending
    assert len(moves) == 2
    assert _after(view, moves) == {"a": 3, "b": 2, "c": 2}


def test_migrate_logs_in_as_the_url_user() -> None:
    assert migrate_auth({}) == []
    assert migrate_auth({"password": "pw"}) == ["AUTH", "pw"]
    assert migrate_auth({"username": "admin", "password": "pw"}) == ["AUTH2", "admin", "pw"]


# -- on a real cluster -----------------------------------------------------------


def _env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    return env | {"REFRESHD_REDIS_URL": url, "REFRESHD_LOG_LEVEL": "warning"} | extra


async def _refreshd(*argv: str, env: dict[str, str]) -> Result:
    return await anyio.to_thread.run_sync(lambda: run_refreshd(*argv, env=env, timeout=60))


def _owner_by_partition(cluster: RedisCluster, keys: Keyspace) -> dict[int, int]:
    return {p.index: cluster.owner_of(key_slot(p.due)).index for p in keys.all_partitions()}


@pytest.mark.anyio
async def test_balance_evens_the_partitions_and_keeps_every_record(
    fresh_cluster: RedisCluster,
) -> None:
    settings = make_settings(fresh_cluster.url)
    keys = Keyspace(settings.prefix, settings.partitions)
    before_owners = _owner_by_partition(fresh_cluster, keys)
    async with FakeProvider(FakeProviderConfig()) as provider, open_store(settings) as store:
        grants = await seed(store, provider, 160, expires_in=3600)
        records = {cid: await store.raw_fields(cid) for cid in grants}
        dues = {cid: await store.client.zscore(keys.partition_of(cid).due, cid) for cid in grants}
        assert all(score is not None for score in dues.values())
        env = _env(fresh_cluster.url)
        status = (await _refreshd("status", env=env)).json()
        assert sorted(status["partitions_by_primary"].values()) == [4, 5, 7]

        done = await _refreshd("cluster", "balance", "--batch-keys", "7", env=env)
        assert done.code == 0, done.err
        summary = done.json()
        [move] = summary["moves"]  # 7/4/5 -> 6/5/5: one slot is enough
        assert move["keys"] > 0
        assert move["slot"] == key_slot(keys.partition(move["partition"]).due)
        assert sorted(summary["partitions_by_primary"].values()) == [5, 5, 6]
        status = (await _refreshd("status", env=env)).json()
        assert status["partitions_by_primary"] == summary["partitions_by_primary"]
        after_owners = _owner_by_partition(fresh_cluster, keys)
        changed = {p for p in before_owners if before_owners[p] != after_owners[p]}
        assert changed == {move["partition"]}
        for cid in grants:  # every record and its due entry, unchanged, where they now live
            assert await store.raw_fields(cid) == records[cid], cid
            assert await store.client.zscore(keys.partition_of(cid).due, cid) == dues[cid]
            assert (await store.get(cid)).refresh_token == grants[cid].refresh_token
        target = next(n for n in fresh_cluster.primaries() if n.address == move["to"])
        moved_part = keys.partition(move["partition"])
        with target.client() as node:  # on the new owner itself, not through a redirection
            assert node.exists(moved_part.due) == 1

        again = await _refreshd("cluster", "balance", env=env)
        assert again.code == 0
        assert again.json()["moves"] == []
        assert "already even" in again.err


@pytest.mark.anyio
async def test_balance_while_workers_refresh_sends_no_token_twice(
    fresh_cluster: RedisCluster,
) -> None:
    settings = make_settings(fresh_cluster.url, partitions=48)
    config = FakeProviderConfig(lifetime_s=4, rotate=True, revoke_on_reuse=True, latency_s=0.02)
    async with FakeProvider(config) as provider, open_store(settings) as store:
        grants = await seed(store, provider, 300)
        env = _env(fresh_cluster.url, REFRESHD_PARTITIONS="48")
        async with Workers.running(fresh_cluster.url, 2, REFRESHD_PARTITIONS="48"):
            await wait_for(lambda: grants_refreshed(provider, grants, {}, 1), within=30,
                           what="every credential refreshed once")  # fmt: skip
            done = await _refreshd("cluster", "balance", "--batch-keys", "2", env=env)
            assert done.code == 0, done.err
            summary = done.json()
            assert len(summary["moves"]) == 4  # 20/13/15 -> 16/16/16
            assert sorted(summary["partitions_by_primary"].values()) == [16, 16, 16]
            since = refresh_counts(provider, grants)
            await wait_for(lambda: grants_refreshed(provider, grants, since, 1), within=30,
                           what="every credential refreshed again after the moves")  # fmt: skip
        await nothing_lost(store, provider, grants)
        assert provider.stats.reuse_events == []


@pytest.mark.anyio
async def test_dry_run_prints_the_plan_and_moves_nothing(fresh_cluster: RedisCluster) -> None:
    keys = Keyspace()
    before = fresh_cluster.slot_owners()
    done = await _refreshd("cluster", "balance", "--dry-run", env=_env(fresh_cluster.seed_url))
    assert done.code == 0, done.err
    plan = done.json()
    assert plan["dry_run"] is True
    assert sorted(plan["partitions_by_primary"].values()) == [4, 5, 7]
    assert sorted(plan["after"].values()) == [5, 5, 6]
    [move] = plan["moves"]
    assert set(move) == {"partition", "slot", "from", "to", "keys"}
    assert move["slot"] == key_slot(keys.partition(move["partition"]).due)
    assert fresh_cluster.slot_owners() == before
    for node in fresh_cluster.primaries():  # no slot left importing or migrating
        with node.client() as client:
            assert "->-" not in client.execute_command("CLUSTER", "NODES")
            assert "-<-" not in client.execute_command("CLUSTER", "NODES")

    # the operator user is not granted slot moves: one line saying who is
    for node in fresh_cluster.nodes:
        with node.client() as client:
            client.execute_command("ACL", "SETUSER", OPERATOR_USER, "reset", "on", ">pw",
                                   *operator_acl_rules(keys))  # fmt: skip
    address = fresh_cluster.nodes[0].address
    url = f"redis+cluster://{OPERATOR_USER}:pw@{address}"
    refused = await _refreshd("cluster", "balance", "--dry-run", env=_env(url))
    assert refused.code == 1
    assert refused.out == ""
    assert "needs admin commands" in refused.error_line
    assert "pw@" not in refused.err
    assert fresh_cluster.slot_owners() == before


@pytest.mark.anyio
async def test_an_interrupted_move_is_finished_first(fresh_cluster: RedisCluster) -> None:
    """A run stopped mid-move leaves a partition slot IMPORTING / MIGRATING
    with keys on both sides; the next run completes that move (to the
    target it had), then evens the rest."""
    keys = Keyspace()
    by_owner: dict[int, list[int]] = {}
    for part in keys.all_partitions():
        by_owner.setdefault(fresh_cluster.owner_of(key_slot(part.due)).index, []).append(part.index)
    busiest = max(by_owner, key=lambda n: len(by_owner[n]))  # 7 partitions
    fullest = max((n for n in by_owner if n != busiest), key=lambda n: len(by_owner[n]))  # 5
    part = keys.partition(by_owner[busiest][0])
    slot = key_slot(part.due)
    target = fresh_cluster.nodes[fullest]
    with fresh_cluster.client() as client:
        for n in range(6):
            client.hset(part.cred(f"c{n}"), mapping={"status": "active", "n": str(n)})
    fresh_cluster.begin_migration(slot, target)
    assert fresh_cluster.migrate_keys(slot, target, count=2) == 2  # interrupted here
    env = _env(fresh_cluster.url)
    plan = (await _refreshd("cluster", "balance", "--dry-run", env=env)).json()
    first = plan["moves"][0]
    assert (first["partition"], first.get("resumes"), first["to"]) == (
        part.index, True, target.address)  # fmt: skip
    done = await _refreshd("cluster", "balance", env=env)
    assert done.code == 0, done.err
    assert sorted(done.json()["partitions_by_primary"].values()) == [5, 5, 6]
    assert fresh_cluster.owner_of(slot) is target
    with target.client() as node:
        assert node.exists(*(part.cred(f"c{n}") for n in range(6))) == 6
        assert node.hget(part.cred("c5"), "n") == "5"
    for node in fresh_cluster.primaries():
        with node.client() as client:
            nodes = client.execute_command("CLUSTER", "NODES")
            assert "->-" not in nodes
            assert "-<-" not in nodes


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """The CLI in-process with no REFRESHD_* but error logs only."""
    for name in list(os.environ):
        if name.startswith("REFRESHD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("REFRESHD_LOG_LEVEL", "error")
    return Cli(capsys, monkeypatch)


def test_not_a_cluster_is_one_line(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REFRESHD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("REFRESHD_REDIS_URL", "redis://127.0.0.1:1/0")
    line = cli.fails(2, "cluster", "balance")
    assert "needs a Redis Cluster" in line
    assert "not a cluster URL" in line
    monkeypatch.delenv("REFRESHD_REDIS_URL")
    line = cli.fails(2, "cluster", "balance", "--dry-run")
    assert "is not set" in line
    assert not (tmp_path / "data").exists()  # no embedded server was started
