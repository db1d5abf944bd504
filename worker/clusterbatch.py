"""Group commit on a Redis Cluster: one ``ScriptBatcher`` per primary, calls routed by slot.

A batch owns one connection because WAITAOF (and WAIT) acknowledge the
writes of the connection they are sent on; on a cluster that connection
can only reach one node, so each primary gets its own batcher on its own
single-node pool (``worker.cluster.ClusterRouter``) and a call joins the
batcher of the node owning its partition's slot. Durability is therefore
per node: a batch's WAITAOF covers the scripts that ran on that node.

Redirections are resolved here, since in each case the script did *not*
run and sending it again is safe:

* MOVED (the slot has a new owner: a reshard finished, or a failover) -
  sent again to the node the reply names, and the slot map is re-read;
* ASK (the slot is being migrated and this key is already on the target) -
  sent to the target with ASKING in front, on the same connection;
* TRYAGAIN (a migration has the partition's keys on both nodes), CLUSTERDOWN
  and READONLY (a failover in progress) - sent again after a short pause,
  re-reading the slot map.

A node that stops answering is a ``StoreUnavailable`` for the calls that
were out on it (their outcome is unknown, as on one server); the slot map
is re-read so that, once a replica is promoted, new calls go to it, and
commits re-applied after a lost acknowledgement go through the router too.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from redis import exceptions as redis_errors
from redis.commands.core import AsyncScript

from worker.batcher import Call, Result, ScriptBatcher, execute_scripts
from worker.cluster import ClusterRouter
from worker.errors import StoreUnavailable
from worker.logs import get_logger
from worker.redisio import guard

__all__ = ["ClusterBatcher", "Read", "execute_clustered", "run_by_node"]

log = get_logger("refreshd.cluster")

#: as many redirections as redis-py follows for one command
MAX_REDIRECTS = 16
#: pause before sending again after TRYAGAIN / CLUSTERDOWN / READONLY, and
#: how many times: a migrating slot answers TRYAGAIN to a script whose keys
#: are split between the two nodes until the migration has moved them all
_RETRY_PAUSE_S = 0.05
_AGAIN_TRIES = 100
_NOT_NOW = (redis_errors.TryAgainError, redis_errors.ClusterDownError, redis_errors.ReadOnlyError)


@dataclass(frozen=True, slots=True)
class _NodeStore:
    """What a ``ScriptBatcher`` reads from its store: one node's client, and
    what that node's batches wait for as it is now (a failover changes it:
    ``Store.durability_at``)."""

    client: Any
    store: Any
    address: str

    @property
    def durability(self) -> Any:
        return self.store.durability_at(self.address)


def _redirect(exc: BaseException) -> tuple[str, str | None]:
    """How to go on after an error reply: ("moved" | "ask", address),
    ("again", None) for TRYAGAIN and the like, ("fail", None) otherwise."""
    if isinstance(exc, redis_errors.MovedError):
        return "moved", f"{exc.host}:{exc.port}"
    if isinstance(exc, redis_errors.AskError):
        return "ask", f"{exc.host}:{exc.port}"
    cause = exc.__cause__ if isinstance(exc, StoreUnavailable) else exc
    if isinstance(cause, _NOT_NOW):
        return "again", None
    return "fail", None


class ClusterBatcher:
    """``ScriptBatcher``'s interface (``run``, ``call``, ``flush``,
    ``running``) over one batcher per primary."""

    def __init__(
        self,
        store: Any,
        router: ClusterRouter,
        *,
        connections: int = 16,
        on_not_durable: Callable[[str, int], None] | None = None,
        on_unconfirmed: Callable[[list[Sequence[Any]]], None] | None = None,
        **batcher_options: Any,
    ) -> None:
        self._store = store
        self._router = router
        self._options: dict[str, Any] = {
            "connections": connections,
            "on_not_durable": on_not_durable,
            "on_unconfirmed": on_unconfirmed,
            **batcher_options,
        }
        self._batchers: dict[str, ScriptBatcher] = {}
        self._create = anyio.Lock()
        #: redirections followed, by kind ("moved", "ask", "again"): logged
        #: at debug level, counted here for tests and diagnostics
        self.redirects: Counter[str] = Counter()
        self._tg: TaskGroup | None = None

    @property
    def running(self) -> bool:
        return self._tg is not None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the per-node batchers until cancelled; they start on first use."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None

    async def flush(self, timeout_s: float) -> bool:
        """Every node's batcher flushed within one shared deadline."""
        deadline = time.monotonic() + timeout_s
        done = True
        for batcher in list(self._batchers.values()):
            done = await batcher.flush(max(deadline - time.monotonic(), 0.0)) and done
        return done

    async def call(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        wait_durable: bool = True,
    ) -> Result:
        """Run ``script`` on the node owning ``keys``' slot, in that node's
        next batch; see the module docstring for redirections."""
        address: str | None = None
        asking = False
        last: BaseException = StoreUnavailable("cluster: too many redirections")
        redirects = agains = 0
        while redirects < MAX_REDIRECTS and agains < _AGAIN_TRIES:
            if not self.running:
                raise StoreUnavailable("worker stopping")
            seen = time.monotonic()
            target = address or self._router.address_of(keys[0])
            batcher = await self._batcher_at(target)
            try:
                return await batcher.call(
                    script, keys, args, wait_durable=wait_durable, asking=asking
                )
            except (redis_errors.ResponseError, StoreUnavailable) as exc:
                how, where = _redirect(exc)
                if how == "fail":
                    if isinstance(exc, StoreUnavailable):  # a node gone: a failover?
                        await self._router.refresh(since=seen)
                    raise
                last = exc
                self.redirects[how] += 1
                log.debug("cluster.redirect", kind=how, node=where or target)
                address, asking = (where, how == "ask") if where else (None, False)
                if how != "ask":
                    await self._router.refresh(since=seen)
                if how == "again":
                    agains += 1
                    await anyio.sleep(_RETRY_PAUSE_S)
                else:
                    redirects += 1
        raise last

    async def _batcher_at(self, address: str) -> ScriptBatcher:
        batcher = self._batchers.get(address)
        if batcher is not None and batcher.running:
            return batcher
        async with self._create:
            batcher = self._batchers.get(address)
            if batcher is None or not batcher.running:
                if self._tg is None:
                    raise StoreUnavailable("worker stopping")
                node = _NodeStore(self._router.client_at(address), self._store, address)
                batcher = ScriptBatcher(node, resubmit=self.call, **self._options)
                await self._tg.start(batcher.run)
                self._batchers[address] = batcher
            return batcher


