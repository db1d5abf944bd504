"""Per-profile request pacing: a token bucket and a concurrency cap.

Token endpoints publish limits (Workato 10 req/s, Zoho 10 per 10 min,
SoundCloud 30/h) and throttle whole clients that exceed them. Limits are
per worker process: with N replicas, set each profile's rate to its share.
Waiting happens before the spend, so a paced refresh never holds an open
spend intent while it queues (the spend renews the lease if it is short).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from worker.profile import Profile

__all__ = ["ProfileLimits", "TokenBucket"]


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
    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, TokenBucket]] = {}
        self._limiters: dict[str, tuple[int, anyio.CapacityLimiter]] = {}

    def _bucket(self, profile: Profile) -> TokenBucket | None:
        rate = profile.rate_limit_per_s
        if rate <= 0:
            return None
        known = self._buckets.get(profile.id)
        if known is None or known[0] != rate:  # the profile was updated
            known = (rate, TokenBucket(rate))
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
        the release function. Cancellation while waiting leaves nothing held."""
        limiter = self._limiter(profile)
        bucket = self._bucket(profile)
        if limiter is not None:
            await limiter.acquire()
        try:
            if bucket is not None:
                await bucket.take()
        except BaseException:
            if limiter is not None:
                limiter.release()
            raise
        return limiter.release if limiter is not None else _nothing


def _nothing() -> None:
    return None
