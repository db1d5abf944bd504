"""Group commit: concurrent spend/commit calls share round trips and fsync waits.

Every refresh makes two durable script calls (spend, commit). Issued one by
one, each pays a round trip, redis-py's pipeline machinery and its own
WAITAOF. Issued together, N calls go out as one pipeline - EVALSHA x N,
then one WAITAOF (and/or WAIT), which acknowledges every write the
connection made before it - and cost about what one call did.

Each script stays its own atomic unit with its own result; only the round
trip and the durability wait are shared, and ``durable`` is reported per
batch. A few lanes (flusher tasks) run in the worker's task group: while
one pipeline is out, calls queue for the next, so batches grow exactly when
load does and a lone call goes out at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from worker.errors import StoreUnavailable
from worker.redisio import guard

__all__ = ["ScriptBatcher", "execute_scripts"]


@dataclass(eq=False, slots=True)
class _Call:
    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Any]
    done: anyio.Event = field(default_factory=anyio.Event)
    result: tuple[list[Any], bool] | None = None
    error: BaseException | None = None


class ScriptBatcher:
    def __init__(self, store: Any, *, lanes: int = 4, max_batch: int = 128) -> None:
        self._store = store  # worker.store.Store (not imported: it imports us)
        self._lanes = lanes
        self._max_batch = max_batch
        self._send: MemoryObjectSendStream[_Call] | None = None
        self._waiting: set[_Call] = set()

    @property
    def running(self) -> bool:
        return self._send is not None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The lanes, until cancelled (a service of the worker's task group)."""
        send, receive = anyio.create_memory_object_stream[_Call](self._max_batch * self._lanes)
        try:
            async with send, receive, anyio.create_task_group() as tg:
                for _ in range(self._lanes):
                    tg.start_soon(self._lane, receive.clone())
                self._send = send
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._send = None
            # calls queued or cut off mid-flight by shutdown: their callers
            # must not wait forever (the outcome of a cut-off call is unknown,
            # exactly as for a lost reply)
            for item in self._waiting:
                if not item.done.is_set():
                    item.error = StoreUnavailable("worker stopping")
                    item.done.set()

    async def call(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]
    ) -> tuple[list[Any], bool]:
        """Run ``script`` in the next batch; returns (result, durable). The
        wait is shielded: once queued, the call runs, and its caller must
        learn the outcome (a spend recorded unseen would strand an intent)."""
        assert self._send is not None, "the batcher is not running"
        item = _Call(script, keys, args)
        self._waiting.add(item)
        try:
            with anyio.CancelScope(shield=True):
                await self._send.send(item)
                await item.done.wait()
        finally:
            self._waiting.discard(item)
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    async def _lane(self, receive: MemoryObjectReceiveStream[_Call]) -> None:
        async with receive:
            async for first in receive:
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(receive.receive_nowait())
                    except anyio.WouldBlock:
                        break
                try:
                    results = await execute_scripts(
                        self._store.client,
                        self._store.durability,
                        [(c.script, c.keys, c.args) for c in batch],
                    )
                except StoreUnavailable as exc:
                    results = [exc] * len(batch)
                for item, outcome in zip(batch, results, strict=True):
                    if isinstance(outcome, BaseException):
                        item.error = outcome
                    else:
                        item.result = outcome
                    item.done.set()


Call = tuple[AsyncScript, Sequence[str], Sequence[Any]]


async def execute_scripts(
    client: Any, durability: Any, calls: Sequence[Call]
) -> list[tuple[list[Any], bool] | Exception]:
    """One pipeline: every script, then the durability waits once. Returns
    (result, durable) or the error, per call. NOSCRIPT (a restarted server)
    reloads the script and runs just those calls again: they did not run."""
    out: list[tuple[list[Any], bool] | Exception] = [
        StoreUnavailable("not executed") for _ in calls
    ]
    todo = list(range(len(calls)))
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        for i in todo:
            script, keys, args = calls[i]
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        if durability.fsync:
            pipe.execute_command("WAITAOF", 1, 0, durability.timeout_ms)
        if durability.replicas:
            pipe.execute_command("WAIT", durability.replicas, durability.timeout_ms)
        replies = await guard(pipe.execute(raise_on_error=False))
        acks = replies[len(todo) :]
        durable = not any(isinstance(a, Exception) for a in acks)
        if durable and durability.fsync:
            durable = int(acks.pop(0)[0]) >= 1
        if durable and durability.replicas:
            durable = int(acks.pop(0)) >= durability.replicas
        again: list[int] = []
        for i, res in zip(todo, replies[: len(todo)], strict=True):
            if isinstance(res, NoScriptError) and attempt == 0:
                again.append(i)
            else:
                out[i] = res if isinstance(res, Exception) else (res, durable)
        if not again:
            break
        for script in {id(calls[i][0]): calls[i][0] for i in again}.values():
            script.sha = await guard(client.script_load(script.script))
        todo = again
    return out
