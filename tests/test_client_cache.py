"""worker.client's token cache against a real Valkey: reads served without
a round trip, kept current by CLIENT TRACKING invalidations from the real
commit path, flushed and bypassed when the tracking connection is lost,
FLUSHALL, read-your-writes, and off by setting; plus the fill ordering
(``worker.client.cache``) without a server."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from tests.harness import make_settings, seed, wait_for, worker_running
from tests.redis_server import RedisServer
from worker.app import open_store
from worker.client import Client, CredentialNotFound, NoWorkerRunning, connect, connect_sync
from worker.client.cache import TokenCache
from worker.client.token import AccessToken, RecordView
from worker.client.tracking import TrackingLink
from worker.fakeprovider import FakeProvider
from worker.models import Status
from worker.redisio import pack_command
from worker.settings import Settings
from worker.store import Store

pytestmark = pytest.mark.anyio

CRED = "cred-00000"


@asynccontextmanager
async def world(
    redis_url: str, *, expires_in: float = 3600.0, **overrides: Any
) -> AsyncIterator[tuple[Settings, Store, FakeProvider]]:
    settings = make_settings(redis_url, **overrides)
    async with FakeProvider() as fake, open_store(settings) as store:
        await seed(store, fake, 2, expires_in=expires_in)
        yield settings, store, fake


async def evalsha_calls(store: Store) -> int:
    """Script calls the server has run (INFO commandstats): a cache hit adds none."""
    stats = await store.client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def link_of(client: Client) -> TrackingLink:
    link = client._link
    assert link is not None
    return link


async def commit_new_token(store: Store, credential_id: str, access_token: str) -> None:
    """A refresh's outcome written by the workers' own claim, spend and
    commit scripts (what a worker does after the provider answered)."""
    part = store.keys.partition_of(credential_id)
    _, _, claimed = await store.claim(
        part, limit=1, lease_ms=5000, token=uuid.uuid4().hex, ids=[credential_id]
    )
    spent = await store.spend(claimed[0], timeout_ms=1000, margin_ms=100, rt_hash="h")
    assert spent.ok
    fields: dict[str, str | int] = {
        "access_token": access_token,
        "expires_at": int(time.time() * 1000) + 3_600_000,
    }
    res = await store.commit(claimed[0], "refreshed", next_due="", fields=fields, event="")
    assert res.ok


# ------------------------------------------------------------ served from memory


async def test_a_repeated_read_costs_no_round_trip(redis_url: str) -> None:
    async with world(redis_url) as (settings, store, _), connect(settings) as client:
        first = await client.get(CRED)
        before = await evalsha_calls(store)
        again = [await client.get(CRED) for _ in range(50)]
        also = await client.get(CRED, min_ttl=60)  # valid for an hour: from the cache too
        after = await evalsha_calls(store)
        stats = client.cache_stats()
    assert after == before, stats
    assert all(t == first for t in again)
    assert also == first
    assert stats is not None
    assert (stats.hits, stats.misses, stats.size, stats.serving) == (51, 1, 1, True)


async def test_a_cached_token_too_short_for_min_ttl_takes_the_redis_path(redis_url: str) -> None:
    async with world(redis_url, expires_in=120) as (settings, store, _), connect(settings) as c:
        await c.get(CRED)
        before = await evalsha_calls(store)
        assert (await c.get(CRED, min_ttl=60)).version == 0  # 120 s left: cached
        assert await evalsha_calls(store) == before
        with pytest.raises(NoWorkerRunning):  # asks for a refresh: Redis, not the cache
            await c.get(CRED, min_ttl=300, timeout=0.3)
        assert await evalsha_calls(store) > before


async def test_the_cacheable_read_does_not_track_the_due_set(redis_url: str) -> None:
    """A claim re-scores the partition's due set: were it tracked, every
    claim would invalidate every cached token of the partition."""
    async with world(redis_url) as (settings, store, _), connect(settings) as client:
        await client.get(CRED)
        part = store.keys.partition_of(CRED)
        await store.client.zadd(part.due, {"someone-else": 1})
        await anyio.sleep(0.2)
        stats = client.cache_stats()
    assert stats is not None
    assert (stats.invalidations, stats.size) == (0, 1)


# ------------------------------------------------------------ kept current


async def test_a_commit_by_the_real_scripts_invalidates_the_cached_token(redis_url: str) -> None:
    async with world(redis_url) as (settings, store, _), connect(settings) as client:
        assert (await client.get(CRED)).version == 0
        assert (await client.get(CRED)).version == 0  # a hit
        await commit_new_token(store, CRED, "the-new-one")
        # bounded: the invalidation crosses a socket; without it, version 0 forever
        await wait_for(lambda: _version_is(client, 1), within=2.0, what="the commit's invalidation")
        token = await client.get(CRED)
        stats = client.cache_stats()
    assert (token.version, token.access_token) == (1, "the-new-one")
    assert stats is not None
    assert stats.invalidations >= 1


async def _version_is(client: Client, version: int) -> bool:
    return (await client.get(CRED)).version == version


async def test_another_consumers_refresh_through_a_worker_reaches_the_cache(
    redis_url: str,
) -> None:
    """Two consumers: one asks a worker for a fresh token (min_ttl), the
    other's cached read follows the commit."""
    async with (
        world(redis_url, expires_in=30) as (settings, _, fake),
        connect(settings) as reader,
        connect(settings) as asker,
        worker_running(settings),
    ):
        assert (await reader.get(CRED)).version == 0
        fresh = await asker.get(CRED, min_ttl=60, timeout=10)
        await wait_for(lambda: _version_is(reader, 1), within=2.0, what="invalidation")
        seen = await reader.get(CRED)
    assert fresh.version == 1
    assert seen.access_token == fresh.access_token
    assert fake.stats.requests == 1


