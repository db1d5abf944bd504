"""The do-it-yourself alternative: an arq job queue with one deferred job
per credential, a Redis lock around each refresh, and a reschedule after it.

This is what a team would build instead of refreshd, written the way arq's
documentation suggests, with the same HTTP client refreshd uses (aiohttp;
``--http httpx`` for httpx on the aiohttp transport), the same request, and
the same default refresh
rule (lead = max(60 s, 20 % of the lifetime), capped at 30 min and at half
the lifetime, up to 10 % earlier for jitter), so both systems see the same
offered load. arq keeps no job results here (``keep_result=0``), which is
its cheapest setting.

arq pins ``redis<6`` and refreshd ``redis==8.1``, so this module runs in its
own virtualenv (``bench/requirements-arq.txt``); it imports only the
standard library, arq and the HTTP client.

    python -m bench.alt_arq seed   --redis URL --count N
    python -m bench.alt_arq worker --redis URL --token-url URL --max-jobs 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
from arq import Worker, func
from arq.connections import ArqRedis, RedisSettings, create_pool
from httpx_aiohttp import AiohttpTransport

from bench.probe import Probe
from bench.shared import ARQ_CRED as CRED
from bench.shared import ARQ_LOCK as LOCK
from bench.shared import arq_job_id as job_id
from bench.shared import seed_tokens

LEASE_MS = 30_000
CLIENT = ("bench-client", "bench-secret")
_FAR_FUTURE_S = 86_400

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

probe = Probe(os.environ.pop("BENCH_DUMP", None))


def next_due_s(now_s: float, lifetime_s: float) -> float:
    lead = min(max(60.0, 0.2 * lifetime_s), 1800.0, lifetime_s / 2)
    return max(now_s, now_s + lifetime_s - lead - random.uniform(0, 0.1 * lead))


def _settings(url: str) -> RedisSettings:
    parts = urlsplit(url)
    return RedisSettings(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)


# ---------------------------------------------------------------- the job


async def refresh(ctx: dict[str, Any], cred_id: str) -> None:
    started = time.time()
    probe.on_lag(max(started * 1000 - ctx["score"], 0) / 1000)
    redis: ArqRedis = ctx["redis"]
    lock, key, token = LOCK + cred_id, CRED + cred_id, uuid.uuid4().hex
    if not await redis.set(lock, token, nx=True, px=LEASE_MS):
        # another worker is refreshing it; look again when its lease is over
        await redis.enqueue_job("refresh", cred_id, _defer_by=LEASE_MS / 1000)
        return
    try:
        refresh_token, version = await redis.hmget(key, ["refresh_token", "version"])
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token.decode()}
        if ctx["http_kind"] == "aiohttp":
            async with ctx["http"].post(
                ctx["token_url"], data=form, auth=aiohttp.BasicAuth(*CLIENT)
            ) as answer:
                answer.raise_for_status()
                body = await answer.json()
        else:
            response = await ctx["http"].post(ctx["token_url"], data=form, auth=CLIENT)
            response.raise_for_status()
            body = response.json()
        now = time.time()
        version = int(version or 0) + 1
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "access_token": body["access_token"],
                    "refresh_token": body.get("refresh_token") or refresh_token,
                    "expires_at": int((now + body["expires_in"]) * 1000),
                    "refreshed_at": int(now * 1000),
                    "version": version,
                },
            )
            await pipe.execute()
        due = next_due_s(now, float(body["expires_in"]))
        await redis.enqueue_job(
            "refresh",
            cred_id,
            _job_id=job_id(cred_id, version),
            _defer_until=datetime.fromtimestamp(due, tz=UTC),
        )
    finally:
        await ctx["release"](keys=[lock], args=[token])


async def _startup(ctx: dict[str, Any]) -> None:
    jobs = ctx["max_jobs"]
    if ctx["http_kind"] == "aiohttp":
        connector = aiohttp.TCPConnector(limit=jobs, keepalive_timeout=10.0)
        ctx["http"] = aiohttp.ClientSession(connector=connector)
    else:
        limits = httpx.Limits(
            max_connections=jobs, max_keepalive_connections=jobs, keepalive_expiry=10.0
        )
        transport = AiohttpTransport(limits=limits)
        ctx["http"] = httpx.AsyncClient(transport=transport, trust_env=False)
    ctx["release"] = ctx["redis"].register_script(_RELEASE)


async def _shutdown(ctx: dict[str, Any]) -> None:
    await ctx["http"].close() if ctx["http_kind"] == "aiohttp" else ctx["http"].aclose()


def run_worker(url: str, token_url: str, max_jobs: int, poll_delay: float, http: str) -> None:
    probe.count_redis_round_trips()
    probe.install_signal()
    worker = Worker(
        functions=[func(refresh, name="refresh", keep_result=0, max_tries=3)],
        redis_settings=_settings(url),
        max_jobs=max_jobs,
        keep_result=0,
        poll_delay=poll_delay,
        on_startup=_startup,
        on_shutdown=_shutdown,
        ctx={"token_url": token_url, "max_jobs": max_jobs, "http_kind": http},
        handle_signals=True,
    )
    worker.run()


# -------------------------------------------------------------- seeding


async def seed(url: str, count: int, tag: str, parallel: int = 64) -> dict[str, Any]:
    """Credential hashes, and one job per credential, deferred far into the
    future (the benchmark then re-scores the queue to the test's times)."""
    started = time.perf_counter()
    redis = await create_pool(_settings(url))
    try:
        ids = [f"c{i:07d}" for i in range(count)]
        for start in range(0, count, 2000):
            pipe = redis.pipeline(transaction=False)
            for i in range(start, min(start + 2000, count)):
                access, refresh_token = seed_tokens(i, tag)
                pipe.hset(CRED + ids[i], mapping={"access_token": access,
                          "refresh_token": refresh_token, "version": 0})  # fmt: skip
            await pipe.execute()
        when = datetime.fromtimestamp(time.time() + _FAR_FUTURE_S, tz=UTC)

        async def enqueue(chunk: list[str]) -> None:
            for cred_id in chunk:
                job = await redis.enqueue_job(
                    "refresh", cred_id, _job_id=job_id(cred_id, 0), _defer_until=when
                )
                assert job is not None

        await asyncio.gather(*(enqueue(ids[k::parallel]) for k in range(parallel)))
    finally:
        await redis.aclose()
    return {"seconds": time.perf_counter() - started, "count": count}


def main() -> int:
    parser = argparse.ArgumentParser(description="the arq alternative (benchmark)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("seed")
    p.add_argument("--redis", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--tag", default="arq")
    p = sub.add_parser("worker")
    p.add_argument("--redis", required=True)
    p.add_argument("--token-url", required=True)
    p.add_argument("--max-jobs", type=int, default=256)
    p.add_argument("--poll-delay", type=float, default=0.5, help="arq's default: 0.5 s")
    p.add_argument(
        "--http",
        choices=["aiohttp", "httpx"],
        default="aiohttp",
        help="aiohttp directly, as refreshd (default), or httpx on aiohttp",
    )
    args = parser.parse_args()
    if args.cmd == "seed":
        print(json.dumps(asyncio.run(seed(args.redis, args.count, args.tag))))
    else:
        run_worker(args.redis, args.token_url, args.max_jobs, args.poll_delay, args.http)
    return 0


if __name__ == "__main__":
    sys.exit(main())
