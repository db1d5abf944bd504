"""The connection that fills the client cache and hears what invalidates it (RESP3 CLIENT TRACKING).

Why this shape (README "Consuming tokens"):

- **One RESP3 connection, default (per-key) tracking, no redirect.** Redis
  remembers the keys this connection read and pushes an ``invalidate``
  message on the same connection when one of them changes. redis-py 8
  speaks RESP3 already, so no second (subscriber) connection, no
  ``CLIENT ID``/``REDIRECT`` (whose id could name another client on
  another server after a Sentinel failover) and no pub/sub permission.
  Replies and pushes share one ordered stream: an invalidation for a
  write made after a read always arrives after that read's reply. BCAST
  would instead send every consumer a message per write to any credential
  (claims, spends and commits: several per refresh).
- **The reads are pipelined**: a request is written and its reply slot
  queued in one synchronous step; a single reader task takes replies in
  order and handles pushes in between.
- **Never serve what nothing protects.** The cache serves only while the
  connection is up, a PING sent at most ``proof_s`` ago has been answered
  (every invalidation Redis sent before that PING has then been handled:
  a silently dead socket stops the cache within ``proof_s``), and no
  unread byte is waiting on the socket (a push that has arrived but not
  yet been handled). Any error, a dead connection, an unanswered PING or
  a Sentinel failover flushes the whole cache; it serves again once a new
  connection has tracking on.
- A Redis user that may not run ``CLIENT TRACKING`` (an ACL from before
  the cache) leaves the cache off with one warning; reads go to Redis.
"""

from __future__ import annotations

import math
import socket
import time
from collections import deque
from typing import Any

import anyio
import redis.asyncio as aioredis
from anyio.abc import TaskStatus
from redis.exceptions import RedisError, ResponseError

from worker.client.cache import TokenCache
from worker.logs import get_logger
from worker.redisio import REDIS_UNAVAILABLE, pack_command

__all__ = ["LinkDown", "TrackingLink"]

log = get_logger("refreshd.client")

_PUSHED = object()  # what the invalidation handler returns to the read loop


_PING = pack_command("PING")


class LinkDown(Exception):
    """The link cannot carry this read (down, or lost while it waited):
    the caller reads through the ordinary path instead."""


class _Dead(Exception):
    """The link must be rebuilt: PING unanswered, out of step, failover."""


