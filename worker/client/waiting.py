"""One events subscription per client, shared by every waiting ``get()``.

A ``get(id, min_ttl=...)`` that asked for a refresh waits for the commit's
event. Rather than one pub/sub connection per waiting call, each client
holds a single subscription to ``<prefix>events`` (on a cluster, to every
partition's shard channel: ``worker.eventsub``), open only while some
call waits, and wakes the calls waiting for the credential an event names.
Pub/sub only shortens the wait: a waiting call re-reads the record after
the subscription is live (a commit that landed just before is not missed)
and again periodically, so a lost message or a broken connection costs
latency, never an answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import orjson
import redis.asyncio as aioredis
from anyio.abc import TaskStatus
from redis.exceptions import RedisError

from worker.eventsub import EventSubscription
from worker.keys import Keyspace
from worker.logs import get_logger
from worker.redisio import REDIS_UNAVAILABLE

__all__ = ["EventWatch", "Waiter"]

log = get_logger("refreshd.client")


class Waiter:
    """One waiting call: woken by any event about its credential."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> bool:
        """Until an event arrives or ``seconds`` pass; True when one arrived.
        Re-armed before returning, so an event that lands while the caller
        re-reads the record wakes the next wait."""
        with anyio.move_on_after(max(seconds, 0.0)):
            await self._event.wait()
        woken = self._event.is_set()
        if woken:
            self._event = anyio.Event()
        return woken


class EventWatch:
    """The shared subscription; ``run`` is the task that owns it."""

    def __init__(self, client: aioredis.Redis, keys: Keyspace, *, retry_s: float = 1.0) -> None:
        self._client = client
        self._keys = keys
        self._retry_s = retry_s
        self._waiters: dict[str, set[Waiter]] = {}
        self._wanted = anyio.Event()  # set while some call waits
        self._live = anyio.Event()  # set while the subscription is confirmed
        self._settled = anyio.Event()  # this attempt went live, or failed

    @property
    def live(self) -> bool:
        return self._live.is_set()

    @asynccontextmanager
    async def watching(self, credential_id: str, *, within: float) -> AsyncIterator[Waiter]:
        """Register a waiter and wait (at most ``within`` seconds) for the
        subscription to be confirmed by the server: only then can a re-read
        not miss a commit. If the subscription fails (Redis down, or an ACL
        that denies SUBSCRIBE), the caller gets its waiter at once and
        relies on re-reads."""
        waiter = Waiter()
        self._waiters.setdefault(credential_id, set()).add(waiter)
        self._wanted.set()
        try:
            if not self._live.is_set():
                with anyio.move_on_after(max(within, 0.0)):
                    await self._settled.wait()
            yield waiter
        finally:
            group = self._waiters.get(credential_id)
            if group is not None:
                group.discard(waiter)
                if not group:
                    del self._waiters[credential_id]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wanted.wait()
            if self._settled.is_set():  # a new attempt: new waiters wait for it
                self._settled = anyio.Event()
            try:
                await self._listen()
            except (RedisError, *REDIS_UNAVAILABLE) as exc:
                log.debug("client.events_unavailable", error=type(exc).__name__)
                self._settled.set()  # waiters go on with re-reads alone
                await anyio.sleep(self._retry_s)
            finally:
                if self._live.is_set():
                    self._live = anyio.Event()
            if not self._waiters:
                self._wanted = anyio.Event()

    async def _listen(self) -> None:
        # one channel, or on a cluster every partition's shard channel
        async with EventSubscription(self._client, self._keys) as events:
            # the server's confirmation: from now on nothing is missed
            while not await events.confirm(5.0):
                pass
            self._live.set()
            self._settled.set()
            while self._waiters:
                data = await events.get(1.0)
                if data is not None:
                    self._dispatch(data)

    def _dispatch(self, data: str | bytes) -> None:
        try:
            body = orjson.loads(data)
            credential_id = body.get("credential_id") if isinstance(body, dict) else None
        except orjson.JSONDecodeError:
            return
        if not isinstance(credential_id, str):
            return
        for waiter in self._waiters.get(credential_id, ()):
            waiter.notify()
