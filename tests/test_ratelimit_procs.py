"""A profile's rate limit holds across worker processes: three real
`refreshd run` processes share one GCRA limiter in Redis, and the token
endpoint never sees more than rate + burst requests in any second."""

from __future__ import annotations

import time

import pytest
from aiohttp import web

from tests.harness import all_current, make_settings, seed, wait_for
from tests.test_process import worker_process
from worker.app import open_store
from worker.fakeprovider import FakeProvider

pytestmark = pytest.mark.anyio

RATE, BURST, COUNT = 5, 2, 24


class CountingProvider(FakeProvider):
    """The fake provider, with the arrival time of every request."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.arrivals.append(time.monotonic())
        return await super()._handle(request)


def most_in_one_second(arrivals: list[float]) -> int:
    stamps = sorted(arrivals)
    return max(sum(1 for t in stamps[i:] if t - first < 1.0) for i, first in enumerate(stamps))


async def test_three_processes_stay_within_rate_plus_burst(redis_url: str) -> None:
    settings = make_settings(redis_url)
    profile = {"rate_limit_per_s": RATE, "rate_limit_burst": BURST}
    async with CountingProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, COUNT, profile=profile)
        env = {"REFRESHD_CLAIM_BATCH": "8", "REFRESHD_LOG_LEVEL": "info"}
        async with (
            worker_process(redis_url, **env | {"REFRESHD_WORKER_ID": "a"}),
            worker_process(redis_url, **env | {"REFRESHD_WORKER_ID": "b"}),
            worker_process(redis_url, **env | {"REFRESHD_WORKER_ID": "c"}),
        ):
            await wait_for(
                lambda: all_current(store, provider, grants), within=30, what="all refreshed"
            )
    arrivals = provider.arrivals
    assert len(arrivals) == COUNT
    assert most_in_one_second(arrivals) <= RATE + BURST
    # one shared rate, not three: COUNT requests need (COUNT - BURST) / RATE seconds
    assert max(arrivals) - min(arrivals) >= (COUNT - BURST) / RATE * 0.9
    assert provider.stats.reuse_events == []