class _Reply:
    """One request's slot in the pipeline."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def set(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error
        self.done.set()


class TrackingLink:
    """Owns the tracking connection; ``run`` is its task (started in the
    client's task group), ``read`` sends one command through it."""

    def __init__(
        self,
        redis: aioredis.Redis,
        cache: TokenCache,
        *,
        ping_s: float = 0.2,
        proof_s: float = 1.0,
        dead_s: float = 5.0,
        retry_s: float = 1.0,
    ) -> None:
        self._redis = redis
        self.cache = cache
        self._ping_s, self._proof_s, self._dead_s, self._retry_s = ping_s, proof_s, dead_s, retry_s
        self._conn: Any = None  # the live connection while up
        self._peek: socket.socket | None = None
        self._replies: deque[_Reply] = deque()
        self._up = False
        self._proven_at = -math.inf
        #: the server's id for the live connection (tests kill it with CLIENT KILL ID)
        self.client_id: int | None = None
        #: False once the server refused CLIENT TRACKING: the cache stays off
        self.enabled = True

    # ------------------------------------------------------------ serving

    @property
    def up(self) -> bool:
        """True while tracking is on: a read through ``read`` may fill the cache."""
        return self._up

    def can_serve(self) -> bool:
        """True when a cached entry may be returned now (see the module
        docstring): up, proven live within ``proof_s``, nothing unread."""
        if not self._up or time.monotonic() - self._proven_at > self._proof_s:
            return False
        return not self._unread()

    def _unread(self) -> bool:
        """Bytes the read loop has not handled yet: in the stream's buffer
        (received, loop task not yet run) or still in the kernel."""
        if getattr(self._conn._reader, "_buffer", b""):  # asyncio.StreamReader's buffer
            return True
        if self._peek is None:
            return True
        try:
            self._peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True  # data, or end of file: either way not quiet

    async def read(self, packed: bytes) -> Any:
        """Send one packed command and return its reply; ``ResponseError``
        for an error reply, ``LinkDown`` when the link is not up or is lost
        before the reply."""
        if not self._up:
            raise LinkDown("tracking connection down")
        conn = self._conn
        reply = self._send(packed)
        try:
            await conn._writer.drain()
        except OSError as exc:  # closed under us: _close fails the reply too
            raise LinkDown("tracking connection lost") from exc
        await reply.done.wait()
        if reply.error is not None:
            raise reply.error
        return reply.value

    def _send(self, packed: bytes) -> _Reply:
        # the write and the slot together, with no await between: the
        # pipeline's replies come back in the order of this deque
        reply = _Reply()
        self._conn._writer.write(packed)
        self._replies.append(reply)
        return reply

    # ------------------------------------------------------------ the task

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, turn tracking on, serve until something breaks, flush,
        and start again; reports started after the first attempt, so reads
        right after ``connect()`` already use the cache."""
        started = False
        while True:
            try:
                conn = await self._open()
            except ResponseError as exc:  # NOPERM, or a server without tracking
                log.warning("client.cache_off", reason=str(exc)[:200])
                self.enabled = False
                if not started:
                    task_status.started()
                return
            except (RedisError, *REDIS_UNAVAILABLE) as exc:
                log.debug("client.cache_unavailable", error=type(exc).__name__)
                if not started:
                    task_status.started()
                    started = True
                await anyio.sleep(self._retry_s)
                continue
            self._up = True
            if not started:
                task_status.started()
                started = True
            try:
                reason = await self._serve(conn)
            finally:
                await self._close(conn)
            log.info("client.cache_flushed", reason=reason[:200])
            await anyio.sleep(self._retry_s)

    async def _serve(self, conn: Any) -> str:
        """The read loop and the heartbeat, until either fails; returns why."""
        reason = ""

        async def until_broken(name: str) -> None:
            nonlocal reason
            try:
                await (self._heartbeat() if name == "heartbeat" else self._read_loop(conn))
            except (_Dead, RedisError, *REDIS_UNAVAILABLE) as exc:
                reason = reason or f"{name}: {exc or type(exc).__name__}"
            except Exception as exc:  # noqa: BLE001 - a surprise turns the cache off, never a read
                log.warning("client.cache_error", error=type(exc).__name__, where=name)
                reason = reason or f"{name}: {type(exc).__name__}"
            tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(until_broken, "read")
            tg.start_soon(until_broken, "heartbeat")
        return reason

    async def _open(self) -> Any:
        conn = self._redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.connect()
            _require_resp3(conn)
            conn._parser.set_invalidation_push_handler(self._invalidated)
            conn._parser.set_pubsub_push_handler(self._other_push)
            await conn.send_packed_command(pack_command("CLIENT", "ID"), False)
            client_id = int(await conn.read_response())
            await conn.send_packed_command(pack_command("CLIENT", "TRACKING", "ON"), False)
            await conn.read_response()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.disconnect(nowait=True)
            raise
        raw = conn._writer.get_extra_info("socket")
        self._peek = socket.fromfd(raw.fileno(), raw.family, raw.type) if raw else None
        self._conn, self.client_id = conn, client_id
        self._proven_at = time.monotonic()  # nothing tracked yet: nothing to miss
        return conn

    async def _close(self, conn: Any) -> None:
        """Stop serving first, then drop everything the lost tracking protected."""
        self._up = False
        self._proven_at = -math.inf
        self.cache.flush()
        while self._replies:
            self._replies.popleft().set(error=LinkDown("tracking connection lost"))
        if self._peek is not None:
            self._peek.close()
            self._peek = None
        self._conn = self.client_id = None
        with anyio.CancelScope(shield=True):
            await conn.disconnect(nowait=True)

    async def _read_loop(self, conn: Any) -> None:
        while True:
            try:
                value = await conn.read_response(
                    timeout=math.inf, push_request=True, disconnect_on_error=False
                )
            except ResponseError as exc:  # a whole error reply: still in step
                self._deliver(error=exc)
                continue
            if value is _PUSHED:
                continue
            self._deliver(value=value)

    def _deliver(self, value: Any = None, error: BaseException | None = None) -> None:
        if not self._replies:
            raise _Dead("a reply nobody asked for: out of step")
        self._replies.popleft().set(value, error)

    async def _invalidated(self, message: Any) -> object:
        """RESP3 push ``["invalidate", [key, ...]]``; ``None`` for the keys
        (FLUSHALL, FLUSHDB, or the server dropping its tracking table) means
        everything. Called by the parser inside the read loop; must not raise."""
        keys = message[1] if len(message) > 1 else None
        if keys is None:
            self.cache.flush()
        else:
            for key in keys:
                self.cache.invalidate(key.decode() if isinstance(key, bytes) else str(key))
        return _PUSHED

    async def _other_push(self, message: Any) -> object:
        """Any other push (none is asked for): not a reply, so skipped."""
        log.debug("client.cache_push_ignored", kind=str(message[0])[:40] if message else "")
        return _PUSHED

    async def _heartbeat(self) -> None:
        """PING every ``ping_s``; an answer proves every push sent before it
        was handled. Unanswered for ``dead_s``, or the Sentinel primary
        moved: the link is rebuilt."""
        pool = self._redis.connection_pool
        while True:
            await anyio.sleep(self._ping_s)
            sent = time.monotonic()
            reply = self._send(_PING)
            with anyio.move_on_after(self._dead_s):
                await reply.done.wait()
            if not reply.done.is_set():
                raise _Dead(f"PING unanswered for {self._dead_s:g}s")
            if reply.error is not None:
                raise _Dead(f"PING refused: {reply.error}")
            self._proven_at = sent
            primary = getattr(pool, "master_address", None)  # Sentinel pools only
            if primary is not None and tuple(primary) != (self._conn.host, self._conn.port):
                raise _Dead("the Sentinel primary moved")


def _require_resp3(conn: Any) -> None:
    """RESP2 has no push on the same connection (a redis URL with protocol=2)."""
    if str(conn.protocol) != "3":
        raise ResponseError("the connection speaks RESP2: the cache needs RESP3")
