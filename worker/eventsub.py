"""Live events over pub/sub: one channel on one server, a shard channel per partition on a cluster.

On one server (and Sentinel) the commit script PUBLISHes every event on
``<prefix>events``. On a Redis Cluster it SPUBLISHes on the partition's own
shard channel ``{<prefix><n>}:events`` instead: a classic PUBLISH is copied
over the cluster bus to every node (measured with ``bench.cluster_pubsub``
on 3 primaries + 3 replicas: 18.7 us of cluster CPU per event for PUBLISH,
6.2 us for SPUBLISH, over 11 us for the script itself; PUBLISH's share grows
with every node added), so a consumer on a cluster subscribes with
SSUBSCRIBE to each partition's channel, each on the node owning it (one
channel per SSUBSCRIBE: several at once are refused as CROSSSLOT).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis.exceptions import RedisError

from worker.cluster import router_of
from worker.errors import StoreUnavailable
from worker.keys import Keyspace, Partition
from worker.redisio import REDIS_UNAVAILABLE

__all__ = ["EventSubscription"]


class EventSubscription:
    """``async with EventSubscription(client, keys) as events: await events.get(1.0)``
    returns the next event's JSON text (or None after ``wait_s``), on any
    deployment. ``partitions`` narrows a cluster subscription to those
    partitions' channels (one server has one channel for all).

    On a cluster each node's channels are read by a task of their own on
    a connection to that node, feeding one queue: events from every shard
    arrive as they come, not a poll of each node in turn. A node going
    away, or a slot moving (the server then unsubscribes its channels), is
    a ``StoreUnavailable`` from ``get``: subscribe again (the callers'
    reconnect loops do), which routes by the new slot map."""

    def __init__(
        self, client: Any, keys: Keyspace, partitions: Sequence[Partition] | None = None
    ) -> None:
        self._client = client
        self._keys = keys
        self._router = router_of(client)
        self.sharded = self._router is not None
        parts = keys.all_partitions() if partitions is None else list(partitions)
        self.channels = [p.events for p in parts] if self.sharded else [keys.events]
        self._unconfirmed = len(self.channels)
        self._early: deque[str] = deque()  # events read while confirming
        self._pubsubs: list[Any] = []
        self._tg: TaskGroup | None = None
        self._send: MemoryObjectSendStream[tuple[str, Any]] | None = None
        self._receive: MemoryObjectReceiveStream[tuple[str, Any]] | None = None

    def describe(self) -> str:
        """For a notice: what is being listened to."""
        if self.sharded:
            return f"{len(self.channels)} shard channels {{{self._keys.prefix}N}}:events"
        return self.channels[0]

    async def __aenter__(self) -> EventSubscription:
        try:
            if self._router is None:
                pubsub = self._client.pubsub()
                self._pubsubs.append(pubsub)
                await pubsub.subscribe(*self.channels)
                return self
            by_node: dict[str, list[str]] = {}
            for channel in self.channels:
                by_node.setdefault(self._router.address_of(channel), []).append(channel)
            self._send, self._receive = anyio.create_memory_object_stream[tuple[str, Any]](1000)
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
            for address, channels in by_node.items():
                pubsub = self._router.client_at(address).pubsub()
                self._pubsubs.append(pubsub)
                for channel in channels:  # one per SSUBSCRIBE: several are CROSSSLOT
                    await pubsub.ssubscribe(channel)
                self._tg.start_soon(self._pump, pubsub)
        except BaseException as exc:
            await self._close()
            if self._router is not None and isinstance(
                exc, (StoreUnavailable, RedisError, OSError)
            ):
                await self._router.refresh()  # a node gone: the next attempt asks the new map
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        for stream in (self._send, self._receive):
            if stream is not None:
                stream.close()
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            # closing runs when the caller is cancelled too: shielded
            with anyio.CancelScope(shield=True):
                for pubsub in self._pubsubs:
                    await pubsub.aclose()
                self._pubsubs.clear()

    async def _pump(self, pubsub: Any) -> None:
        """One node's messages into the shared queue."""
        assert self._send is not None
        try:
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None:
                    await self._send.send((str(message["type"]), message["data"]))
        except (RedisError, *REDIS_UNAVAILABLE) as exc:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await self._send.send(("error", exc))

    async def confirm(self, wait_s: float) -> bool:
        """Wait until the server has confirmed every subscription (from then
        on no event is missed); False if that took longer than ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while self._unconfirmed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            kind, data = await self._next(left)
            if kind in ("subscribe", "ssubscribe"):
                self._unconfirmed -= 1
            elif kind in ("message", "smessage"):
                self._early.append(str(data))
        return True

    async def get(self, wait_s: float) -> str | None:
        """The next event's JSON text, or None when none came in ``wait_s``."""
        if self._early:
            return self._early.popleft()
        deadline = time.monotonic() + wait_s
        while True:
            kind, data = await self._next(max(deadline - time.monotonic(), 0.0))
            if kind in ("message", "smessage"):
                return str(data)
            if kind == "":
                return None

    async def _next(self, wait_s: float) -> tuple[str, Any]:
        """The next message's (type, data); ("", None) after ``wait_s``."""
        if not self.sharded:
            message = await self._pubsubs[0].get_message(timeout=wait_s)
            return ("", None) if message is None else (str(message["type"]), message["data"])
        assert self._receive is not None
        with anyio.move_on_after(wait_s):
            kind, data = await self._receive.receive()
            if kind == "error":
                if self._router is not None:
                    await self._router.refresh()  # a failover? the next subscription follows
                raise StoreUnavailable(f"redis unavailable: {type(data).__name__}") from data
            if kind == "sunsubscribe":  # the slot moved: its channel is elsewhere now
                raise StoreUnavailable("a shard channel moved (slot migration or failover)")
            return kind, data
        return "", None
