"""Credentials by refresh-token horizon: how long until their grants die.

Some providers' refresh tokens expire whatever refreshd does (Spotify 6
months after consent, Intuit's 5-year cap, GitHub when a rotation is
missed). The answer says when (``worker.answers``); the worker records
each such expiry in one sorted set (``Keyspace.refresh_horizon``: member
= credential id, score = expiry ms) after the commit that stored it. The
index is advisory: a lost write only skews a gauge, never a token, so it
is not part of the commit script and costs nothing for credentials whose
provider names no expiry (most).

``Horizon.update`` sets ``refreshd_credentials_by_refresh_horizon`` by
bucket (``lt_1d``, ``lt_7d``, ``lt_30d``, ``later``, ``unknown``) from a
few ZCOUNTs, every ``interval_s``. Before counting, it checks the ids of the
soonest buckets (under 7 days, at most ``VERIFY_LIMIT`` per pass) against
their records and drops those deleted or no longer active, so the alert on
grants expiring within 7 days is not raised by credentials already gone.
"""

from __future__ import annotations

import time

import anyio

from worker.errors import StoreUnavailable
from worker.metrics import Metrics
from worker.redisio import REDIS_UNAVAILABLE, guard
from worker.store import Store

__all__ = ["BUCKETS", "VERIFY_LIMIT", "Horizon", "record_refresh_expiry"]

DAY_MS = 86_400_000
#: bucket label -> upper bound in days (None: no bound)
BUCKETS: tuple[tuple[str, int | None], ...] = (
    ("lt_1d", 1),
    ("lt_7d", 7),
    ("lt_30d", 30),
    ("later", None),
)
#: most ids of the soonest buckets checked against their records per pass
VERIFY_LIMIT = 1000


async def record_refresh_expiry(store: Store, credential_id: str, expires_at_ms: int) -> None:
    """Index one credential's refresh-token expiry (after its commit)."""
    await guard(store.client.zadd(store.keys.refresh_horizon, {credential_id: expires_at_ms}))


class Horizon:
    def __init__(self, store: Store, metrics: Metrics, *, interval_s: float = 60.0) -> None:
        self.store = store
        self.metrics = metrics
        self.interval_s = interval_s

    async def run(self) -> None:
        """Update the gauge forever (a worker's task group cancels it)."""
        while True:
            try:
                await self.update()
            except (StoreUnavailable, *REDIS_UNAVAILABLE):
                pass  # redis_up says so; the next pass catches up
            await anyio.sleep(self.interval_s)

    async def update(self, now_ms: int | None = None) -> dict[str, int]:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        key = self.store.keys.refresh_horizon
        await self._drop_inactive(key, now_ms + 7 * DAY_MS)
        pipe = self.store.client.pipeline(transaction=False)
        low: int | str = "-inf"
        for _, days in BUCKETS:
            high: int | str = "+inf" if days is None else now_ms + days * DAY_MS
            pipe.zcount(key, low if low == "-inf" else f"({low}", high)
            low = high
        counts = await guard(pipe.execute())
        active = (await self.store.counters()).get("status:active", 0)
        out = {label: int(n) for (label, _), n in zip(BUCKETS, counts, strict=True)}
        out["unknown"] = max(active - sum(out.values()), 0)
        for label, n in out.items():
            self.metrics.refresh_horizon.labels(label).set(n)
        return out

    async def _drop_inactive(self, key: str, until_ms: int) -> None:
        client = self.store.client
        ids = await guard(client.zrange(key, "-inf", until_ms, byscore=True, offset=0,
                                        num=VERIFY_LIMIT))  # fmt: skip
        if not ids:
            return
        records = await self.store.many_raw_fields(ids)
        gone = [
            i
            for i, rec in zip(ids, records, strict=True)
            if not rec or rec.get("status", "active") != "active"
        ]
        if gone:
            await guard(client.zrem(key, *gone))
