"""The durable event log: read events since a cursor, follow it, or share it
in a consumer group.

Every event the commit script publishes is also appended, in the same
atomic step, to its partition's Redis Stream (``Partition.log``). One stream
per partition, not one for all: a Lua script may only touch keys of one
slot, and a partition is one slot, so the append costs no extra round trip
and works unchanged on Redis Cluster. Per-credential order is kept (a
credential lives in one partition); across partitions a batch is ordered by
stream id, i.e. by commit time.

Entry fields (stable, also read by non-Python consumers): ``v`` schema
number, ``type`` event type, ``id`` credential id, ``version`` the stored
version the event is about, ``json`` the event exactly as published. Never
the refresh token.

A cursor is the position in every partition's stream: the string
``1:<id0>,<id1>,...`` (format version ``1``, then one stream id
``<ms>-<seq>`` per partition in partition order, ``0`` for "nothing read
yet"). Any language can build and split it. A cursor whose position was
trimmed away (older than retention) raises ``EventsTrimmed`` instead of
silently skipping; its ``resume`` cursor continues from the oldest event
kept, once the consumer has accepted the gap.

Reads cover every partition in one round trip (one XREAD over all streams,
with the trim check in the same MULTI): that needs all streams on one
server, as on a single Redis or Sentinel. On a Redis Cluster the streams
live in different slots, which neither one XREAD nor one MULTI may span:
there each partition is read in its own MULTI (the trim check and the read
still see the same stream), all partitions at once, and a blocking read
polls the stream tails every ``CLUSTER_POLL_S`` instead of blocking.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import anyio
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from worker.cluster import router_of
from worker.errors import ConfigError, RefreshdError, StoreUnavailable
from worker.eventmodel import Event, EventFormatError, UnknownEvent, parse_event
from worker.keys import Keyspace
from worker.redisio import guard

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = [
    "CLUSTER_POLL_S",
    "CURSOR_VERSION",
    "Batch",
    "Cursor",
    "CursorError",
    "EventLog",
    "EventsTrimmed",
    "GroupReader",
    "LogEntry",
    "Retention",
]

CURSOR_VERSION = "1"
_ID = re.compile(r"^(?:0|\d{1,20}-\d{1,20})$")


class CursorError(ConfigError):
    """A cursor string that is not one (or is for another partition count)."""


class EventsTrimmed(RefreshdError):
    """Events after the consumer's position were trimmed (older than
    retention, or past the length cap) before it read them. ``partitions``
    says where; ``resume`` continues from the oldest event still kept there."""

    def __init__(self, partitions: Sequence[int], resume: Cursor | None) -> None:
        self.partitions = tuple(partitions)
        self.resume = resume
        super().__init__(
            f"events were trimmed from the log before they were read (partitions "
            f"{', '.join(map(str, self.partitions))}): some events are lost to this consumer"
        )


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of the log the commit script keeps (REFRESHD_EVENT_LOG_*)."""

    enabled: bool = True
    max_age_ms: int = 86_400_000
    max_length: int = 1_000_000  # over all partitions; each keeps its share

    @classmethod
    def from_settings(cls, settings: Settings) -> Retention:
        return cls(
            enabled=settings.event_log,
            max_age_ms=int(settings.event_log_max_age_s * 1000),
            max_length=settings.event_log_max_length,
        )

    def commit_args(self, partitions: int) -> tuple[str, str, str]:
        """ARGV[9..11] of commit.lua: on/off, MINID age, per-partition MAXLEN."""
        per_partition = math.ceil(self.max_length / partitions) if self.max_length else 0
        return ("1" if self.enabled else "0", str(self.max_age_ms), str(per_partition))


