"""Group commit: concurrent spend/commit calls share round trips and fsync waits.

Every refresh makes two durable script calls (spend, commit). Issued one by
one, each pays a round trip, redis-py's pipeline machinery and its own
WAITAOF. Issued together, N calls go out as one write - EVALSHA x N, then
one WAITAOF (and/or WAIT), which acknowledges every write the connection
made before it - and cost about what one call did.

Two kinds of caller wait for different things:

* a **spend** must be durable before its request leaves (a restarted
  server that forgot it would let another worker send the same refresh
  token), so it waits for the acknowledgement;
* a **commit** only needs its result: the new tokens are in Redis and the
  lock is released. Its durability is this module's job from there on -
  the batch keeps the call, waits for the acknowledgement, and re-applies
  the commit if the server went away before acknowledging (a restarted
  server may have lost it; re-running it is safe, since the script refuses
  a commit that already landed). Under ``appendfsync everysec`` the
  acknowledgement takes one to two ticks of the server's ``hz`` (100-200 ms
  at the default hz 10), so keeping it off the refresh's path halves the
  time each refresh holds a concurrency slot.

Each script stays its own atomic unit with its own result; only the round
trip and the durability wait are shared. A batch owns one pooled
connection for its whole life, since WAITAOF counts that connection's
writes; up to ``connections`` batches are out at once, and calls queue for
the next free one, so batches grow exactly when load does and a lone call
goes out at once. Commands are packed by hiredis and replies read straight
off the connection: redis-py's pipeline machinery was a fifth of the
worker's CPU.

The module is asyncio-specific (futures, not anyio events), as redis-py's
asyncio client already is; callers still wait inside anyio shields.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import hiredis
from anyio.abc import TaskGroup, TaskStatus
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from worker.cluster import router_of
from worker.errors import StoreUnavailable
from worker.logs import get_logger
from worker.redisio import REDIS_UNAVAILABLE, guard, pack_evalsha

__all__ = ["ScriptBatcher", "execute_scripts"]

log = get_logger("refreshd.batcher")

Result = tuple[list[Any], bool]


class Resubmit(Protocol):
    async def __call__(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], *,
        wait_durable: bool = True,
    ) -> Result: ...  # fmt: skip


@dataclass(eq=False, slots=True)
class _Call:
    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Any]
    wait_durable: bool
    future: asyncio.Future[Result]
    asking: bool = False  # a cluster's ASK redirection: ASKING goes first

    def resolve(self, outcome: Result | BaseException) -> None:
        if self.future.done():
            return
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


class ScriptBatcher:
    def __init__(
        self,
        store: Any,
        *,
        connections: int = 16,
        max_batch: int = 256,
        ack_attempts: int = 3,
        reapply_patience_s: float = math.inf,
        on_not_durable: Callable[[str, int], None] | None = None,
        on_unconfirmed: Callable[[list[Sequence[Any]]], None] | None = None,
        resubmit: Resubmit | None = None,
    ) -> None:
        self._store = store  # worker.store.Store (not imported: it imports us)
        #: where re-applied commits go: this batcher, or on a cluster the
        #: router (after a failover the commit belongs to another node)
        self._resubmit: Resubmit = resubmit or self.call
        self._connections = connections
        self._max_batch = max_batch
        self._ack_attempts = ack_attempts
        self._reapply_patience_s = reapply_patience_s
        #: told (reason, count) when commits could not be confirmed durable
        self.on_not_durable = on_not_durable
        #: given the arguments of commits still waiting to be re-applied when
        #: the batcher stops (or gives up): they may hold the only copy of new
        #: tokens, and the worker keeps them in its spool (``worker.spool``)
        self.on_unconfirmed = on_unconfirmed
        self._queue: deque[_Call] = deque()
        self._in_flight: set[_Call] = set()
        self._ready = asyncio.Event()
        self._running = False
        self._reapplying = 0
        self._idle = asyncio.Event()  # for flush(): nothing queued or in flight

    @property
    def running(self) -> bool:
        return self._running

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Dispatch batches until cancelled (a service of the worker's task group)."""
        slots = anyio.Semaphore(self._connections)
        try:
            async with anyio.create_task_group() as tg:
                self._running = True
                task_status.started()
                while True:
                    if not self._queue:
                        self._ready.clear()
                        await self._ready.wait()
                    # wait for a free connection first: meanwhile the batch grows
                    await slots.acquire()
                    take = min(len(self._queue), self._max_batch)
                    batch = [self._queue.popleft() for _ in range(take)]
                    self._in_flight.update(batch)
                    tg.start_soon(self._run_batch, batch, slots, tg)
        finally:
            self._running = False
            # calls queued or cut off mid-flight by shutdown: their callers
            # must not wait forever (the outcome of a cut-off call is unknown,
            # exactly as for a lost reply)
            stopping = StoreUnavailable("worker stopping")
            for item in [*self._queue, *self._in_flight]:
                item.resolve(stopping)
            self._queue.clear()
            self._in_flight.clear()

    async def flush(self, timeout_s: float) -> bool:
        """Wait (up to ``timeout_s``) until every call has been answered and
        every commit acknowledged or re-applied: a stopping worker calls this
        before it cancels the batcher. Returns whether all finished."""
        with anyio.move_on_after(timeout_s):
            while self._busy():
                self._idle.clear()
                await self._idle.wait()
            return True
        log.warning("batcher.flush_timeout", queued=len(self._queue), batches=len(self._in_flight))
        return False

    def _busy(self) -> bool:
        return bool(self._queue or self._in_flight or self._reapplying)

    def _note_progress(self) -> None:
        if not self._busy():
            self._idle.set()

    async def call(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        wait_durable: bool = True,
        asking: bool = False,
    ) -> Result:
        """Run ``script`` in the next batch; returns (result, durable). With
        ``wait_durable=False`` it returns once the script has run and the
        batcher owns its durability (``durable`` is then True: see the module
        docstring). Once queued, the call runs, and its caller must learn the
        outcome (a spend recorded unseen would strand an intent): callers
        wait inside a cancel shield - the refresher holds one from the spend
        to the commit - rather than each call paying for its own. ``asking``
        sends ASKING just before the script (a cluster slot being migrated
        here: ``worker.clusterbatch``)."""
        if not self._running:
            raise StoreUnavailable("worker stopping")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append(_Call(script, keys, args, wait_durable, future, asking))
        self._ready.set()
        return await future

    # ------------------------------------------------------------ batches

    async def _run_batch(self, batch: list[_Call], slots: anyio.Semaphore, tg: TaskGroup) -> None:
        reapply: list[_Call] = []
        try:
            reapply = await self._execute(batch)
        except Exception as exc:  # a bug here must not strand callers
            log.exception("batch.crashed")
            for item in batch:
                item.resolve(StoreUnavailable(f"batch failed: {type(exc).__name__}"))
        except BaseException:  # cut off by shutdown: outcome unknown, say so
            for item in batch:
                item.resolve(StoreUnavailable("worker stopping"))
            raise
        finally:
            if reapply:
                self._reapplying += 1
                tg.start_soon(self._reapply, reapply)
            self._in_flight.difference_update(batch)
            slots.release()
            self._note_progress()

    async def _execute(self, batch: list[_Call]) -> list[_Call]:
        """Send the batch on one connection and resolve every call. Returns
        the commits that ran but whose acknowledgement never came: the
        server may have lost them, so they must be run again."""
        store = self._store
        durability = store.durability
        acks: list[tuple[Any, ...]] = []
        if durability.fsync:
            acks.append(("WAITAOF", 1, 0, durability.timeout_ms))
        if durability.replicas:
            acks.append(("WAIT", durability.replicas, durability.timeout_ms))
        payload = []
        for c in batch:
            if c.asking:
                payload.append(hiredis.pack_command(("ASKING",)))
            payload.append(pack_evalsha(c.script.sha, c.keys, c.args))
        payload += [hiredis.pack_command(a) for a in acks]
        pool = store.client.connection_pool
        # the socket timeout bounds the whole exchange; the acks bound themselves
        limit = (pool.connection_kwargs.get("socket_timeout") or 10.0) + 2 * (
            durability.timeout_ms / 1000
        )
        ran: list[tuple[_Call, list[Any]]] = []  # ran; some wait for the ack
        missing_script: list[_Call] = []
        try:
            conn = await guard(pool.get_connection())
        except StoreUnavailable as exc:
            for item in batch:
                item.resolve(exc)
            return []
        try:
            with anyio.fail_after(limit):
                await guard(conn.send_packed_command(payload))
                for item in batch:
                    if item.asking:  # its OK; the script's own reply follows regardless
                        with contextlib.suppress(ResponseError):
                            await guard(conn.read_response(timeout=math.inf))
                    try:
                        reply = await _reply(conn)
                    except NoScriptError:
                        missing_script.append(item)  # it did not run
                        continue
                    except ResponseError as exc:
                        item.resolve(_refused(exc))
                        continue
                    if not acks or not item.wait_durable:
                        item.resolve((reply, True))
                    ran.append((item, reply))
                durable = await self._read_acks(conn, acks, durability)
        except (StoreUnavailable, TimeoutError) as exc:
            lost = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable("redis timeout")
            await conn.disconnect(nowait=True)
            # Unread replies and unacknowledged spends: unknown to their
            # callers. Commits already answered are run again instead.
            for item in batch:
                if item not in missing_script:
                    item.resolve(lost)
            self._requeue(missing_script)
            return [item for item, _ in ran if not item.wait_durable] if acks else []
        finally:
            await pool.release(conn)
        for item, reply in ran:
            item.resolve((reply, durable))
        if not durable:
            commits = sum(1 for item, _ in ran if not item.wait_durable)
            if commits and self.on_not_durable is not None:
                self.on_not_durable("timeout", commits)
            log.warning("commit.not_durable", commits=commits, spends=len(ran) - commits)
        if missing_script:
            await self._reload(missing_script)
        return []

    async def _read_acks(self, conn: Any, acks: list[tuple[Any, ...]], durability: Any) -> bool:
        """Read the acknowledgements; a timed-out WAITAOF (slow disk) is asked
        again on the same connection, since it counts this connection's writes."""
        if not acks:
            return True
        replies = [await guard(conn.read_response(timeout=math.inf)) for _ in acks]
        for _ in range(self._ack_attempts - 1):
            if _acknowledged(replies, durability):
                return True
            await guard(conn.send_packed_command([hiredis.pack_command(a) for a in acks]))
            replies = [await guard(conn.read_response(timeout=math.inf)) for _ in acks]
        return _acknowledged(replies, durability)

    def _requeue(self, calls: list[_Call]) -> None:
        """Calls that did not run go first in the next batch."""
        for item in reversed(calls):
            if not item.future.done():
                self._queue.appendleft(item)
        if calls:
            self._ready.set()

    async def _reload(self, calls: list[_Call]) -> None:
        """NOSCRIPT: the server restarted and lost the script cache. The
        calls did not run; load their scripts and send them again."""
        try:
            for script in {id(c.script): c.script for c in calls}.values():
                script.sha = await guard(self._store.client.script_load(script.script))
        except StoreUnavailable as exc:
            for item in calls:
                item.resolve(exc)
            return
        self._requeue(calls)

    async def _reapply(self, commits: list[_Call]) -> None:
        """Run again commits whose acknowledgement was lost with the
        connection. One that had landed is refused as ``stale`` by the
        script; one the server lost lands now."""
        try:
            await self._reapply_until_done(commits)
        finally:
            self._reapplying -= 1
            self._note_progress()

    async def _reapply_until_done(self, commits: list[_Call]) -> None:
        """For as long as the batcher runs (by default): the server may have
        lost these commits, and they may carry the only copy of new tokens.
        Whatever is still unconfirmed when it stops goes to
        ``on_unconfirmed``."""
        pending = commits
        delay = 0.05
        try:
            with anyio.move_on_after(self._reapply_patience_s):
                while pending:
                    failed: list[_Call] = []
                    for item in pending:
                        try:
                            await self._resubmit(
                                item.script, item.keys, item.args, wait_durable=True
                            )
                        except StoreUnavailable:
                            failed.append(item)
                        except Exception:  # a script error: nothing more to try
                            log.exception("commit.reapply_failed")
                    pending = failed
                    if not failed:
                        log.info("commit.reapplied", commits=len(commits))
                        return
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            if self.on_not_durable is not None:
                self.on_not_durable("unavailable", len(pending))
            log.error("commit.not_durable", commits=len(pending), reason="redis unavailable")
        finally:
            if pending and self.on_unconfirmed is not None:
                self.on_unconfirmed([item.args for item in pending])


