"""Per-profile request pacing: a rate limit and a concurrency cap.

Token endpoints publish limits (Workato 10 req/s, Zoho 10 per 10 min,
SoundCloud 30/h) and throttle whole clients that exceed them. With a
``ClusterRate`` (a running worker always has one) the rate holds across
every process: one GCRA step in Redis per request (``worker.clusterrate``),
asked by one waiter per profile and process at a time, so a queue of
waiters costs one Redis call per slot, not one per waiter. Without it (unit
tests, tools) a local token bucket paces this process alone. The
concurrency cap is per process. Waiting happens before the spend, so a
paced refresh never holds an open spend intent while it queues (the spend
renews the lease if it is short). A wait longer than ``max_wait_s`` raises
``RateLimited``: the claim goes back, due when the limiter has room.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from worker.clusterrate import ClusterRate
from worker.profile import Profile

__all__ = ["ProfileLimits", "RateLimited", "TokenBucket"]


class RateLimited(Exception):
    """The profile's limiter has no room within the longest wait."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"rate limited for {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


class TokenBucket:
    """``rate`` requests per second with bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = anyio.Lock()  # waiters are served in arrival order

    async def take(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await anyio.sleep((1 - self._tokens) / self.rate)


class ProfileLimits:
    def __init__(self, cluster: ClusterRate | None = None, *, max_wait_s: float = 10.0) -> None:
        self.cluster = cluster
        self.max_wait_s = max_wait_s
        self._buckets: dict[str, tuple[float, TokenBucket]] = {}
        self._limiters: dict[str, tuple[int, anyio.CapacityLimiter]] = {}
        self._askers: dict[str, anyio.Lock] = {}

    async def _cluster_slot(self, cluster: ClusterRate, profile: Profile) -> None:
        """Wait for the shared limiter to count this request. Waiters of one
        profile queue on a local lock (arrival order); only the head asks."""
        lock = self._askers.get(profile.id)
        if lock is None:
            lock = self._askers[profile.id] = anyio.Lock()
        deadline = time.monotonic() + self.max_wait_s
        with anyio.move_on_after(self.max_wait_s) as queued:
            await lock.acquire()
        if queued.cancelled_caught:
            raise RateLimited(int(1000 / profile.rate_limit_per_s))
        try:
            while True:
                wait_ms = await cluster.ask(
                    profile.id, profile.rate_limit_per_s, profile.effective_burst
                )
                if wait_ms <= 0:
                    return
                if wait_ms / 1000 > deadline - time.monotonic():
                    raise RateLimited(wait_ms)
                await anyio.sleep(wait_ms / 1000)
        finally:
            lock.release()

    def _bucket(self, profile: Profile) -> TokenBucket | None:
        rate = profile.rate_limit_per_s
        if rate <= 0:
            return None
        known = self._buckets.get(profile.id)
        if known is None or known[0] != rate:  # the profile was updated
            known = (rate, TokenBucket(rate, profile.effective_burst))
            self._buckets[profile.id] = known
        return known[1]

    def _limiter(self, profile: Profile) -> anyio.CapacityLimiter | None:
        cap = profile.max_concurrency
        if cap <= 0:
            return None
        known = self._limiters.get(profile.id)
        if known is None or known[0] != cap:
            known = (cap, anyio.CapacityLimiter(cap))
            self._limiters[profile.id] = known
        return known[1]

    @staticmethod
    def unlimited(profile: Profile) -> bool:
        """Nothing to wait for (most profiles): callers skip the machinery."""
        return profile.rate_limit_per_s <= 0 and profile.max_concurrency <= 0

    async def acquire(self, profile: Profile) -> Callable[[], None]:
        """Wait for the profile's concurrency slot and rate token; returns
        the release function. Cancellation while waiting, or
        ``RateLimited``, leaves nothing held."""
        limiter = self._limiter(profile)
        cluster = self.cluster if profile.rate_limit_per_s > 0 else None
        bucket = self._bucket(profile) if cluster is None else None
        if limiter is not None:
            await limiter.acquire()
        try:
            if cluster is not None:
                await self._cluster_slot(cluster, profile)
            elif bucket is not None:
                await bucket.take()
        except BaseException:
            if limiter is not None:
                limiter.release()
            raise
        return limiter.release if limiter is not None else _nothing


def _nothing() -> None:
    return None
