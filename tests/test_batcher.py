"""Group commit (``worker.batcher``) against a real server: spends wait for
the fsync acknowledgement, commits return with their result and leave the
acknowledgement (and a re-apply) to the batch, NOSCRIPT reloads, and a
connection lost before the acknowledgement re-runs the commits it carried.

``appendfsync no`` makes WAITAOF time out every time, which turns "the
acknowledgement has not come yet" into something a test can hold open."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from tests.harness import wait_for
from tests.redis_server import RedisServer
from tests.test_scripts import NEW_TOKENS, claimed, create, spent
from worker.batcher import ScriptBatcher
from worker.codec import PlainCodec
from worker.errors import StoreUnavailable
from worker.keys import Keyspace
from worker.models import Claimed
from worker.redisio import connect
from worker.store import Durability, Store

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def batched_store(
    url: str, durability: Durability, **options: Any
) -> AsyncIterator[tuple[Store, ScriptBatcher, list[tuple[str, int]]]]:
    """A store whose spends and commits go through a running batcher, as in
    a worker; yields the ``on_not_durable`` reports too."""
    reports: list[tuple[str, int]] = []
    async with connect(url) as client:
        store = Store(client, Keyspace(), PlainCodec(), durability)
        await store.check_layout()
        batcher = ScriptBatcher(
            store, on_not_durable=lambda why, n: reports.append((why, n)), **options
        )
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.run)
            store.batcher = batcher
            try:
                yield store, batcher, reports
            finally:
                store.batcher = None
                tg.cancel_scope.cancel()


async def spend_told_unknown(store: Store, c: Claimed, errors: list[StoreUnavailable]) -> None:
    """A spend whose caller is expected to hear "outcome unknown"."""
    try:
        await store.spend(c, timeout_ms=1000, margin_ms=100, rt_hash="fp")
    except StoreUnavailable as exc:
        errors.append(exc)


async def evalsha_calls(store: Store) -> int:
    """Scripts run (a refused NOSCRIPT call is counted as failed, not run)."""
    stats = (await store.client.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)) - int(stats.get("failed_calls", 0))


async def test_concurrent_spends_and_commits_share_batches_and_all_land(
    fresh_redis: RedisServer,
) -> None:
    async with batched_store(fresh_redis.url, Durability(fsync=True)) as (store, _, reports):
        ids = [f"c{n:03d}" for n in range(60)]
        for cred_id in ids:
            await create(store, cred_id)
        calls_before = await evalsha_calls(store)

        async def refresh(cred_id: str) -> None:
            c = await claimed(store, cred_id, f"T-{cred_id}")
            spend = await store.spend(c, timeout_ms=1000, margin_ms=100, rt_hash="fp")
            assert spend.ok, spend
            result = await store.commit(c, "refreshed", next_due="", fields=NEW_TOKENS, event="")
            assert (result.ok, result.durable) == (True, True)

        async with anyio.create_task_group() as tg:
            for cred_id in ids:
                tg.start_soon(refresh, cred_id)
        # every script ran exactly once: claims, spends, commits - nothing resent
        assert await evalsha_calls(store) - calls_before == 3 * len(ids)
        for cred_id in ids:
            cred = await store.get(cred_id)
            assert (cred.version, cred.refresh_token, cred.in_flight) == (1, "rt-1", False)
        assert reports == []


async def test_a_commit_returns_before_the_fsync_a_spend_waits_for_it(
    fresh_redis: RedisServer,
) -> None:
    durability = Durability(fsync=True, timeout_ms=300)
    async with batched_store(fresh_redis.url, durability, ack_attempts=2) as (store, _, reports):
        await create(store, "c1")
        await create(store, "c2")
        first = await claimed(store, "c1", "A")
        await spent(store, first)  # durable: appendfsync is still everysec
        await store.client.config_set("appendfsync", "no")  # WAITAOF now always times out

        started = time.monotonic()
        result = await store.commit(first, "refreshed", next_due="", fields=NEW_TOKENS, event="")
        assert time.monotonic() - started < 0.3  # did not wait for the acknowledgement
        assert result.ok
        assert (await store.get("c1")).refresh_token == "rt-1"

        second = await claimed(store, "c2", "B")
        started = time.monotonic()
        refused = await store.spend(second, timeout_ms=1000, margin_ms=100, rt_hash="fp")
        assert time.monotonic() - started >= 0.6  # asked twice, 300 ms each
        assert (refused.ok, refused.reason) == (False, "not_durable")
        assert (await store.get("c2")).in_flight is False  # released: nothing was sent

        # the commit's batch went on waiting, then said so
        await wait_for(lambda: ("timeout", 1) in reports, within=5, what="the report")


async def test_scripts_flushed_by_a_restart_are_reloaded_and_run_once(
    fresh_redis: RedisServer,
) -> None:
    async with batched_store(fresh_redis.url, Durability(fsync=True)) as (store, _, _reports):
        await create(store, "c1")
        c = await claimed(store, "c1", "A")
        await store.client.script_flush()
        calls_before = await evalsha_calls(store)
        spend = await store.spend(c, timeout_ms=1000, margin_ms=100, rt_hash="fp")
        assert spend.ok
        result = await store.commit(c, "refreshed", next_due="", fields=NEW_TOKENS, event="")
        assert result.ok
        # NOSCRIPT, reload, run: the spend and the commit each ran once
        assert await evalsha_calls(store) - calls_before == 2
        cred = await store.get("c1")
        assert (cred.version, cred.refresh_token) == (1, "rt-1")


async def test_a_connection_lost_before_the_acknowledgement_reruns_its_commits(
    fresh_redis: RedisServer,
) -> None:
    """The server may have lost what it never acknowledged, so the batch runs
    its commits again. Here it had not lost them: the re-run is refused as
    stale and changes nothing (a lost one would have landed). A spend caught
    in the same way is reported unknown to its caller."""
    durability = Durability(fsync=True, timeout_ms=3000)
    async with batched_store(fresh_redis.url, durability) as (store, batcher, reports):
        await create(store, "c1")
        await create(store, "c2")
        c1 = await claimed(store, "c1", "A")
        await spent(store, c1)
        c2 = await claimed(store, "c2", "B")
        await store.client.config_set("appendfsync", "no")

        result = await store.commit(c1, "refreshed", next_due="", fields=NEW_TOKENS, event="")
        assert result.ok  # its batch now waits for an acknowledgement that cannot come
        calls_before = await evalsha_calls(store)
        spend_error: list[StoreUnavailable] = []

        async with anyio.create_task_group() as tg:
            tg.start_soon(spend_told_unknown, store, c2, spend_error)
            await anyio.sleep(0.3)  # the spend is out, waiting for its acknowledgement
            admin = fresh_redis.client()
            admin.client_kill_filter(_type="normal", skipme=True)
            admin.config_set("appendfsync", "everysec")

        assert len(spend_error) == 1  # ran or not: unknown, and the caller is told

        async def ran_again() -> bool:
            return await evalsha_calls(store) - calls_before >= 1

        await wait_for(ran_again, within=10, what="the commit to run again")
        cred = await store.get("c1")
        assert (cred.version, cred.refresh_token) == (1, "rt-1")  # refused as stale: no change
        assert reports == []
        assert batcher.running


async def test_callers_are_told_when_the_batcher_stops(fresh_redis: RedisServer) -> None:
    """Shutdown cuts off a call waiting for its acknowledgement: its caller
    hears "unknown" at once instead of waiting forever."""
    async with connect(fresh_redis.url) as client:
        store = Store(client, Keyspace(), PlainCodec(), Durability(fsync=True, timeout_ms=5000))
        await store.check_layout()
        await create(store, "c1")
        c = await claimed(store, "c1", "A")
        await client.config_set("appendfsync", "no")
        batcher = ScriptBatcher(store)
        errors: list[StoreUnavailable] = []

        with anyio.fail_after(3):  # well before the 5 s acknowledgement timeout
            async with anyio.create_task_group() as outer, anyio.create_task_group() as service:
                await service.start(batcher.run)
                store.batcher = batcher
                outer.start_soon(spend_told_unknown, store, c, errors)
                await anyio.sleep(0.3)
                service.cancel_scope.cancel()  # what the worker does on shutdown
        assert len(errors) == 1
        assert "stopping" in str(errors[0])
        assert not batcher.running
