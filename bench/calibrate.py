"""How fast is this machine? The reference costs the issue quotes, measured
here: CPU per request of httpx's own pool, httpx on the aiohttp transport
and raw aiohttp against the benchmark's endpoint, and the Redis CPU of one
Lua claim of 100 credentials. Comparing them with the quoted figures tells
how this machine relates to the one the targets were set on."""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import aiohttp
import anyio

from bench.infra import start_valkey
from bench.refreshd_runs import Ctx
from bench.seed import arm, cred_ids, seed_refreshd
from worker.app import open_store
from worker.settings import Settings

__all__ = ["REFERENCE_MS", "calibrate"]

#: the issue's figures "on this class of machine" (CPU ms)
REFERENCE_MS = {
    "httpx_default_pool": 2.1,
    "httpx_aiohttp_transport": 0.33,
    "raw_aiohttp": 0.15,
    "lua_claim_100": 0.25,  # Redis server time per call
}


async def _http(url: str, n: int, concurrency: int = 64) -> dict[str, float]:
    """CPU ms per request of each client stack that is installed."""
    body = b"grant_type=refresh_token&refresh_token="
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    out: dict[str, float] = {}
    counter = iter(range(10**9))

    async def drive(one: Any) -> float:
        async def lanes(count: int) -> None:
            todo = iter(range(count))

            async def lane() -> None:
                for _ in todo:
                    await one(b"%brt0.cal%d" % (body, next(counter)))

            await asyncio.gather(*(lane() for _ in range(concurrency)))

        await lanes(concurrency * 2)  # open and warm the pool
        cpu = time.process_time()
        await lanes(n)
        return 1000 * (time.process_time() - cpu) / n

    limits_kw = {"max_connections": 256, "max_keepalive_connections": 256}
    try:
        import httpx
    except ImportError:
        httpx = None  # type: ignore[assignment]
    if httpx is not None:
        async with httpx.AsyncClient(limits=httpx.Limits(**limits_kw)) as client:

            async def plain(content: bytes) -> None:
                r = await client.post(url, content=content, headers=headers)
                r.read()

            out["httpx_default_pool"] = await drive(plain)
        try:
            import httpx_aiohttp
        except ImportError:  # not a refreshd dependency any more; the bench extra has it
            httpx_aiohttp = None  # type: ignore[assignment]
        if httpx_aiohttp is not None:
            transport = httpx_aiohttp.AiohttpTransport(limits=httpx.Limits(**limits_kw))
            async with httpx.AsyncClient(transport=transport) as client:

                async def transported(content: bytes) -> None:
                    r = await client.post(url, content=content, headers=headers)
                    r.read()

                out["httpx_aiohttp_transport"] = await drive(transported)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:

        async def raw(content: bytes) -> None:
            async with session.post(url, data=content, headers=headers) as r:
                await r.read()

        out["raw_aiohttp"] = await drive(raw)
    return out


async def _claims(url: str, rounds: int) -> float:
    """Server time per claim script call (INFO commandstats: evalsha usec)."""
    async with open_store(Settings(redis_url=url, http_port=0), pool_size=2) as store:
        part = store.keys.partition(0)
        await store.claim(part, limit=1, lease_ms=60_000, token="cal-load")  # loads the script
        before = (await store.client.info("commandstats"))["cmdstat_evalsha"]
        for k in range(rounds):
            _, _, items = await store.claim(part, limit=100, lease_ms=60_000, token=f"cal{k}")
            assert len(items) == 100, len(items)
        after = (await store.client.info("commandstats"))["cmdstat_evalsha"]
        usec = int(after["usec"]) - int(before["usec"])
        return usec / 1000 / (int(after["calls"]) - int(before["calls"]))


def calibrate(ctx: Ctx, *, requests: int, rounds: int = 20) -> dict[str, Any]:
    ctx.endpoint.reset(expires_in=3600)
    http = anyio.run(_http, ctx.endpoint.url, requests, backend="asyncio")
    work = ctx.work / "calibrate"
    shutil.rmtree(work, ignore_errors=True)
    server = start_valkey(work / "redis", fsync=ctx.fsync)
    try:
        ids = cred_ids(16 * 100 * rounds + 1600)
        anyio.run(seed_refreshd, server.url, ids, ctx.endpoint.url, "calibrate", backend="asyncio")
        anyio.run(arm, server.url, ids, lambda _i: 0, backend="asyncio")
        claim = anyio.run(_claims, server.url, rounds, backend="asyncio")
    finally:
        server.stop()
    measured = {**http, "lua_claim_100": claim}
    return {
        "scenario": "calibrate",
        "measured_ms": measured,
        "reference_ms": REFERENCE_MS,
        "slowdown": {k: measured[k] / REFERENCE_MS[k] for k in REFERENCE_MS if k in measured},
    }