async def execute_clustered(
    router: ClusterRouter, durability: Any, calls: Sequence[Call]
) -> list[Result | Exception]:
    """``execute_scripts`` on a cluster: one pipeline per node (with its
    own durability wait), redirections followed as in ``ClusterBatcher``."""
    out: list[Result | Exception] = [StoreUnavailable("not executed") for _ in calls]
    todo = list(range(len(calls)))
    routed: dict[int, tuple[str, bool]] = {}  # call -> (address, asking) after a redirect
    for _ in range(_AGAIN_TRIES):
        groups: dict[tuple[str, bool], list[int]] = {}
        for i in todo:
            where = routed.get(i) or (router.address_of(calls[i][1][0]), False)
            groups.setdefault(where, []).append(i)
        seen = time.monotonic()

        async def run(where: tuple[str, bool], idx: list[int]) -> None:
            client = router.client_at(where[0])
            try:
                replies = await execute_scripts(
                    client, durability, [calls[i] for i in idx], asking=[where[1]] * len(idx)
                )
            except StoreUnavailable as exc:
                replies = [exc] * len(idx)
            for i, reply in zip(idx, replies, strict=True):
                out[i] = reply

        async with anyio.create_task_group() as tg:
            for where, idx in groups.items():
                tg.start_soon(run, where, idx)
        again: list[int] = []
        pause = refresh = False
        for i in todo:
            reply = out[i]
            if not isinstance(reply, BaseException):
                continue
            how, address = _redirect(reply)
            if how == "fail":
                refresh = refresh or isinstance(reply, StoreUnavailable)
                continue
            again.append(i)
            if address:
                routed[i] = (address, how == "ask")
            else:
                routed.pop(i, None)
            refresh = refresh or how != "ask"
            pause = pause or how == "again"
        if refresh:
            await router.refresh(since=seen)
        if not again:
            break
        if pause:
            await anyio.sleep(_RETRY_PAUSE_S)
        todo = again
    return out


@dataclass(frozen=True, slots=True)
class Read:
    """One command for ``run_by_node``: a redis-py pipeline method called
    with ``key`` and the rest of its arguments."""

    method: str
    key: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None

    def queue(self, pipe: Any) -> None:
        getattr(pipe, self.method)(self.key, *self.args, **(self.kwargs or {}))


async def run_by_node(router: ClusterRouter, calls: Sequence[Read]) -> list[Any]:
    """Run the commands grouped into one pipeline per node, and return the
    replies in order. The claim loop reads every partition this way each
    pass: unlike a ``RedisCluster`` pipeline, a slot being migrated costs
    only its own commands a redirection (ASKING goes on the same
    connection as the command), not the whole pass."""
    out: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    routed: dict[int, tuple[str, bool]] = {}
    for _ in range(MAX_REDIRECTS):
        groups: dict[tuple[str, bool], list[int]] = {}
        for i in todo:
            where = routed.get(i) or (router.address_of(calls[i].key), False)
            groups.setdefault(where, []).append(i)
        seen = time.monotonic()

        async def run(where: tuple[str, bool], idx: list[int]) -> None:
            pipe = router.client_at(where[0]).pipeline(transaction=False)
            for i in idx:
                if where[1]:
                    pipe.execute_command("ASKING")
                calls[i].queue(pipe)
            try:
                replies = await guard(pipe.execute(raise_on_error=False))
            except StoreUnavailable as exc:
                replies = [exc] * (len(idx) * (2 if where[1] else 1))
            if where[1]:
                replies = replies[1::2]
            for i, reply in zip(idx, replies, strict=True):
                out[i] = reply

        async with anyio.create_task_group() as tg:
            for where, idx in groups.items():
                tg.start_soon(run, where, idx)
        again: list[int] = []
        refresh = False
        for i in todo:
            reply = out[i]
            if not isinstance(reply, BaseException):
                continue
            how, address = _redirect(reply)
            if how in ("moved", "ask"):
                again.append(i)
                routed[i] = (str(address), how == "ask")
            refresh = refresh or how != "ask"
        if refresh:
            await router.refresh(since=seen)
        if not again:
            break
        todo = again
    for reply in out:
        if isinstance(reply, BaseException):
            if isinstance(reply, StoreUnavailable):
                raise reply
            raise StoreUnavailable(f"redis unavailable: {type(reply).__name__}") from reply
    return out
