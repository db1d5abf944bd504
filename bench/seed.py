"""Seeding refreshd's store through its own API (``Store.upsert``, the path
``refreshd credential import`` takes) and arming the schedule.

Credentials are seeded due far in the future, so a running worker leaves
them alone; ``arm`` then moves them all to their benchmark due times in a
few pipelined ZADD XX commands and publishes a wake-up, which is the same
thing an import of already-due credentials does, minus the import time.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import anyio
from redis.asyncio.cluster import RedisCluster

from bench.shared import seed_tokens
from worker.app import open_store
from worker.models import CredentialInput
from worker.profiles import ProfileStore
from worker.redisio import guard
from worker.settings import Settings

__all__ = ["PROFILE", "arm", "cred_ids", "read_commits", "seed_refreshd"]

PROFILE = "bench"
_FAR_FUTURE_MS = 86_400_000


def cred_ids(n: int) -> list[str]:
    return [f"c{i:07d}" for i in range(n)]


def _settings(redis_url: str) -> Settings:
    """The benchmark's own settings; a key ring in the environment
    (``REFRESHD_ENCRYPTION_KEYS``, ``bench.encryption_ab``) seeds encrypted,
    as the workers it starts will read."""
    return Settings(redis_url=redis_url, http_port=0, log_level="warning",
                    encryption_keys=os.environ.get("REFRESHD_ENCRYPTION_KEYS", ""))  # fmt: skip


async def seed_refreshd(
    redis_url: str, ids: Sequence[str], token_url: str, tag: str = "", *, parallel: int = 64
) -> float:
    """Create the benchmark profile and ``ids`` credentials; returns seconds taken."""
    started = time.perf_counter()
    async with open_store(_settings(redis_url), pool_size=parallel) as store:
        await ProfileStore(store).create(
            {
                "id": PROFILE,
                "token_url": token_url,
                "client_id": "bench-client",
                "client_secret": "bench-secret",
                "allow_http": True,
                "allow_private_network": True,
                "rotation": "always",
                "timeout_s": 10,
            }
        )
        now = int(time.time() * 1000)
        due = now + _FAR_FUTURE_MS

        async def write(chunk: Sequence[tuple[int, str]]) -> None:
            for i, cred_id in chunk:
                access, refresh = seed_tokens(i, tag)
                cred = CredentialInput(
                    id=cred_id, profile=PROFILE, access_token=access, refresh_token=refresh,
                    expires_at_ms=due + 600_000, scope="read write",
                )  # fmt: skip
                await store.upsert(cred, due_ms=due, replace=False)

        items = list(enumerate(ids))
        async with anyio.create_task_group() as tg:
            for k in range(parallel):
                tg.start_soon(write, items[k::parallel])
    return time.perf_counter() - started


async def arm(redis_url: str, ids: Sequence[str], due_of: Callable[[int], int]) -> int:
    """Set every credential's due time (``due_of(index)``, epoch ms) in one
    pipeline and wake the workers. Returns the server's clock (ms) at the end."""
    async with open_store(_settings(redis_url), pool_size=4) as store:
        by_part: dict[str, dict[str, int]] = defaultdict(dict)
        for i, cred_id in enumerate(ids):
            by_part[store.keys.partition_of(cred_id).due][cred_id] = due_of(i)
        pipe = store.client.pipeline(transaction=False)
        for key, mapping in by_part.items():
            pipe.zadd(key, mapping, xx=True)
        if isinstance(store.client, RedisCluster):
            # a cluster pipeline takes keyed commands only: the wake-up
            # (PUBLISH reaches every node) after it, and this machine's clock
            await guard(pipe.execute())
            await guard(store.client.publish(store.keys.wake, "bench"))
            return int(time.time() * 1000)
        pipe.publish(store.keys.wake, "bench")
        pipe.time()
        *_, (secs, micros) = await guard(pipe.execute())
        return int(secs) * 1000 + int(micros) // 1000


async def read_commits(redis_url: str, ids: Sequence[str]) -> list[tuple[int, int]]:
    """(version, refreshed_at ms) of every credential, pipelined."""
    out: list[tuple[int, int]] = []
    async with open_store(_settings(redis_url), pool_size=4) as store:
        for start in range(0, len(ids), 5000):
            for record in await store.many_raw_fields(ids[start : start + 5000]):
                out.append((int(record.get("version") or 0), int(record.get("refreshed_at") or 0)))
    return out