async def test_a_reply_racing_its_invalidation_is_not_cached(redis_url: str) -> None:
    """The read's reply is held back until the invalidation of a write made
    after the read was handled: caching that reply would serve the old
    token for good (Redis forgets a key once it sent its invalidation)."""
    async with world(redis_url) as (settings, store, _), connect(settings) as client:
        link = link_of(client)
        real_read = link.read
        cache = link.cache

        async def read_then_race(packed: bytes) -> Any:
            reply = await real_read(packed)
            seen = cache.invalidations
            await commit_new_token(store, CRED, "written-after-the-read")
            await wait_for(lambda: cache.invalidations > seen, within=2.0, what="push")
            return reply

        link.read = read_then_race  # type: ignore[method-assign]
        raced = await client.get(CRED)
        link.read = real_read  # type: ignore[method-assign]
        after = await client.get(CRED)
        stats = client.cache_stats()
    assert raced.version == 0  # what Redis held when it ran the read
    assert (after.version, after.access_token) == (1, "written-after-the-read")
    assert stats is not None
    assert stats.dropped == 1


async def test_a_fill_cancelled_before_its_reply_hands_it_to_no_one(redis_url: str) -> None:
    """The tracking connection is pipelined: a caller that gave up leaves
    its reply slot behind, so the late reply cannot answer the next read."""
    async with world(redis_url) as (settings, store, _), connect(settings) as client:
        await client.get("cred-00000")
        await store.client.client_pause(300, all=True)
        with anyio.move_on_after(0.1) as scope:
            await client.get("cred-00001")  # a miss: through the tracking connection
        assert scope.cancelled_caught
        await anyio.sleep(0.4)  # the paused read runs now and its reply arrives
        token = await client.get("cred-00001")
        again = await client.get("cred-00000")
        stats = client.cache_stats()
    assert token.credential_id == "cred-00001"
    assert again.credential_id == "cred-00000"
    assert stats is not None
    assert stats.flushes == 0  # the link was never lost


async def test_flushall_flushes_the_cache(redis_url: str) -> None:
    async with world(redis_url) as (settings, store, _), connect(settings) as client:
        await client.get(CRED)
        flushes = client.cache_stats().flushes  # type: ignore[union-attr]
        await store.client.flushall()
        await wait_for(
            lambda: client.cache_stats().flushes > flushes,  # type: ignore[union-attr]
            within=2.0,
            what="the null invalidation",
        )
        with pytest.raises(CredentialNotFound):
            await client.get(CRED)


# ------------------------------------------------------------ lost and found