def _key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in every partition's stream (``"0"``: before the first)."""

    positions: tuple[str, ...]

    @classmethod
    def beginning(cls, partitions: int) -> Cursor:
        """Everything still retained."""
        return cls(("0",) * partitions)

    @classmethod
    def parse(cls, text: str, partitions: int) -> Cursor:
        version, sep, body = text.strip().partition(":")
        if not sep or version != CURSOR_VERSION:
            raise CursorError(f"not an event log cursor (expected '{CURSOR_VERSION}:<ids>')")
        ids = tuple(body.split(","))
        if len(ids) != partitions:
            raise CursorError(
                f"the cursor has {len(ids)} positions but the installation has "
                f"{partitions} partitions"
            )
        for item in ids:
            if not _ID.match(item):
                raise CursorError(f"bad stream id {item[:30]!r} in the cursor")
        return cls(tuple("0" if i in ("0", "0-0") else i for i in ids))

    def encode(self) -> str:
        return f"{CURSOR_VERSION}:{','.join(self.positions)}"

    def advance(self, partition: int, stream_id: str) -> Cursor:
        positions = list(self.positions)
        positions[partition] = stream_id
        return Cursor(tuple(positions))

    def __str__(self) -> str:
        return self.encode()


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One event read from the log. ``cursor`` (plain reads) resumes right
    after this entry: store it once the event is processed."""

    partition: int
    stream_id: str
    type: str
    credential_id: str
    version: int
    json: str = field(repr=False)
    event: Event
    cursor: Cursor | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """What one read returned. ``cursor`` resumes after the whole batch;
    ``trimmed`` (consumer groups) names partitions where events were
    trimmed before the group read them."""

    entries: list[LogEntry]
    cursor: Cursor | None = None
    trimmed: tuple[int, ...] = ()


def _entry(partition: int, stream_id: str, fields: dict[str, str] | None) -> LogEntry:
    fields = fields or {}
    raw = fields.get("json", "")
    try:
        event = parse_event(raw)
    except EventFormatError:
        event = UnknownEvent(type=fields.get("type", ""), credential_id=fields.get("id", ""),
                             profile="", version=0, ts_ms=0, schema=0)  # fmt: skip
    version = fields.get("version", "")
    return LogEntry(
        partition=partition,
        stream_id=stream_id,
        type=fields.get("type", ""),
        credential_id=fields.get("id", ""),
        version=int(version) if version.isdigit() else 0,
        json=raw,
        event=event,
    )


#: on a cluster, how often a blocking read looks at the stream tails
CLUSTER_POLL_S = 0.1


async def _per_stream(client: aioredis.Redis, build: Any, names: Sequence[str]) -> list[Any]:
    """One MULTI per stream (``build(pipe, name)`` queues its commands), all
    streams at once: a cluster's substitute for one MULTI over every stream.
    Each goes to the stream's node on a plain single-node connection
    (redis-py's cluster transactions run each command in a thread of its
    own). Returns each stream's replies, in order."""
    router = router_of(client)
    assert router is not None
    out: list[Any] = [None] * len(names)

    async def one(n: int, name: str) -> None:
        pipe = router.client_for(name).pipeline(transaction=True)
        build(pipe, name)
        out[n] = await guard(pipe.execute())

    try:
        async with anyio.create_task_group() as tg:
            for n, name in enumerate(names):
                tg.start_soon(one, n, name)
    except* StoreUnavailable as group:
        await router.refresh()  # a node gone (a failover): the next read asks the new map
        raise group.exceptions[0] from None
    return out


