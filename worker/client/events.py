"""``Client.events()``: the durable event log as an async iterator of typed events.

Two ways to consume, both resumable after a crash:

- **from a cursor** (``since=``): every event after it, each entry with the
  cursor that resumes right after it. The consumer stores that cursor once
  it has processed the entry; after a crash it passes the stored one and
  sees every event it had not finished, none it had (exactly once, when the
  cursor is stored with the work it protects).
- **as a consumer group member** (``group=``, ``consumer=``): the group
  shares the events out (``XREADGROUP``) and each stays pending until it is
  acknowledged (``XACK``). With ``ack="auto"`` an entry is acknowledged
  only once the consumer asks for the next one, i.e. after the body of its
  ``async for`` ran: a crash while processing leaves it pending, and it is
  delivered again (to the restarted member first, or to another member
  after ``claim_idle`` seconds). At least once: a crash can also re-deliver
  entries processed since the last acknowledgement (they are sent in one
  XACK before each read), so make processing idempotent (events carry the
  credential's ``version``). ``ack="manual"``: call ``ack(entry)``.

The stream keeps its position across errors: after ``StoreUnreachable``
(or ``EventsTrimmed`` in a group) iterating it again goes on where it was.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Literal, Self, TypeVar

import anyio
import orjson
from redis.exceptions import ResponseError

from worker import eventlog
from worker.client.errors import (
    ClientConfigError,
    CredentialUnreadable,
    CursorError,
    EventsTrimmed,
    StoreUnreachable,
)
from worker.codec import SecretCodec
from worker.errors import SecretUnreadable, StoreUnavailable
from worker.eventlog import Cursor, EventLog, GroupReader, LogEntry
from worker.eventmodel import Refreshed, parse_event
from worker.events import open_event

__all__ = ["AckMode", "EventStream", "Since"]

#: where a plain read starts: "now" (only new events), "start" (everything
#: retained), a cursor string or a ``Cursor``
Since = str | Cursor | None
AckMode = Literal["auto", "manual"]
_T = TypeVar("_T")


class EventStream:
    """What ``Client.events()`` returns: ``async for entry in stream``, each
    ``entry`` a ``LogEntry`` (``entry.event`` the typed event, ``entry.cursor``
    the position after it in plain reads). Use it as ``async with`` to have a
    group's processed entries acknowledged when the block ends."""

    def __init__(
        self,
        log: EventLog,
        *,
        since: Since,
        group: str | None,
        consumer: str | None,
        ack: AckMode,
        count: int,
        block_s: float,
        claim_idle_s: float,
        follow: bool,
        codec: SecretCodec | None = None,
        seen: Callable[[str, int], None] | None = None,
    ) -> None:
        """``codec``: the client's; with a key ring it opens events whose
        secrets were published encrypted (``REFRESHD_EVENT_SECRETS``).
        ``seen(credential_id, version)`` is told of each entry before it is
        handed out (the client's token cache drops older entries, so a
        ``get()`` after an event returns at least that event's version)."""
        if count < 1:
            raise ClientConfigError("events(): count must be at least 1")
        if ack not in ("auto", "manual"):
            raise ClientConfigError(f"events(): ack must be 'auto' or 'manual', not {ack!r}")
        self._log = log
        self._seen = seen
        self._codec = codec if codec is not None and codec.encrypting else None
        self._count = count
        self._block_ms = max(1, int(block_s * 1000)) if follow else None
        self._follow = follow
        self._auto_ack = ack == "auto"
        self._buffer: deque[LogEntry] = deque()
        self._current: LogEntry | None = None  # handed out, not yet known processed
        self._done: list[LogEntry] = []  # processed, acknowledgement not yet sent
        self._group: GroupReader | None = None
        self._start: Cursor | str = "now"
        self._read_at: Cursor | None = None
        if group is not None or consumer is not None:
            if not group or not consumer:
                raise ClientConfigError(
                    "events(): a consumer group member needs both group= and a stable "
                    "consumer= name (the same after a restart, so its pending events come back)"
                )
            if since not in (None, "now", "start"):
                raise ClientConfigError(
                    "events(): a consumer group keeps its own position; since= may only "
                    "say where a new group starts ('start' or 'now')"
                )
            self._group = log.group(group, consumer, claim_idle_ms=int(claim_idle_s * 1000),
                                    start="oldest" if since == "start" else "newest")  # fmt: skip
        elif isinstance(since, Cursor):
            self._start = since
        elif since in (None, "now"):
            self._start = "now"
        elif since == "start":
            self._start = log.beginning()
        else:
            try:
                self._start = log.parse_cursor(since)
            except eventlog.CursorError as exc:
                raise CursorError(str(exc)) from None

    @property
    def cursor(self) -> Cursor | None:
        """Plain reads: the position after the last entry handed out (None
        in a group, or before the first read when ``since="now"``)."""
        if self._current is not None and self._current.cursor is not None:
            return self._current.cursor
        return self._start if isinstance(self._start, Cursor) else None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> LogEntry:
        if self._current is not None:
            if self._group is None:
                assert self._current.cursor is not None
                self._start = self._current.cursor
            elif self._auto_ack:
                self._done.append(self._current)
            self._current = None
        while not self._buffer:
            if not await self._fill():
                raise StopAsyncIteration
        self._current = self._buffer.popleft()
        if self._seen is not None:
            self._seen(self._current.credential_id, self._current.version)
        event = self._current.event
        if (
            self._codec is not None
            and isinstance(event, Refreshed)
            and event.secrets == "encrypted"
        ):
            self._current = self._opened(self._current, self._codec)
        return self._current

    def _opened(self, entry: LogEntry, codec: SecretCodec) -> LogEntry:
        """``entry`` with its event's secrets decrypted (``entry.json`` stays
        as published). One that does not decrypt raises
        ``CredentialUnreadable``; the next iteration goes on after it."""
        try:
            body = open_event(orjson.loads(entry.json), codec, self._log.keys.prefix)
        except SecretUnreadable as exc:
            raise CredentialUnreadable(
                entry.credential_id, exc.reason, exc.detail, entry=entry
            ) from None
        return dataclasses.replace(entry, event=parse_event(body))

    async def ack(self, *entries: LogEntry) -> int:
        """Acknowledge processed entries of a group now (with ``ack="manual"``,
        the only way; with ``"auto"``, e.g. the last entry before leaving the
        loop). Returns how many were still pending."""
        if self._group is None:
            raise ClientConfigError("events(): ack() is for consumer groups; a plain reader "
                                    "stores entry.cursor instead")  # fmt: skip
        if self._current is not None and self._current in entries:
            self._current = None
        return await self._call(self._group.ack(entries))

    async def aclose(self) -> None:
        """Send the acknowledgements still owed (auto mode); the entry in
        hand when the loop ended is not acknowledged unless ``ack()``-ed."""
        with anyio.move_on_after(5, shield=True):
            await self._flush()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # ---------------------------------------------------------- internals

    async def _flush(self) -> None:
        if self._group is not None and self._done:
            done, self._done = self._done, []
            try:
                await self._call(self._group.ack(done))
            except BaseException:
                self._done = done + self._done  # sent again with the next read
                raise

    async def _fill(self) -> bool:
        """One read into the buffer; False when ``follow=False`` found nothing."""
        await self._flush()
        if self._group is not None:
            batch = await self._call(self._group.read(count=self._count, block_ms=self._block_ms))
            self._buffer.extend(batch.entries)
            if batch.trimmed:  # the batch's entries stay buffered for the next pass
                raise EventsTrimmed(batch.trimmed, None)
            return bool(batch.entries) or self._follow
        if not isinstance(self._start, Cursor):
            self._start = await self._call(self._log.end())
        batch = await self._call(
            self._log.read(self._start, count=self._count, block_ms=self._block_ms)
        )
        self._buffer.extend(batch.entries)
        if batch.cursor is not None and not batch.entries:
            self._start = batch.cursor
        return bool(batch.entries) or self._follow

    async def _call(self, call: Awaitable[_T]) -> _T:
        try:
            return await call
        except eventlog.EventsTrimmed as exc:
            raise EventsTrimmed(exc.partitions, exc.resume) from None
        except eventlog.CursorError as exc:
            raise CursorError(str(exc)) from None
        except StoreUnavailable as exc:
            raise StoreUnreachable(str(exc)) from exc
        except ResponseError as exc:
            raise ClientConfigError(f"Redis refused the call: {exc}") from exc