async def test_a_killed_tracking_connection_flushes_bypasses_then_restores(
    redis_url: str,
) -> None:
    async with world(redis_url) as (settings, store, _), connect(settings) as client:
        link = link_of(client)
        await client.get(CRED)
        killed = link.client_id
        flushes = link.cache.flushes
        await store.client.client_kill_filter(_id=str(killed))
        await wait_for(lambda: link.cache.flushes > flushes, within=5.0, what="the flush")
        down = client.cache_stats()
        # while nothing protects the cache, a write shows at once
        await commit_new_token(store, CRED, "while-down")
        assert (await client.get(CRED)).access_token == "while-down"
        await wait_for(lambda: link.up and link.can_serve(), within=5.0, what="restored")
        assert link.client_id != killed
        await client.get(CRED)  # refilled through the new connection
        before = await evalsha_calls(store)
        assert (await client.get(CRED)).access_token == "while-down"
        assert await evalsha_calls(store) == before  # served from memory again
        await commit_new_token(store, CRED, "after")  # and the new connection is tracked
        await wait_for(lambda: _version_is(client, 2), within=2.0, what="invalidation")
    assert down is not None
    assert (down.size, down.serving) == (0, False)


async def test_a_silent_server_stops_the_cache_within_the_proof_window(
    fresh_redis: RedisServer,
) -> None:
    """A paused server answers nothing, sends no invalidation and closes no
    socket: the unanswered PINGs stop the cache within about a second, and
    it serves again once the server answers."""
    async with world(fresh_redis.url) as (settings, _, _), connect(settings) as client:
        await client.get(CRED)
        link = link_of(client)
        assert link.can_serve()
        fresh_redis.pause()
        try:
            paused_at = time.monotonic()
            await wait_for(lambda: not link.can_serve(), within=3.0, what="the stop")
            stopped_after = time.monotonic() - paused_at
        finally:
            fresh_redis.resume()
        await wait_for(link.can_serve, within=10.0, what="serving again")
    assert stopped_after < 1.6


# ------------------------------------------------------------ own writes, off


async def test_put_and_delete_are_read_by_the_next_get(redis_url: str) -> None:
    """With the tracking connection's invalidations switched off (CLIENT
    TRACKING OFF through the link itself), only the client's own
    bookkeeping can make its writes visible."""
    async with world(redis_url) as (settings, _store, fake), connect(settings) as client:
        link = link_of(client)
        old = await client.get(CRED)
        assert await link.read(pack_command("CLIENT", "TRACKING", "OFF")) == "OK"
        grant = fake.issue_grant()
        await client.put({"id": CRED, "profile": "p", "access_token": grant.access_token,
                          "refresh_token": grant.refresh_token, "expires_in": 3600})  # fmt: skip
        new = await client.get(CRED)
        await client.delete(CRED)
        with pytest.raises(CredentialNotFound):
            await client.get(CRED)
    assert new.access_token == grant.access_token != old.access_token


async def test_a_get_after_an_event_returns_at_least_its_version(redis_url: str) -> None:
    """Redis's invalidation and the event travel on different connections;
    an event handed out by ``events()`` drops the older cached token
    itself (here the invalidations are switched off to show it)."""
    async with (
        world(redis_url, expires_in=30) as (settings, _, _),
        connect(settings) as client,
        connect(settings) as asker,
        worker_running(settings),
    ):
        assert (await client.get(CRED)).version == 0
        assert await link_of(client).read(pack_command("CLIENT", "TRACKING", "OFF")) == "OK"
        assert (await asker.get(CRED, min_ttl=60, timeout=10)).version == 1
        assert (await client.get(CRED)).version == 0  # nothing told this client yet
        async for entry in client.events(since="start", follow=False):
            assert entry.version == 1
            assert (await client.get(CRED)).version == 1


async def test_a_get_never_returns_older_than_a_token_it_returned(redis_url: str) -> None:
    """A min_ttl call returns the new token it waited for; the plain get()
    after it must not return the cached older one, whether or not Redis's
    invalidation has arrived (switched off here to show it)."""
    async with (
        world(redis_url, expires_in=30) as (settings, _, _),
        connect(settings) as client,
        worker_running(settings),
    ):
        assert (await client.get(CRED)).version == 0
        assert await link_of(client).read(pack_command("CLIENT", "TRACKING", "OFF")) == "OK"
        fresh = await client.get(CRED, min_ttl=60, timeout=10)
        after = await client.get(CRED)
    assert (fresh.version, after.version) == (1, 1)


