"""``Client.events()``: the durable event log through the client library,
from a cursor or in a consumer group, with the client's typed errors.

Every entry read here was appended by commit.lua in a real commit of a real
worker against the fake provider.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

import worker.client as client_api
from tests.harness import make_settings, seed, wait_for, worker_running
from worker import eventlog, eventmodel
from worker.app import open_store
from worker.client import (
    Client,
    ClientConfigError,
    ClientError,
    Cursor,
    CursorError,
    EventsTrimmed,
    LogEntry,
    Refreshed,
    connect,
    connect_sync,
)
from worker.fakeprovider import FakeProvider
from worker.settings import Settings
from worker.store import Store

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def refreshed(
    redis_url: str, n: int, **overrides: object
) -> AsyncIterator[tuple[Settings, Store, FakeProvider]]:
    """``n`` credentials, each refreshed once by a real worker."""
    settings = make_settings(redis_url, **({"partitions": 4} | overrides))
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, n)

        async def all_refreshed() -> bool:
            return all([(await store.get(c)).version >= 1 for c in grants])

        async with worker_running(settings):
            await wait_for(all_refreshed, within=20, what="every credential refreshed")
        yield settings, store, provider


async def drain(stream: AsyncIterator[LogEntry]) -> list[LogEntry]:
    return [entry async for entry in stream]


def test_the_events_api_is_exported() -> None:
    for name in ("Event", "Refreshed", "Failed", "NeedsReauth", "UnknownEvent",
                 "QuarantinedEvent", "Cursor", "LogEntry", "EventsTrimmed", "CursorError",
                 "EventStream", "SyncEventStream"):  # fmt: skip
        assert name in client_api.__all__, name
    assert client_api.QuarantinedEvent is eventmodel.Quarantined
    assert client_api.Refreshed is eventmodel.Refreshed
    assert client_api.Cursor is eventlog.Cursor
    # the client's own errors, caught as either tree
    assert issubclass(client_api.EventsTrimmed, eventlog.EventsTrimmed)
    assert issubclass(client_api.EventsTrimmed, ClientError)
    assert issubclass(client_api.CursorError, eventlog.CursorError)
    assert issubclass(client_api.CursorError, ClientConfigError)


# ------------------------------------------------------------ from a cursor


async def test_events_resume_exactly_after_a_stored_cursor(redis_url: str) -> None:
    async with refreshed(redis_url, 10) as (settings, _, _), connect(settings) as client:
        everything = await drain(client.events(since="start", follow=False))
        assert len(everything) == 10
        assert {e.credential_id for e in everything} == {f"cred-{n:05d}" for n in range(10)}
        for entry in everything:
            assert isinstance(entry.event, Refreshed)
            assert entry.event.version == entry.version == 1
            stored = await client.get(entry.credential_id, min_ttl=None)
            assert entry.event.access_token == stored.access_token
        # a consumer that stored the 4th entry's cursor (as text) gets the other 6
        saved = str(everything[3].cursor)
        rest = await drain(client.events(since=saved, follow=False))
        assert [e.stream_id for e in rest] == [e.stream_id for e in everything[4:]]
        # a Cursor object works as well; the stream reports where it is
        stream = client.events(since=everything[8].cursor, follow=False)
        last = [e async for e in stream]
        assert [e.stream_id for e in last] == [everything[9].stream_id]
        assert stream.cursor == everything[9].cursor
        # "now": nothing of the past
        assert await drain(client.events(since="now", follow=False)) == []
        assert await drain(client.events(follow=False)) == []


async def test_a_following_consumer_sees_new_commits(redis_url: str) -> None:
    settings = make_settings(redis_url, partitions=4)
    got: list[LogEntry] = []
    async with (
        FakeProvider() as provider,
        open_store(settings) as store,
        connect(settings) as client,
    ):

        async def consume() -> None:
            async for entry in client.events(since="now", block=0.2):
                got.append(entry)
                if len(got) == 5:
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.sleep(0.3)  # following, blocked on an empty log
            await seed(store, provider, 5)
            async with worker_running(settings):
                await wait_for(lambda: len(got) == 5, within=20, what="5 events")
    assert sorted(e.credential_id for e in got) == [f"cred-{n:05d}" for n in range(5)]
    assert all(isinstance(e.event, Refreshed) for e in got)


async def test_a_trimmed_cursor_is_a_typed_error_with_its_resume_point(redis_url: str) -> None:
    async with refreshed(redis_url, 6) as (settings, store, _), connect(settings) as client:
        first = (await drain(client.events(since="start", follow=False)))[0]
        for name in store.keys.logs():  # retention ran past the consumer
            await store.client.xtrim(name, maxlen=0)
        with pytest.raises(EventsTrimmed, match="trimmed") as caught:
            await drain(client.events(since=first.cursor, follow=False))
        assert isinstance(caught.value, eventlog.EventsTrimmed)
        assert first.partition in caught.value.partitions
        assert isinstance(caught.value.resume, Cursor)
        assert await drain(client.events(since=caught.value.resume, follow=False)) == []


async def test_bad_arguments_are_one_line_client_errors(redis_url: str) -> None:
    settings = make_settings(redis_url, partitions=4)
    async with open_store(settings), connect(settings) as client:
        with pytest.raises(CursorError, match="not an event log cursor"):
            client.events(since="yesterday")
        with pytest.raises(CursorError, match="4 partitions"):
            client.events(since="1:0,0")
        with pytest.raises(ClientConfigError, match="consumer="):
            client.events(group="billing")
        with pytest.raises(ClientConfigError, match="own position"):
            client.events(since="1:0,0,0,0", group="billing", consumer="a")
        with pytest.raises(ClientConfigError, match="count"):
            client.events(count=0)
        with pytest.raises(ClientConfigError, match="ack"):
            await client.events(since="start", follow=False).ack()
    off = make_settings(redis_url, partitions=4, event_log=False)
    async with connect(off) as client:
        with pytest.raises(ClientConfigError, match="REFRESHD_EVENT_LOG"):
            client.events()


# ------------------------------------------------------------ consumer groups


async def take(client: Client, consumer: str, n: int, **options: object) -> list[LogEntry]:
    """Read ``n`` entries as ``consumer`` and stop as a crash would: the
    stream is dropped without closing it (the n-th is "being processed")."""
    taken: list[LogEntry] = []
    stream = client.events(group="billing", consumer=consumer, follow=False, **options)  # type: ignore[arg-type]
    async for entry in stream:
        taken.append(entry)
        if len(taken) == n:
            break
    return taken


async def test_a_group_member_that_crashes_gets_its_unprocessed_events_again(
    redis_url: str,
) -> None:
    # one partition, so that count=2 makes batches of exactly 2
    async with (
        refreshed(redis_url, 10, partitions=1) as (settings, store, _),
        connect(settings) as client,
    ):
        (log,) = store.keys.logs()
        # the acks for a batch go out before the next read: "a" crashes while
        # processing the first event of its second batch
        first = await take(client, "a", 3, count=2, since="start")
        assert (await store.client.xpending(log, "billing"))["pending"] == 2
        # "a" restarts under its name: that batch comes back, first the event
        # it was processing; the batch before it was acknowledged
        again = await take(client, "a", 100, count=2)
        assert again[0].stream_id == first[2].stream_id
        assert {e.stream_id for e in first[:2]}.isdisjoint(e.stream_id for e in again)
        seen = [e.credential_id for e in first[:2] + again]
        assert sorted(seen) == [f"cred-{n:05d}" for n in range(10)]
        # caught up (follow=False ended the loop): everything acknowledged
        assert (await store.client.xpending(log, "billing"))["pending"] == 0
        # leaving a loop: the ``async with`` block acknowledges the entries
        # processed, not the one in hand nor the rest of its batch
        async with client.events(group="audit", consumer="x", since="start") as stream:
            async for n, _ in aenumerate(stream):
                if n == 4:
                    break
        assert (await store.client.xpending(log, "audit"))["pending"] == 10 - 4
        async with client.events(group="audit", consumer="x", follow=False) as stream:
            redelivered = [e async for e in stream]
        assert len(redelivered) == 10 - 4


async def aenumerate(stream: AsyncIterator[LogEntry]) -> AsyncIterator[tuple[int, LogEntry]]:
    n = 0
    async for entry in stream:
        yield n, entry
        n += 1


async def test_manual_acks_and_another_member_claiming_a_dead_ones_events(
    redis_url: str,
) -> None:
    async with refreshed(redis_url, 6) as (settings, store, _), connect(settings) as client:
        stream = client.events(group="audit", consumer="a", ack="manual", follow=False,
                               since="start")  # fmt: skip
        got = [e async for e in stream]
        assert len(got) == 6
        assert await stream.ack(*got[:4]) == 4
        # "a" dies with 2 unacknowledged; "b" claims them once they idled 0.2 s
        await anyio.sleep(0.3)
        b = client.events(group="audit", consumer="b", ack="manual", follow=False,
                          claim_idle=0.2)  # fmt: skip
        claimed = [e async for e in b]
        assert sorted(e.stream_id for e in claimed) == sorted(e.stream_id for e in got[4:])
        assert await b.ack(*claimed) == 2
        for name in store.keys.logs():
            assert (await store.client.xpending(name, "audit"))["pending"] == 0


# ------------------------------------------------------------------- sync


def test_sync_events(redis_url: str) -> None:
    async def prepare() -> Settings:
        async with refreshed(redis_url, 4) as (settings, _, _):
            return settings

    settings = anyio.run(prepare)
    with connect_sync(settings) as client:
        entries = list(client.events(since="start", follow=False))
        assert len(entries) == 4
        assert all(isinstance(e.event, Refreshed) for e in entries)
        with client.events(group="g", consumer="s", since="start", follow=False,
                           ack="manual") as stream:  # fmt: skip
            grouped = list(stream)
            assert stream.ack(*grouped) == 4
        assert sorted(e.stream_id for e in grouped) == sorted(e.stream_id for e in entries)
        with client.events(group="g", consumer="s", follow=False) as stream:
            assert list(stream) == []  # all acknowledged


GROUP_MEMBER = """
import sys, time, anyio
from worker.client import connect

