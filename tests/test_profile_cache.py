"""The worker's profile cache and its process tuning: what a busy worker
does once per profile or once per process rather than once per refresh."""

from __future__ import annotations

import gc
import uuid
from collections.abc import AsyncIterator

import anyio
import pytest

from tests.harness import make_settings
from worker.app import open_store, tune_gc
from worker.errors import NotFound
from worker.models import Profile
from worker.profiles import ProfileCache, ProfileStore
from worker.store import Store

pytestmark = pytest.mark.anyio

PROFILE = {
    "id": "p",
    "token_url": "https://idp.example/token",
    "auth_method": "none",
    "client_id": "app",
}


class CountingProfiles(ProfileStore):
    """The real store, counting the reads that reach Redis."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.loads = 0

    async def load(self, profile_id: str) -> Profile:
        self.loads += 1
        await anyio.sleep(0.05)  # a slow Redis: every caller arrives meanwhile
        return await super().load(profile_id)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    settings = make_settings(redis_url, prefix=f"pc{uuid.uuid4().hex[:8]}:")
    async with open_store(settings) as s:
        yield s


async def test_an_expired_entry_is_read_once_by_all_refreshes_waiting_for_it(
    store: Store,
) -> None:
    profiles = CountingProfiles(store)
    await profiles.create(PROFILE)
    profiles.loads = 0  # create() reads it back
    cache = ProfileCache(profiles, ttl_s=0.2)
    results: list[Profile] = []

    async def refresh() -> None:
        results.append(await cache.get("p"))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(refresh)
    assert profiles.loads == 1
    assert {p.token_url for p in results} == {"https://idp.example/token"}

    await anyio.sleep(0.25)  # expired: read again, once
    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(refresh)
    assert profiles.loads == 2


async def test_a_missing_profile_is_reported_to_every_waiter_and_not_cached(
    store: Store,
) -> None:
    profiles = CountingProfiles(store)
    cache = ProfileCache(profiles)
    errors: list[BaseException] = []

    async def refresh() -> None:
        try:
            await cache.get("nope")
        except NotFound as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(refresh)
    assert len(errors) == 10
    assert profiles.loads == 1
    await profiles.create(PROFILE | {"id": "nope"})
    assert (await cache.get("nope")).id == "nope"  # created since: found at once


async def test_a_cancelled_load_does_not_strand_the_others(store: Store) -> None:
    profiles = CountingProfiles(store)
    await profiles.create(PROFILE)
    profiles.loads = 0  # create() reads it back
    cache = ProfileCache(profiles)
    with anyio.move_on_after(0.01):  # the first caller gives up mid-load
        await cache.get("p")
    assert (await cache.get("p")).id == "p"  # the next one loads again
    assert profiles.loads == 2


def test_tune_gc_raises_the_threshold_and_freezes_start_up_objects() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold()[0] >= 10_000
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
