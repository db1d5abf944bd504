"""The worker loop: claim due credentials, feed them to refresh tasks, drain.

Shape::

    claim loop ──► queue (at most the free slots) ──► N consumers ──► Refresher
        ▲ sleeps until the earliest due time, a wake-up message,
        │ a local commit that scheduled something sooner, or free capacity

The claim loop only claims what it can start soon (free consumers), so
leases are not burnt in a queue. On stop it claims nothing more; consumers
finish what they hold; claimed-but-unstarted credentials are handed back
(due now) so another worker takes them at once. Commits still waiting for
Redis at the drain deadline stop retrying: they are in the local spool,
which the next start replays before it claims (``worker.spool``).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus

from worker.batcher import ScriptBatcher
from worker.cluster import router_of
from worker.clusterbatch import ClusterBatcher
from worker.errors import StoreUnavailable
from worker.keys import Partition
from worker.logs import get_logger
from worker.metrics import Metrics
from worker.models import Claimed
from worker.redisio import REDIS_UNAVAILABLE
from worker.refresher import Refresher
from worker.store import Store

__all__ = ["Worker", "WorkerConfig"]

log = get_logger("refreshd.worker")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    worker_id: str
    concurrency: int = 256
    claim_batch: int = 100
    lease_ms: int = 30_000
    idle_wakeup_s: float = 5.0
    drain_grace_s: float = 20.0
    gauge_interval_s: float = 1.0


class Worker:
    def __init__(
        self, config: WorkerConfig, *, store: Store, refresher: Refresher, metrics: Metrics
    ) -> None:
        self.config = config
        self.store = store
        self.refresher = refresher
        self.metrics = metrics
        self.draining = False
        self.stopped = False
        self._wake = anyio.Event()
        self._sleep_until_ms = 0
        self._next_due_ms: int | None = None
        self._waiting_for_capacity = False
        self._due_but_held = False
        # claim again once a quarter of a batch is free, not per finished refresh
        self._refill_at = max(1, min(config.claim_batch, config.concurrency) // 4)
        self._busy = 0  # claimed and not finished (buffered + running)
        self._token_base = f"{config.worker_id}:{uuid.uuid4().hex[:8]}"
        self._seq = 0
        refresher.on_scheduled = self.note_scheduled

    # --------------------------------------------------------- signals

    def wake(self) -> None:
        self._wake.set()

    def note_scheduled(self, due_ms: int) -> None:
        """A commit scheduled a refresh; wake up if it is sooner than planned."""
        if due_ms < self._sleep_until_ms:
            self._wake.set()

    def stop(self) -> None:
        """Begin draining: claim nothing more, hand back what has not started."""
        if not self.draining:
            log.info("worker.draining", in_flight=self._busy)
        self.draining = True
        self.refresher.begin_drain()
        self.metrics.draining.set(1)
        self._wake.set()

    # ------------------------------------------------------------ run

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        # An asyncio queue, not an anyio memory stream: with hundreds of
        # consumers waiting, the stream's hand-off (a fresh Event per wait)
        # cost three times as much CPU per credential. ``None`` tells a
        # consumer that the claim loop has stopped.
        queue: asyncio.Queue[Claimed | None] = asyncio.Queue()
        async with anyio.create_task_group() as tg:
            # at most half the pool: claims, gauges and pub/sub need the rest
            pool = getattr(self.store.client, "connection_pool", None)
            pool_size = getattr(pool, "max_connections", 32)
            router = router_of(self.store.client)
            batcher: ScriptBatcher | ClusterBatcher
            if router is not None:  # one batcher per primary, a pool each
                batcher = ClusterBatcher(
                    self.store,
                    router,
                    connections=max(2, min(16, router.max_connections // 2)),
                    on_not_durable=self._not_durable,
                    on_unconfirmed=self.refresher.keep_unconfirmed,
                )
            else:
                batcher = ScriptBatcher(
                    self.store,
                    connections=max(2, min(16, pool_size // 2)),
                    on_not_durable=self._not_durable,
                    on_unconfirmed=self.refresher.keep_unconfirmed,
                )
            await tg.start(batcher.run)
            self.store.batcher = batcher
            tg.start_soon(self._gauges)
            tg.start_soon(self._listen_for_wakeups)
            async with anyio.create_task_group() as consumers:
                for _ in range(cfg.concurrency):
                    consumers.start_soon(self._consume, queue)
                task_status.started()
                try:
                    await self._claim_loop(queue)
                finally:
                    for _ in range(cfg.concurrency):
                        queue.put_nowait(None)
                # Each consumer ends once it has finished (or handed back)
                # what it holds. Past the grace period, cancel.
                tg.start_soon(self._drain_deadline, consumers.cancel_scope)
            # the last commits' acknowledgements (one fsync tick, usually)
            await batcher.flush(self.config.drain_grace_s)
            self.store.batcher = None
            tg.cancel_scope.cancel()
        self.stopped = True
        log.info("worker.stopped")

    def _not_durable(self, reason: str, commits: int) -> None:
        self.metrics.commit_failures.labels("not_durable").inc(commits)

    async def _drain_deadline(self, scope: anyio.CancelScope) -> None:
        await anyio.sleep(self.config.drain_grace_s)
        log.warning("worker.drain_timeout", still_running=self._busy)
        # commits still waiting for Redis end here: they are in the spool
        self.refresher.give_up_pending()
        scope.cancel()

    def _next_token(self) -> str:
        self._seq += 1
        return f"{self._token_base}:{self._seq}"

    async def _claim_loop(self, queue: asyncio.Queue[Claimed | None]) -> None:
        cfg = self.config
        partitions = self.store.keys.all_partitions()
        start = random.randrange(len(partitions))
        order = partitions[start:] + partitions[:start]
        failures = 0
        while not self.draining:
            self._wake = anyio.Event()
            if self.refresher.pending_commits:
                # Commits Redis could not take land first: a claim before
                # them could read their expired spend intents as unknown
                # outcomes (a quarantine, under strict rotation).
                if await self.store.ping():
                    self.metrics.redis_up.set(1)
                    self.refresher.nudge_pending()
                await self._sleep(0.25)
                continue
            free = cfg.concurrency - self._busy
            claimed = 0
            try:
                ready: list[Partition] = []
                if free > 0:
                    earliest = await self.store.partition_earliest()
                    now_ms = int(time.time() * 1000)
                    ready = [p for p in order if earliest.get(p.index, now_ms + 1) <= now_ms]
                    later = [due for due in earliest.values() if due > now_ms]
                    self._next_due_ms = min(later) if later else None
                requests = self._split(ready, free)
                results = await self.store.claim_many(requests, lease_ms=cfg.lease_ms)
                for contended, items in results:
                    if contended:
                        self.metrics.lock_contention.inc(contended)
                    # consumers are idle (we claim at most `free`): no
                    # event-loop turn per item, which capped dispatch at one
                    # credential per loop iteration
                    for item in items:
                        self._busy += 1
                        queue.put_nowait(item)
                    claimed += len(items)
                    free -= len(items)
                order = order[1:] + order[:1]  # fairness across partitions
                failures = 0
                self.metrics.redis_up.set(1)
            except StoreUnavailable as exc:
                failures += 1
                self.metrics.redis_up.set(0)
                delay = min(0.1 * 2**failures, 5.0) * random.uniform(0.5, 1.0)
                log.warning("claim.redis_unavailable", error=str(exc), retry_in_s=round(delay, 2))
                await self._sleep(delay)
                continue
            if claimed:
                self.metrics.claimed.inc(claimed)
            self._due_but_held = bool(ready) and not claimed
            if free <= 0:
                self._waiting_for_capacity = True
                try:
                    await self._sleep(cfg.idle_wakeup_s)  # a finishing consumer wakes us
                finally:
                    self._waiting_for_capacity = False
            elif not claimed:
                await self._sleep_until_due()

    def _split(self, ready: list[Partition], free: int) -> list[tuple[Partition, int, str]]:
        """Share the free slots among the partitions with something due,
        up to a claim batch each: all of them go in one round trip."""
        if free <= 0 or not ready or self.draining:
            return []
        share = max(1, -(-free // len(ready)))  # ceil
        requests = []
        for part in ready:
            if free <= 0:
                break
            limit = min(self.config.claim_batch, share, free)
            requests.append((part, limit, self._next_token()))
            free -= limit
        return requests

    async def _sleep_until_due(self) -> None:
        if self._due_but_held:
            # due credentials were held by other workers: their leases moved
            # them, so read again rather than sleep to the safety net
            try:
                earliest = await self.store.earliest_due()
            except StoreUnavailable:
                earliest = None
        else:
            earliest = self._next_due_ms  # read by the pass that found nothing due
        now_ms = int(time.time() * 1000)
        delay = self.config.idle_wakeup_s
        if earliest is not None:
            delay = min(max((earliest - now_ms) / 1000, 0.0), delay)
        if delay <= 0:
            # due now but nothing claimed: held by others; let their leases run
            delay = 0.01
        await self._sleep(delay)

    async def _sleep(self, delay_s: float) -> None:
        self._sleep_until_ms = int(time.time() * 1000 + delay_s * 1000)
        with anyio.move_on_after(delay_s):
            await self._wake.wait()
        self._sleep_until_ms = 0

    async def _consume(self, queue: asyncio.Queue[Claimed | None]) -> None:
        # raised by the refresher around each spend-to-commit stretch
        with anyio.CancelScope() as shield:
            await self._consume_in(queue, shield)

    async def _consume_in(
        self, queue: asyncio.Queue[Claimed | None], shield: anyio.CancelScope
    ) -> None:
        while (item := await queue.get()) is not None:
            try:
                if self.draining:
                    await self._hand_back(item)
                else:
                    await self.refresher.refresh(item, shield)
            except StoreUnavailable:
                log.warning("refresh.redis_unavailable", credential_id=item.id)
            except Exception:
                log.exception("refresh.crashed", credential_id=item.id)
            finally:
                self._busy -= 1
                if (
                    self._waiting_for_capacity
                    and self.config.concurrency - self._busy >= self._refill_at
                ):
                    self._wake.set()

    async def _hand_back(self, item: Claimed) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await self.store.commit(item, "release", next_due="now", fields={}, event="")

    async def _listen_for_wakeups(self) -> None:
        """A credential added or moved earlier publishes on the wake channel;
        every worker wakes and the claim script decides who gets it."""
        channel = self.store.keys.wake
        router = self.store.router
        while True:
            try:
                # on a cluster, a plain connection to the node the slot map
                # names for the channel (PUBLISH reaches every node), read
                # again after an outage: that node may be gone
                client = self.store.client if router is None else router.client_for(channel)
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=30.0
                        )
                        if message is not None:
                            self._wake.set()
            except (StoreUnavailable, *REDIS_UNAVAILABLE):
                if router is not None:
                    await router.refresh()
                await anyio.sleep(1.0)

    async def _gauges(self) -> None:
        while True:
            self.metrics.heartbeat.set(time.time())
            try:
                now_ms = int(time.time() * 1000)
                due, scheduled, earliest = await self.store.schedule_stats(now_ms)
                self.metrics.backlog.set(due)
                oldest_s = max(now_ms - earliest, 0) / 1000 if earliest is not None else 0.0
                self.metrics.backlog_oldest_age.set(oldest_s)
                self.metrics.scheduled.set(scheduled)
                self.metrics.redis_up.set(1)
            except StoreUnavailable:
                self.metrics.redis_up.set(0)
            await anyio.sleep(self.config.gauge_interval_s)
