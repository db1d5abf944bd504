"""`refreshd watch`: follow events from the durable log (or pub/sub when the
log is off), surviving Redis outages.

Each line on stdout is one event with its secrets masked and, from the log,
a ``cursor`` field: ``refreshd watch --since CURSOR`` resumes right after
that event. Notices go to stderr: one "watching" line at the start and one
line per outage (the command reconnects with backoff and, from the log,
misses nothing that is still retained).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio

from worker.app import open_store
from worker.cli.common import load_settings
from worker.errors import ConfigError, StoreUnavailable
from worker.eventlog import Cursor, EventLog, EventsTrimmed
from worker.events import mask_event
from worker.eventsub import EventSubscription
from worker.redisio import REDIS_UNAVAILABLE
from worker.settings import Settings
from worker.store import Store

__all__ = ["add_parser", "watch"]

_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.2, 5.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "watch",
        help="print events as they happen, or from the event log since a cursor",
    )
    p.add_argument("--reveal", action="store_true", help="print secrets (tokens) unmasked")
    p.add_argument("--count", type=int, default=0, help="exit after this many events")
    p.add_argument(
        "--since",
        metavar="CURSOR",
        help="read the event log after CURSOR (a line's 'cursor'), or 'start' for "
        "everything retained; default: only new events",
    )
    p.set_defaults(handler=watch)


class _Printer:
    def __init__(self, reveal: bool, count: int) -> None:
        self.reveal, self.count, self.seen = reveal, count, 0
        self.announced = False  # the "watching" notice, once (not again per reconnect)

    def show(self, body: dict[str, Any], cursor: Cursor | None) -> bool:
        """Print one event; True when ``--count`` is reached."""
        shown = body if self.reveal else mask_event(body)
        if cursor is not None:
            shown["cursor"] = cursor.encode()
        print(json.dumps(shown, sort_keys=True), flush=True)
        self.seen += 1
        return bool(self.count) and self.seen >= self.count


async def watch(args: argparse.Namespace) -> int:
    settings = load_settings()
    printer = _Printer(args.reveal, args.count)
    if not settings.event_log:
        if args.since:
            raise ConfigError("--since reads the event log, which is off (REFRESHD_EVENT_LOG)")
        return await _resilient(settings, lambda store: _follow_pubsub(store, printer))
    state: dict[str, Cursor | None] = {"cursor": None}

    async def run(store: Store) -> bool:
        log = EventLog(store.client, store.keys)
        cursor = state["cursor"]
        if cursor is None:
            if args.since == "start":
                cursor = log.beginning()
            elif args.since:
                cursor = log.parse_cursor(args.since)
            else:
                cursor = await log.end()
            state["cursor"] = cursor
            _notice(f"watching the event log after {cursor.encode()} (Ctrl-C stops)")
        try:
            async for entry in log.follow(cursor, block_ms=2000):
                state["cursor"] = entry.cursor
                if printer.show(_body(entry.json, entry.type, entry.credential_id), entry.cursor):
                    return True
        except EventsTrimmed as exc:
            raise _Trimmed(
                f"{exc}; to go on from the oldest event kept: --since {exc.resume}"
            ) from None
        return False

    return await _resilient(settings, run)


class _Trimmed(ConfigError):
    """EventsTrimmed, told as one line with the cursor that skips the gap."""


async def _follow_pubsub(store: Store, printer: _Printer) -> bool:
    async with EventSubscription(store.client, store.keys) as events:
        if not printer.announced:
            _notice(f"watching live events on {events.describe()} (the event log is off)")
            printer.announced = True
        while True:
            data = await events.get(1.0)
            if data is not None and printer.show(_body(data, "", ""), None):
                return True


async def _resilient(settings: Settings, body: Callable[[Store], Any]) -> int:
    """Run ``body`` on a fresh store; on an outage, one stderr line, then
    reconnect with backoff until it comes back."""
    delay, down = _BACKOFF_FIRST_S, False
    while True:
        try:
            async with _store(settings) as store:
                down, delay = False, _BACKOFF_FIRST_S
                if await body(store):
                    return 0
        except (StoreUnavailable, *REDIS_UNAVAILABLE) as exc:
            if not down:
                _notice(f"watch: redis unavailable ({type(exc).__name__}); reconnecting")
                down = True
            await anyio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)


@asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[Store]:
    # read-only: an unsafe Redis is named on stderr, not refused
    async with open_store(settings, refuse_unsafe=False) as store:
        yield store


def _body(raw: str, kind: str, credential_id: str) -> dict[str, Any]:
    """The event to print; something not written by refreshd (not a JSON
    object) is shown as such, never as a traceback."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return {"type": kind, "credential_id": credential_id, "unreadable": True}
    return body


def _notice(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