async def _reply(conn: Any) -> Any:
    """One script's reply. An error reply is that call's alone (the batch
    reads on); only a failing connection is ``StoreUnavailable``."""
    try:
        return await conn.read_response(timeout=math.inf)
    except ResponseError:
        raise
    except REDIS_UNAVAILABLE as exc:
        raise StoreUnavailable(f"redis unavailable: {type(exc).__name__}") from exc


def _refused(exc: ResponseError) -> Exception:
    """An error reply meaning "not now" (TRYAGAIN, CLUSTERDOWN, READONLY:
    the script did not run) reaches its caller as ``StoreUnavailable`` with
    the reply as its cause (``worker.clusterbatch`` sends those again);
    any other error reply (MOVED, ASK, a script error) as itself."""
    if isinstance(exc, REDIS_UNAVAILABLE):
        refused = StoreUnavailable(f"redis unavailable: {type(exc).__name__}")
        refused.__cause__ = exc
        return refused
    return exc


def _acknowledged(replies: list[Any], durability: Any) -> bool:
    """WAITAOF answers [local fsyncs, replica fsyncs]; WAIT answers a count."""
    if any(isinstance(r, Exception) for r in replies):
        return False
    i = 0
    if durability.fsync:
        if int(replies[i][0]) < 1:
            return False
        i += 1
    return not durability.replicas or int(replies[i]) >= durability.replicas


