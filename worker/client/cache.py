"""The client's in-process token cache: bounded entries and the ordering that keeps stale fills out.

A cached read costs no round trip, which is the only way a read meets a
sub-millisecond p99 on a VM whose bare PING does not. It is correct only
while every change to a cached record is reported: the invalidations come
from Redis (``worker.client.tracking``) and from this client's own writes
(``put``/``delete`` call ``invalidate``). This module holds no I/O, so the
ordering rules below are tested without a server.

A fill is a read whose reply may be stored: ``begin`` hands out a ticket
before the request is sent, ``finish`` stores the reply only if nothing
invalidated the key (nor flushed the cache) since. So a reply that left
Redis before a write, but arrives after that write's invalidation was
processed, is dropped instead of cached: the next read goes to Redis.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from worker.client.token import RecordView

__all__ = ["CacheStats", "Ticket", "TokenCache"]


@dataclass(frozen=True, slots=True)
class Ticket:
    """One fill in flight: the key, the flush epoch and the fill's number."""

    key: str
    epoch: int
    number: int


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters since the client connected (``Client.cache_stats()``)."""

    #: reads served from the cache
    hits: int
    #: reads that went to Redis while the cache was serving
    misses: int
    #: reads that went to Redis because the cache could not serve (link
    #: down, not yet proven live, an invalidation not yet handled)
    bypassed: int
    #: fills whose reply was dropped (invalidated while in flight)
    dropped: int
    #: keys Redis (or this client's writes) invalidated
    invalidations: int
    #: whole-cache flushes (FLUSHALL, a lost connection, a failover)
    flushes: int
    #: entries held now
    size: int
    #: True while an invalidation channel protects the entries
    serving: bool


class TokenCache:
    """At most ``max_entries`` record views by Redis key, least recently
    used evicted first. Not thread-safe: one event loop owns it."""

    def __init__(self, max_entries: int) -> None:
        if max_entries <= 0:
            raise ValueError("a cache holds at least one entry")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, RecordView] = OrderedDict()
        self._pending: dict[str, int] = {}  # key -> number of the fill that may store
        self._numbers = itertools.count(1)
        self._epoch = 0
        self.hits = self.misses = self.bypassed = 0
        self.dropped = self.invalidations = self.flushes = 0

    def lookup(self, key: str) -> RecordView | None:
        """The cached view, or None (counted as a miss). The caller checks
        first that the cache may serve (``TrackingLink.can_serve``)."""
        view = self._entries.get(key)
        if view is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return view

    def begin(self, key: str) -> Ticket:
        """Before a fill's request is sent. A later fill of the same key
        supersedes this one (only the newest may store)."""
        number = next(self._numbers)
        self._pending[key] = number
        return Ticket(key, self._epoch, number)

    def finish(self, ticket: Ticket, view: RecordView) -> bool:
        """Store the fill's reply unless the key was invalidated, the cache
        flushed or a newer fill begun since ``begin``; True when stored."""
        if ticket.epoch != self._epoch or self._pending.get(ticket.key) != ticket.number:
            self.dropped += 1
            return False
        del self._pending[ticket.key]
        self._entries[ticket.key] = view
        self._entries.move_to_end(ticket.key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def abandon(self, ticket: Ticket) -> None:
        """A fill that failed or was cancelled: forget its ticket."""
        if self._pending.get(ticket.key) == ticket.number:
            del self._pending[ticket.key]

    def invalidate(self, key: str) -> None:
        """The record at ``key`` changed: drop its entry and any fill in flight."""
        self.invalidations += 1
        self._entries.pop(key, None)
        self._pending.pop(key, None)

    def saw(self, key: str, version: int) -> None:
        """The application was told of ``version`` (an event, or a read that
        went to Redis): unless the
        entry holds that version or a newer one, drop it and any fill in
        flight (whose reply may predate the commit), so the next read goes
        to Redis even if Redis's invalidation has not arrived yet."""
        view = self._entries.get(key)
        if view is None or view.token.version < version:
            self._entries.pop(key, None)
            self._pending.pop(key, None)

    def flush(self) -> None:
        """Everything may have changed unseen: drop every entry and every
        fill in flight (a new epoch)."""
        self.flushes += 1
        self._epoch += 1
        self._entries.clear()
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self, *, serving: bool) -> CacheStats:
        return CacheStats(
            hits=self.hits,
            misses=self.misses,
            bypassed=self.bypassed,
            dropped=self.dropped,
            invalidations=self.invalidations,
            flushes=self.flushes,
            size=len(self._entries),
            serving=serving,
        )
