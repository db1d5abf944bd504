"""What a cluster-wide rate limit costs per refresh: ``python -m bench.ratelimit_cost``.

Takes ``ProfileLimits.acquire`` N times from C concurrent tasks, for an
unlimited profile (no Redis call: the fast path every unlimited refresh
takes) and for a rate-limited one whose rate is high enough never to make
anyone wait (so only the GCRA step is measured: one script call per
refresh). Prints client CPU and Valkey CPU per acquire, and the rate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.infra import cpu_seconds, start_valkey
from worker.app import open_store
from worker.clusterrate import ClusterRate
from worker.profile import Profile
from worker.ratelimit import ProfileLimits
from worker.settings import Settings


async def _measure(
    url: str, server_pid: int, profile: Profile, n: int, tasks: int
) -> dict[str, Any]:
    async with open_store(Settings(redis_url=url, http_port=0)) as store:
        limits = ProfileLimits(ClusterRate(store.client, store.keys), max_wait_s=10)
        per_task = n // tasks

        async def run() -> None:
            for _ in range(per_task):
                if ProfileLimits.unlimited(profile):  # as Refresher._refresh does
                    continue
                (await limits.acquire(profile))()

        cpu0, srv0, wall0 = time.process_time(), cpu_seconds(server_pid), time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(run)
        wall = time.perf_counter() - wall0
        cpu, srv = time.process_time() - cpu0, cpu_seconds(server_pid) - srv0
        done = per_task * tasks
        return {
            "profile": "limited" if profile.rate_limit_per_s else "unlimited",
            "acquires": done,
            "client_cpu_us_per_acquire": round(cpu / done * 1e6, 2),
            "valkey_cpu_us_per_acquire": round(srv / done * 1e6, 2),
            "acquires_per_s": round(done / wall),
        }


async def _main(n: int, tasks: int) -> list[dict[str, Any]]:
    base = {"id": "p", "token_url": "https://auth.example.com/token", "client_id": "c",
            "client_secret": "s"}  # fmt: skip
    unlimited = Profile.from_mapping(base)
    limited = Profile.from_mapping(base | {"rate_limit_per_s": 100_000, "rate_limit_burst": n})
    with tempfile.TemporaryDirectory() as tmp:
        server = start_valkey(Path(tmp), fsync="everysec")
        try:
            return [
                await _measure(server.url, server.pid, p, n, tasks) for p in (unlimited, limited)
            ]
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acquires", type=int, default=20_000)
    parser.add_argument("--tasks", type=int, default=64)
    args = parser.parse_args()
    for row in anyio.run(_main, args.acquires, args.tasks):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