Call = tuple[AsyncScript, Sequence[str], Sequence[Any]]


async def execute_scripts(
    client: Any, durability: Any, calls: Sequence[Call], *, asking: Sequence[bool] = ()
) -> list[Result | Exception]:
    """One pipeline, outside a running worker (CLI, tools): every script,
    then the durability waits once. Returns (result, durable) or the error,
    per call. NOSCRIPT (a restarted server) reloads the script and runs just
    those calls again: they did not run. On a cluster the calls are split
    by node, each node's share one pipeline (``worker.clusterbatch``);
    ``asking[i]`` sends ASKING before call ``i`` (a slot being migrated)."""
    router = router_of(client)
    if router is not None:
        # imported here: worker.clusterbatch builds on this module
        from worker.clusterbatch import execute_clustered

        return await execute_clustered(router, durability, calls)
    out: list[Result | Exception] = [StoreUnavailable("not executed") for _ in calls]
    todo = list(range(len(calls)))
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        for i in todo:
            script, keys, args = calls[i]
            if asking and asking[i]:
                pipe.execute_command("ASKING")
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        if durability.fsync:
            pipe.execute_command("WAITAOF", 1, 0, durability.timeout_ms)
        if durability.replicas:
            pipe.execute_command("WAIT", durability.replicas, durability.timeout_ms)
        replies = await guard(pipe.execute(raise_on_error=False))
        asked = sum(1 for i in todo if asking and asking[i])
        durable = _acknowledged(replies[len(todo) + asked :], durability)
        script_replies = iter(replies[: len(todo) + asked])
        again: list[int] = []
        for i in todo:
            if asking and asking[i]:
                next(script_replies)  # ASKING's OK
            res = next(script_replies)
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