async def main(out: str, hang_at: int) -> None:
    async with connect() as client:
        n = 0
        async for entry in client.events(group="billing", consumer="m1", since="start",
                                         count=2, follow=False):
            with open(out, "a") as f:
                f.write(entry.stream_id + "\\n")
            n += 1
            if n == hang_at:  # processing this one when the SIGKILL comes
                print("hanging", flush=True)
                await anyio.sleep(60)

anyio.run(main, sys.argv[1], int(sys.argv[2]))
"""


async def test_a_sigkilled_group_member_gets_the_event_it_was_processing_again(
    redis_url: str, tmp_path: Path
) -> None:
    async with refreshed(redis_url, 8, partitions=1) as (_, store, _):
        env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
        env |= {"REFRESHD_REDIS_URL": redis_url, "REFRESHD_PARTITIONS": "1"}
        first, second = tmp_path / "first.txt", tmp_path / "second.txt"
        async with await anyio.open_process(
            [sys.executable, "-c", GROUP_MEMBER, str(first), "3"], env=env
        ) as proc:
            assert proc.stdout is not None
            with anyio.fail_after(20):
                assert b"hanging" in await proc.stdout.receive()
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        done = await anyio.run_process(
            [sys.executable, "-c", GROUP_MEMBER, str(second), "0"], env=env, check=False
        )
        assert done.returncode == 0, done.stderr.decode()
        before, after = first.read_text().split(), second.read_text().split()
        (log,) = store.keys.logs()
        pending = (await store.client.xpending(log, "billing"))["pending"]
    # killed while processing its 3rd event (the first of its 2nd batch of
    # 2): that batch comes back first; the batch before was acknowledged
    assert after[0] == before[2]
    assert set(before[:2]).isdisjoint(after)
    assert sorted(set(before + after)) == sorted(before[:2] + after)
    assert len(before[:2] + after) == 8
    assert pending == 0