async def test_the_setting_turns_the_cache_off(redis_url: str) -> None:
    async with (
        world(redis_url, client_cache=0) as (settings, store, _),
        connect(settings) as client,
    ):
        await client.get(CRED)
        before = await evalsha_calls(store)
        for _ in range(5):
            await client.get(CRED)
        assert await evalsha_calls(store) == before + 5
        assert client.cache_stats() is None
        assert client._link is None


def test_the_setting_is_read_and_checked() -> None:
    assert Settings.from_env({}).client_cache == 10_000
    assert Settings.from_env({"REFRESHD_CLIENT_CACHE": "0"}).client_cache == 0
    with pytest.raises(Exception, match="REFRESHD_CLIENT_CACHE must not be negative"):
        Settings.from_env({"REFRESHD_CLIENT_CACHE": "-1"})


async def test_a_user_refused_client_tracking_reads_without_the_cache(redis_url: str) -> None:
    """An ACL from before the cache: one warning, reads go to Redis."""
    async with world(redis_url) as (settings, store, _):
        admin = store.client
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "old", "on", ">pw", "+@all", "-client|tracking", "~*", "&*"
        )
        assert settings.redis_url
        old = dataclasses.replace(
            settings, redis_url=settings.redis_url.replace("redis://", "redis://old:pw@")
        )
        async with connect(old) as client:
            assert (await client.get(CRED)).version == 0
            assert (await client.get(CRED)).version == 0
            assert client.cache_stats() is None


# ------------------------------------------------------------ the fill ordering


def _view(version: int) -> RecordView:
    token = AccessToken(credential_id="c", profile="p", access_token=f"at-{version}",
                        token_type="Bearer", expires_at_ms=2**42, scope="",
                        version=version, status=Status.ACTIVE)  # fmt: skip
    return RecordView(token=token, failures=0, reason="", refreshed_at_ms=0, due_ms=None,
                      action="", receivers=0)  # fmt: skip


def test_a_fill_invalidated_in_flight_is_dropped() -> None:
    cache = TokenCache(10)
    ticket = cache.begin("k")
    cache.invalidate("k")  # the write's push, handled before the reply
    assert not cache.finish(ticket, _view(0))
    assert cache.lookup("k") is None
    again = cache.begin("k")
    assert cache.finish(again, _view(1))
    assert cache.lookup("k") == _view(1)
    assert cache.dropped == 1


def test_a_flush_drops_every_fill_in_flight() -> None:
    cache = TokenCache(10)
    a, b = cache.begin("a"), cache.begin("b")
    cache.flush()
    assert not cache.finish(a, _view(0))
    assert not cache.finish(b, _view(0))
    assert len(cache) == 0


def test_only_the_newest_fill_of_a_key_stores() -> None:
    cache = TokenCache(10)
    older, newer = cache.begin("k"), cache.begin("k")
    assert not cache.finish(older, _view(0))
    assert cache.finish(newer, _view(1))
    cache.abandon(older)  # no effect on the stored entry
    assert cache.lookup("k") == _view(1)


def test_entries_are_bounded_least_recently_used_first() -> None:
    cache = TokenCache(2)
    for key in ("a", "b"):
        cache.finish(cache.begin(key), _view(0))
    cache.lookup("a")  # b is now the least recently used
    cache.finish(cache.begin("c"), _view(0))
    assert (cache.lookup("b"), len(cache)) == (None, 2)
    assert cache.lookup("a") is not None
    assert cache.lookup("c") is not None


def test_the_sync_client_reads_through_the_cache(redis_url: str) -> None:
    settings = make_settings(redis_url)

    async def prepare() -> None:
        async with FakeProvider() as fake, open_store(settings) as store:
            await seed(store, fake, 1, expires_in=3600)

    anyio.run(prepare)
    with connect_sync(settings) as client:
        first = client.get(CRED)
        assert client.get(CRED) == first
        stats = client.cache_stats()
    assert stats is not None
    assert (stats.hits, stats.misses) == (1, 1)
