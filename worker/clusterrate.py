"""Cluster-wide rate limits: one GCRA step per request, in Redis.

A profile's ``rate_limit_per_s`` holds across every worker process: each
request first asks the profile's limiter (``scripts/ratelimit.lua``, one
key hash-tagged by profile), which either counts it or says how long to
wait. GCRA keeps one number per profile (the next theoretical arrival
time), so the cost is one small script call per rate-limited refresh; the
unlimited profiles (most) never reach this module.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from redis.asyncio import Redis

from worker.keys import Keyspace
from worker.redisio import guard

__all__ = ["ClusterRate"]


class ClusterRate:
    """Asks a profile's shared limiter whether one more request may go now."""

    def __init__(self, client: Redis, keys: Keyspace) -> None:
        self.keys = keys
        text = (resources.files("worker") / "scripts" / "ratelimit.lua").read_text()
        self._script: Any = client.register_script(text)

    async def ask(self, profile_id: str, rate_per_s: float, burst: int) -> int:
        """0 when the request is counted and may go, else the milliseconds
        to wait before asking again (nothing was counted)."""
        interval_ms = 1000.0 / rate_per_s
        res = await guard(
            self._script(
                keys=[self.keys.rate_limit(profile_id)],
                args=[f"{interval_ms:.6f}", max(1, burst)],
            )
        )
        return int(res)
