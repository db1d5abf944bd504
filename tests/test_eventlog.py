"""The durable event log: appended by the commit script, read by cursor,
followed, shared in consumer groups, trimmed by length and age.

Real Redis and real workers refreshing against the fake provider: every
entry read here was written by commit.lua in a real commit.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest

from tests.harness import Events, make_settings, seed, wait_for, worker_running
from tests.redis_server import RedisServer
from worker.app import open_store
from worker.errors import ConfigError
from worker.eventlog import Cursor, CursorError, EventLog, EventsTrimmed, LogEntry, Retention
from worker.eventmodel import Refreshed
from worker.fakeprovider import FakeProvider, FakeProviderConfig
from worker.settings import Settings
from worker.store import Store

pytestmark = pytest.mark.anyio

ENTRY_FIELDS = {"v", "type", "id", "version", "json"}


async def refresh_all_once(
    settings: Settings, store: Store, provider: FakeProvider, n: int
) -> None:
    """``n`` credentials, each refreshed once by a real worker."""
    grants = await seed(store, provider, n)

    async def all_refreshed() -> bool:
        return all([(await store.get(c)).version >= 1 for c in grants])

    async with worker_running(settings):
        await wait_for(all_refreshed, within=20, what="every credential refreshed")


async def read_all(log: EventLog, cursor: Cursor | None = None) -> list[LogEntry]:
    cursor = cursor or log.beginning()
    entries: list[LogEntry] = []
    while True:
        batch = await log.read(cursor, count=50)
        if not batch.entries:
            return entries
        entries += batch.entries
        assert batch.cursor is not None
        cursor = batch.cursor


# ------------------------------------------------------------------ cursor


def test_cursor_round_trips_and_names_what_is_wrong() -> None:
    cursor = Cursor(("0", "1733216000123-0", "1733216000124-7"))
    text = cursor.encode()
    assert text == "1:0,1733216000123-0,1733216000124-7"
    assert Cursor.parse(text, 3) == cursor
    assert Cursor.parse("1:0-0,0,5-1", 3).positions == ("0", "0", "5-1")
    for bad, words in [
        ("", "not an event log cursor"),
        ("2:0,0,0", "not an event log cursor"),
        ("1:0,0", "has 2 positions but the installation has 3"),
        ("1:0,0,x-1", "bad stream id"),
        ("1:0,0,5", "bad stream id"),
    ]:
        with pytest.raises(CursorError, match=words):
            Cursor.parse(bad, 3)
    assert issubclass(CursorError, ConfigError)  # the CLI prints one line


def test_retention_settings_reach_the_commit_script() -> None:
    settings = Settings(event_log_max_length=1000, event_log_max_age_s=60, partitions=16)
    assert Retention.from_settings(settings).commit_args(16) == ("1", "60000", "63")
    off = Settings(event_log=False)
    assert Retention.from_settings(off).commit_args(16)[0] == "0"
    with pytest.raises(ConfigError, match="the event log needs a bound"):
        Settings(event_log_max_length=0, event_log_max_age_s=0)
    with pytest.raises(ConfigError, match="must not be negative"):
        Settings(event_log_max_length=-1)
    with pytest.raises(ConfigError, match="at least 2 per partition"):
        Settings(event_log_max_length=31, partitions=16)
    assert Settings.from_env({"REFRESHD_EVENT_LOG": "off"}).event_log is False


# ---------------------------------------------------------- commit appends


async def test_each_commit_appends_its_published_event_to_its_partition(redis_url: str) -> None:
    settings = make_settings(redis_url, partitions=4)
    async with FakeProvider() as provider, open_store(settings) as store:
        events = Events()
        async with anyio.create_task_group() as tg:
            await tg.start(events.listen, store)
            await refresh_all_once(settings, store, provider, 12)
            await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
        raw: dict[str, list[Any]] = {}
        for part in store.keys.all_partitions():
            raw[part.log] = list(await store.client.xrange(part.log) or [])
        entries = [e for items in raw.values() for e in items]
        assert len(entries) == len(events.items) == 12
        published = {json.dumps(e, sort_keys=True) for e in events.items}
        for part in store.keys.all_partitions():
            for _, fields in raw[part.log]:
                assert set(fields) == ENTRY_FIELDS  # the documented, stable layout
                body = json.loads(fields["json"])
                assert json.dumps(body, sort_keys=True) in published
                assert fields["v"] == "1" == str(body["schema"])
                assert fields["type"] == body["type"] == "token.refreshed"
                assert fields["id"] == body["credential_id"]
                assert fields["version"] == str(body["version"]) == "1"
                assert store.keys.partition_of(fields["id"]) == part
                assert "refresh_token" not in fields["json"]
        for cred_id in {e["credential_id"] for e in events.items}:
            stored = await store.raw_fields(cred_id)
            assert stored.get("refresh_token", "") not in str(raw) or not stored


async def test_the_log_can_be_turned_off(redis_url: str) -> None:
    settings = make_settings(redis_url, partitions=2, event_log=False)
    async with FakeProvider() as provider, open_store(settings) as store:
        events = Events()
        async with anyio.create_task_group() as tg:
            await tg.start(events.listen, store)
            await refresh_all_once(settings, store, provider, 4)
            await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
        assert len(events.items) == 4  # pub/sub stays
        assert [await store.client.exists(k) for k in store.keys.logs()] == [0, 0]


# ------------------------------------------------------------------ reading


async def test_read_from_a_cursor_resumes_exactly_after_an_entry(redis_url: str) -> None:
    settings = make_settings(redis_url, partitions=3)
    async with FakeProvider() as provider, open_store(settings) as store:
        await refresh_all_once(settings, store, provider, 20)
        log = EventLog(store.client, store.keys)
        entries = await read_all(log)
        assert sorted(e.credential_id for e in entries) == [f"cred-{n:05d}" for n in range(20)]
        ordered = [
            (int(e.stream_id.split("-")[0]), int(e.stream_id.split("-")[1])) for e in entries
        ]
        assert ordered == sorted(ordered)  # oldest first across partitions
        for entry in entries:
            assert isinstance(entry.event, Refreshed)
            assert entry.event.credential_id == entry.credential_id
            assert entry.event.version == entry.version == 1
        # resuming from any entry's cursor (as a string, as a consumer stores
        # it) yields exactly the entries after it
        for k in (0, 7, 19):
            after = entries[k].cursor
            assert after is not None
            cursor = log.parse_cursor(after.encode())
            rest = await read_all(log, cursor)
            assert [e.stream_id for e in rest] == [e.stream_id for e in entries[k + 1 :]]
        end = await log.end()
        assert (await log.read(end)).entries == []


async def test_a_blocked_read_wakes_up_for_the_next_commit(redis_url: str) -> None:
    settings = make_settings(redis_url, partitions=4)
    async with FakeProvider() as provider, open_store(settings) as store:
        log = EventLog(store.client, store.keys)
        start = await log.end()
        got: list[LogEntry] = []

        async def reader() -> None:
            batch = await log.read(start, block_ms=8000)
            got.extend(batch.entries)

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.sleep(0.3)
            began = time.monotonic()
            await refresh_all_once(settings, store, provider, 1)
            await wait_for(lambda: got, within=8, what="the blocked read to return")
        assert time.monotonic() - began < 8
        assert [e.credential_id for e in got] == ["cred-00000"]


# ---------------------------------------------------------------- retention


async def generate(settings: Settings, store: Store, provider: FakeProvider, n: int) -> None:
    """Real workers refresh 40 credentials (1 s tokens) until ``n`` refreshes."""
    await seed(store, provider, 40)
    async with worker_running(settings):
        await wait_for(lambda: provider.stats.refreshed >= n, within=40, what=f"{n} refreshes")


async def test_the_length_cap_trims_the_log_and_memory_per_event_is_measured(
    redis_url: str,
) -> None:
    settings = make_settings(redis_url, partitions=1, event_log_max_length=150)
    async with (
        FakeProvider(FakeProviderConfig(lifetime_s=1)) as provider,
        open_store(settings) as store,
    ):
        key = store.keys.partition(0).log
        log = EventLog(store.client, store.keys)
        async with anyio.create_task_group() as tg:
            tg.start_soon(generate, settings, store, provider, 600)
            await wait_for(lambda: store.client.xlen(key), within=10, what="a first event")
            first = (await log.read(log.beginning(), count=1)).entries[0]
        added = provider.stats.refreshed
        length = await store.client.xlen(key)
        # MAXLEN ~: at least the cap, at most one stream node (100 entries) more
        assert 150 <= length <= 250 < added
        # a consumer whose cursor was trimmed away is told, not skipped ahead
        assert first.cursor is not None
        with pytest.raises(EventsTrimmed, match="trimmed") as caught:
            await log.read(first.cursor)
        assert caught.value.partitions == (0,)
        assert caught.value.resume is not None
        resumed = await read_all(log, caught.value.resume)
        assert len(resumed) == length
        # memory per retained event (quoted in the README)
        usage: int = await store.client.memory_usage(key, samples=0)  # type: ignore[assignment]
        per_event = usage / length
        token_bytes = (
            len(resumed[0].event.access_token) if isinstance(resumed[0].event, Refreshed) else 0
        )
        print(f"\nevent log: {per_event:.0f} bytes per retained event ({token_bytes}-byte tokens)")
        assert 100 < per_event < 1500


async def test_the_age_bound_trims_old_events(redis_url: str) -> None:
    settings = make_settings(
        redis_url, partitions=1, event_log_max_length=0, event_log_max_age_s=1.0
    )
    async with (
        FakeProvider(FakeProviderConfig(lifetime_s=1)) as provider,
        open_store(settings) as store,
    ):
        key = store.keys.partition(0).log
        await generate(settings, store, provider, 400)
        length = await store.client.xlen(key)
        assert length < provider.stats.refreshed
        oldest: str = (await store.client.xrange(key, count=1))[0][0]  # type: ignore[index,assignment]
        newest: str = (await store.client.xrevrange(key, count=1))[0][0]  # type: ignore[index,assignment]
        span_ms = int(newest.split("-")[0]) - int(oldest.split("-")[0])
        # MINID ~ trims whole stream nodes: up to one node (100 entries) more
        assert span_ms < 1000 + 2000


# ----------------------------------------------------------- consumer groups


async def test_a_group_redelivers_a_crashed_members_events(redis_url: str) -> None:
    settings = make_settings(redis_url, partitions=4)
    async with FakeProvider() as provider, open_store(settings) as store:
        await refresh_all_once(settings, store, provider, 10)
        log = EventLog(store.client, store.keys)
        a = log.group("billing", "a", claim_idle_ms=300)
        taken = (await a.read(count=3)).entries
        assert taken
        # `a` crashes before acking: a restarted `a` gets its own pending first
        a2 = log.group("billing", "a", claim_idle_ms=300)
        again = (await a2.read(count=100)).entries
        assert [e.stream_id for e in again] == [e.stream_id for e in taken]
        # `a` is gone for good; `b` reads what nobody had, then claims a's
        b = log.group("billing", "b", claim_idle_ms=300)
        fresh: list[LogEntry] = []
        while batch := (await b.read(count=100)).entries:
            fresh += batch
            assert await b.ack(batch) == len(batch)
        assert {e.stream_id for e in fresh}.isdisjoint(e.stream_id for e in taken)
        await anyio.sleep(0.4)  # past claim_idle_ms
        claimed = (await b.read(count=100)).entries
        assert sorted(e.stream_id for e in claimed) == sorted(e.stream_id for e in taken)
        assert await b.ack(claimed) == len(claimed)
        seen = {e.credential_id for e in fresh + claimed}
        assert seen == {f"cred-{n:05d}" for n in range(10)}
        # all acked: nothing pending, nothing new
        assert (await b.read(count=100)).entries == []
        for name in store.keys.logs():
            assert (await store.client.xpending(name, "billing"))["pending"] == 0
        # another group sees everything again, independently
        other = log.group("audit", "x")
        assert len((await other.read(count=100)).entries) == 10


def test_events_start_with_schema_and_type_as_commit_lua_expects() -> None:
    """commit.lua matches '^{"schema":N,"type":"..."' instead of decoding."""
    from worker.events import EventType, build_event

    for kind in EventType:
        raw = build_event(kind, credential_id='a"b', profile="p", version=1, ts_ms=2,
                          access_token="t", reason="r")  # fmt: skip
        assert raw.startswith(f'{{"schema":1,"type":"{kind.value}",')


async def test_a_grace_retry_landing_on_a_late_answer_logs_the_stored_version(
    redis_url: str,
) -> None:
    """The one path where commit.lua re-encodes the event (a late answer
    landed first, so the version moved): the log entry's fields still come
    out right."""
    from tests.test_scripts import NEW_TOKENS, abandoned_spend, claimed, create
    from worker.events import EventType, build_event

    async with open_store(make_settings(redis_url)) as store:
        await create(store, "c1")
        a, _ = await abandoned_spend(store, "c1")
        b = await claimed(store, "c1", "B")
        assert (await store.spend(b, timeout_ms=1000, margin_ms=100, rt_hash="fp",
                                  grace_ms=60_000)).ok  # fmt: skip

        def event(version: int) -> str:
            return build_event(EventType.REFRESHED, credential_id="c1", profile="p",
                               version=version, ts_ms=1, access_token="at")  # fmt: skip

        assert (await store.commit(a, "refreshed", next_due="", fields=NEW_TOKENS,
                                   event=event(1))).ok  # fmt: skip
        assert (await store.commit(b, "refreshed", next_due="", fields=NEW_TOKENS,
                                   event=event(1))).ok  # fmt: skip
        log = EventLog(store.client, store.keys)
        entries = await read_all(log)
        assert [(e.type, e.version, e.event.version) for e in entries] == [
            ("token.refreshed", 1, 1),
            ("token.refreshed", 2, 2),
        ]
        raw = await store.client.xrange(store.keys.partition_of("c1").log)
        assert [fields["v"] for _, fields in raw] == ["1", "1"]  # type: ignore[index,union-attr]


async def test_a_group_survives_its_streams_being_deleted(redis_url: str) -> None:
    settings = make_settings(redis_url, partitions=2)
    async with FakeProvider() as provider, open_store(settings) as store:
        await refresh_all_once(settings, store, provider, 2)
        log = EventLog(store.client, store.keys)
        member = log.group("g", "m")
        assert len((await member.read(count=10)).entries) == 2
        await store.client.delete(*store.keys.logs())  # e.g. restored from an old backup
        await store.set_due("cred-00000", 0)

        async def refreshed_again() -> bool:
            return (await store.get("cred-00000")).version == 2

        async with worker_running(settings):
            await wait_for(refreshed_again, within=20, what="a second refresh")
        batch = await member.read(count=10)
        assert [(e.credential_id, e.version) for e in batch.entries] == [("cred-00000", 2)]
        assert isinstance(batch.entries[0].event, Refreshed)


async def test_a_caught_up_reader_is_not_told_of_a_trim_after_a_quiet_spell(
    fresh_redis: RedisServer,
) -> None:
    """Age trimming after a long quiet spell must not strand a consumer that
    had read everything: the entry it sits on stays until the next one is
    there. (One entry per stream node makes the approximate trim exact.)"""
    with fresh_redis.client() as raw:
        raw.config_set("stream-node-max-entries", 1)
    settings = make_settings(fresh_redis.url, partitions=1, event_log_max_age_s=0.5)
    async with FakeProvider() as provider, open_store(settings) as store:
        await refresh_all_once(settings, store, provider, 3)
        log = EventLog(store.client, store.keys)
        caught_up = (await read_all(log))[-1].cursor
        assert caught_up is not None
        await anyio.sleep(1.0)  # quiet for longer than retention
        await store.set_due("cred-00000", 0)

        async def refreshed_again() -> bool:
            return (await store.get("cred-00000")).version == 2

        async with worker_running(settings):
            await wait_for(refreshed_again, within=20, what="a refresh after the quiet spell")
        batch = await log.read(caught_up)
        assert [(e.credential_id, e.version) for e in batch.entries] == [("cred-00000", 2)]
        # the older entries did go: retention still works
        assert await store.client.xlen(store.keys.partition(0).log) == 2