class EventLog:
    """Reads the log of one installation (its prefix and partition count)
    on a client made with ``decode_responses=True``. Blocking reads hold one
    pool connection for up to ``block_ms``: keep it under the client's
    socket timeout."""

    def __init__(self, client: aioredis.Redis, keys: Keyspace) -> None:
        self.client = client
        self.keys = keys
        #: on a cluster, per-partition reads (see the module docstring)
        self.sharded = router_of(client) is not None
        self._streams = keys.logs()
        self._index = {name: n for n, name in enumerate(self._streams)}

    def parse_cursor(self, text: str) -> Cursor:
        return Cursor.parse(text, self.keys.partitions)

    def beginning(self) -> Cursor:
        return Cursor.beginning(self.keys.partitions)

    async def end(self) -> Cursor:
        """The cursor just after the newest event now: follow from here to
        see only what happens next."""
        pipe = self.client.pipeline(transaction=False)
        for name in self._streams:
            pipe.xrevrange(name, count=1)
        tails: list[list[Any]] = await guard(pipe.execute())
        return Cursor(tuple(t[0][0] if t else "0" for t in tails))

    async def read(
        self, cursor: Cursor, *, count: int = 1000, block_ms: int | None = None
    ) -> Batch:
        """Events after ``cursor`` (at most ``count`` per partition), oldest
        first; with ``block_ms``, waits that long for one when there is none.
        Raises ``EventsTrimmed`` (and consumes nothing) when events after the
        cursor were trimmed before they were read."""
        self._check(cursor)
        batch = await self._read_checked(cursor, count)
        if batch.entries or not block_ms:
            return batch
        # Wait for anything new, then read it with the trim check: the
        # check and the read must see the same stream (one MULTI).
        streams: dict[Any, Any] = dict(zip(self._streams, cursor.positions, strict=True))
        if self.sharded:
            woke = await self._poll_tails(cursor, block_ms)
        else:
            woke = await guard(self.client.xread(streams, count=1, block=block_ms))
        if not woke:
            return batch
        return await self._read_checked(cursor, count)

    async def follow(
        self, cursor: Cursor, *, count: int = 1000, block_ms: int = 5000
    ) -> AsyncIterator[LogEntry]:
        """Every event after ``cursor``, forever; each entry's ``cursor``
        resumes after it."""
        while True:
            batch = await self.read(cursor, count=count, block_ms=block_ms)
            for entry in batch.entries:
                yield entry
            if batch.cursor is not None:
                cursor = batch.cursor

    def group(
        self,
        group: str,
        consumer: str,
        *,
        claim_idle_ms: int = 30_000,
        start: Literal["oldest", "newest"] = "oldest",
    ) -> GroupReader:
        """A member of consumer group ``group`` (created on first use)."""
        return GroupReader(self, group, consumer, claim_idle_ms=claim_idle_ms, start=start)

    # ---------------------------------------------------------- internals

    def _check(self, cursor: Cursor) -> None:
        if len(cursor.positions) != self.keys.partitions:
            raise CursorError(
                f"the cursor has {len(cursor.positions)} positions but the installation "
                f"has {self.keys.partitions} partitions"
            )

    async def _poll_tails(self, cursor: Cursor, block_ms: int) -> bool:
        """Whether any stream grew past ``cursor`` within ``block_ms`` (a
        cluster's blocking read: one XREVRANGE per stream, pipelined)."""
        deadline = time.monotonic() + block_ms / 1000
        while True:
            pipe = self.client.pipeline(transaction=False)
            for name in self._streams:
                pipe.xrevrange(name, count=1)
            tails: list[list[Any]] = await guard(pipe.execute())
            for tail, pos in zip(tails, cursor.positions, strict=True):
                if tail and (pos == "0" or _key(tail[0][0]) > _key(pos)):
                    return True
            if time.monotonic() >= deadline:
                return False
            await anyio.sleep(CLUSTER_POLL_S)

    async def _read_checked(self, cursor: Cursor, count: int) -> Batch:
        positions = dict(zip(self._streams, cursor.positions, strict=True))
        if self.sharded:
            per = await _per_stream(
                self.client,
                lambda pipe, name: (pipe.xrange(name, count=1),
                                    pipe.xread({name: positions[name]}, count=count)),
                self._streams,
            )  # fmt: skip
            heads = [head for head, _ in per]
            read = [item for _, got in per for item in got or []]
        else:
            pipe = self.client.pipeline(transaction=True)
            for name in self._streams:
                pipe.xrange(name, count=1)
            pipe.xread(positions, count=count)  # type: ignore[arg-type]
            replies: list[Any] = await guard(pipe.execute())
            heads, read = replies[:-1], replies[-1]
        trimmed = [
            n
            for n, (head, pos) in enumerate(zip(heads, cursor.positions, strict=True))
            if pos != "0" and (not head or _key(head[0][0]) > _key(pos))
        ]
        if trimmed:
            resume = cursor
            for n in trimmed:
                resume = resume.advance(n, "0")
            raise EventsTrimmed(trimmed, resume)
        return self._batch(cursor, read or [])

    def _batch(self, cursor: Cursor, read: Iterable[Any]) -> Batch:
        found: list[tuple[tuple[int, int], int, str, dict[str, str]]] = []
        for name, items in read:
            n = self._index[name]
            found.extend((_key(sid), n, sid, fields) for sid, fields in items)
        found.sort(key=lambda item: (item[0], item[1]))
        entries: list[LogEntry] = []
        positions = list(cursor.positions)
        for _, n, sid, fields in found:
            positions[n] = sid
            entry = _entry(n, sid, fields)
            entries.append(_with_cursor(entry, Cursor(tuple(positions))))
        return Batch(entries, Cursor(tuple(positions)))


def _with_cursor(entry: LogEntry, cursor: Cursor) -> LogEntry:
    return LogEntry(entry.partition, entry.stream_id, entry.type, entry.credential_id,
                    entry.version, entry.json, entry.event, cursor)  # fmt: skip


def _in_order(entries: list[LogEntry]) -> list[LogEntry]:
    """Oldest first across partitions (stream ids are commit times)."""
    return sorted(entries, key=lambda e: (_key(e.stream_id), e.partition))


class GroupReader:
    """One member of a consumer group over every partition's stream.

    Delivery is at least once: an entry stays pending until ``ack``. A
    restarted member (same ``consumer`` name) first gets its own pending
    entries again; entries pending at a member that stays away longer than
    ``claim_idle_ms`` are claimed (XAUTOCLAIM) by the next member that reads.
    """

    def __init__(
        self,
        log: EventLog,
        group: str,
        consumer: str,
        *,
        claim_idle_ms: int,
        start: Literal["oldest", "newest"],
    ) -> None:
        if not group or not consumer:
            raise ConfigError("a consumer group needs a group name and a consumer name")
        self.log = log
        self.group = group
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self._start = "0" if start == "oldest" else "$"
        self._created = False
        self._own: list[str] | None = ["0"] * log.keys.partitions  # own pending, then done
        self._claim_from = ["0-0"] * log.keys.partitions

    async def read(self, *, count: int = 100, block_ms: int | None = None) -> Batch:
        """Own pending entries first (after a restart), then entries other
        members left pending too long, then new ones."""
        try:
            return await self._read(count, block_ms)
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # the streams were deleted since (FLUSHALL, a restore): create again
            self._created = False
            return await self._read(count, block_ms)

    async def _read(self, count: int, block_ms: int | None) -> Batch:
        await self._ensure_groups()
        if self._own is not None:
            batch = await self._read_own(count)
            if batch.entries or batch.trimmed:
                return batch
        claimed = await self._autoclaim(count)
        if claimed.entries or claimed.trimmed:
            return claimed
        return await self._read_new(count, block_ms)

    async def ack(self, entries: Iterable[LogEntry]) -> int:
        """Mark entries processed; returns how many were still pending."""
        by_partition: dict[int, list[str]] = {}
        for entry in entries:
            by_partition.setdefault(entry.partition, []).append(entry.stream_id)
        if not by_partition:
            return 0
        pipe = self.log.client.pipeline(transaction=False)
        for n, ids in by_partition.items():
            pipe.xack(self.log._streams[n], self.group, *ids)
        acked: list[int] = await guard(pipe.execute())
        return sum(acked)

    async def _ensure_groups(self) -> None:
        if self._created:
            return
        for name in self.log._streams:
            try:
                await guard(self.log.client.xgroup_create(name, self.group, self._start,
                                                          mkstream=True))  # fmt: skip
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._created = True

    async def _read_own(self, count: int) -> Batch:
        assert self._own is not None
        streams = dict(zip(self.log._streams, self._own, strict=True))
        read: list[Any]
        if self.log.sharded:  # one XREADGROUP per stream: they are in different slots
            pipe = self.log.client.pipeline(transaction=False)
            for name, pos in streams.items():
                pipe.xreadgroup(self.group, self.consumer, {name: pos}, count=count)
            read = [item for got in await guard(pipe.execute()) for item in got or []]
        else:
            read = await guard(
                self.log.client.xreadgroup(self.group, self.consumer, streams, count=count)  # type: ignore[arg-type]
            )
        entries: list[LogEntry] = []
        trimmed: set[int] = set()
        for name, items in read or []:
            n = self.log._index[name]
            for sid, fields in items:
                self._own[n] = sid
                if not fields:  # pending, but trimmed from the stream meanwhile
                    trimmed.add(n)
                    await guard(self.log.client.xack(name, self.group, sid))
                else:
                    entries.append(_entry(n, sid, fields))
        if not entries and not trimmed:
            self._own = None
        return Batch(_in_order(entries), None, tuple(sorted(trimmed)))

    async def _autoclaim(self, count: int) -> Batch:
        pipe = self.log.client.pipeline(transaction=False)
        for name, start in zip(self.log._streams, self._claim_from, strict=True):
            pipe.xautoclaim(name, self.group, self.consumer, self.claim_idle_ms, start,
                            count=count)  # fmt: skip
        replies: list[Any] = await guard(pipe.execute())
        entries: list[LogEntry] = []
        trimmed: list[int] = []
        for n, reply in enumerate(replies):
            next_start, items = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            self._claim_from[n] = next_start
            if deleted:
                trimmed.append(n)
            entries.extend(_entry(n, sid, fields) for sid, fields in items if fields)
        return Batch(_in_order(entries), None, tuple(trimmed))

    async def _read_new(self, count: int, block_ms: int | None) -> Batch:
        client, streams = self.log.client, self.log._streams
        if self.log.sharded:
            return await self._read_new_sharded(count, block_ms)
        pipe = client.pipeline(transaction=True)
        for name in streams:
            pipe.xinfo_groups(name)
            pipe.xrange(name, count=1)
        pipe.xreadgroup(self.group, self.consumer, dict.fromkeys(streams, ">"), count=count)
        replies: list[Any] = await guard(pipe.execute())
        trimmed: list[int] = []
        for n in range(len(streams)):
            groups, head = replies[2 * n], replies[2 * n + 1]
            last = next((g["last-delivered-id"] for g in groups if g["name"] == self.group), "0-0")
            if head and _key(last) != (0, 0) and _key(head[0][0]) > _key(last):
                # the next entry after `last` may be gone: only certain when
                # `last` itself is gone and was followed by more entries
                trimmed.append(n)
        read = replies[-1]
        if not read and block_ms and not trimmed:
            read = await guard(
                client.xreadgroup(
                    self.group,
                    self.consumer,
                    dict.fromkeys(streams, ">"),
                    count=count,
                    block=block_ms,
                )
            )
        entries: list[LogEntry] = []
        for name, items in read or []:
            n = self.log._index[name]
            entries.extend(_entry(n, sid, fields) for sid, fields in items)
        return Batch(_in_order(entries), None, tuple(trimmed))

    async def _read_new_sharded(self, count: int, block_ms: int | None) -> Batch:
        """``_read_new`` on a cluster: one MULTI per stream (group info,
        head, XREADGROUP), polled until ``block_ms`` when nothing is new."""
        streams = self.log._streams
        deadline = time.monotonic() + (block_ms or 0) / 1000
        while True:
            per = await _per_stream(
                self.log.client,
                lambda pipe, name: (pipe.xinfo_groups(name), pipe.xrange(name, count=1),
                                    pipe.xreadgroup(self.group, self.consumer, {name: ">"},
                                                    count=count)),
                streams,
            )  # fmt: skip
            trimmed: list[int] = []
            entries: list[LogEntry] = []
            for n, (groups, head, read) in enumerate(per):
                last = next(
                    (g["last-delivered-id"] for g in groups if g["name"] == self.group), "0-0"
                )
                if head and _key(last) != (0, 0) and _key(head[0][0]) > _key(last):
                    trimmed.append(n)
                for _, items in read or []:
                    entries.extend(_entry(n, sid, fields) for sid, fields in items)
            if entries or trimmed or time.monotonic() >= deadline:
                return Batch(_in_order(entries), None, tuple(trimmed))
            await anyio.sleep(CLUSTER_POLL_S)
