"""`python -m bench.client_read`: a token read through ``worker.client`` on loopback.

Starts a private Valkey (AOF on, as in production), stores credentials with
an ~800-byte access token (a JWT's size), then times ``get(id)`` one call
at a time (the latency an application sees; target p99 <= 1 ms; the reads
run in rounds, each with its own p99, because a shared machine's noise
comes in bursts; a PING's round trip after each round gives the machine's
floor, which no read can beat) and with many calls at once from one
process (throughput). No worker runs: every token is fresh, so each call
is one script call (``token.lua``).

    python -m bench.client_read [--reads 20000] [--rounds 5] [--concurrency 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.infra import start_valkey
from worker.client import connect
from worker.keyring import codec_from_settings
from worker.keys import Keyspace
from worker.models import CredentialInput
from worker.profiles import ProfileStore
from worker.redisio import connect as connect_redis
from worker.settings import Settings
from worker.store import Store

CREDENTIALS = 1000
TOKEN_BYTES = 800


def percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


async def seed(settings: Settings) -> list[str]:
    assert settings.redis_url
    async with connect_redis(settings.redis_url) as client:
        store = Store(
            client, Keyspace(settings.prefix, settings.partitions), codec_from_settings(settings)
        )
        await store.check_layout()
        await ProfileStore(store).create(
            {"id": "bench", "token_url": "https://auth.example.com/token",
             "client_id": "c", "client_secret": "s"}
        )  # fmt: skip
        expires = int(time.time() * 1000) + 86_400_000
        ids = [f"bench-{n:05d}" for n in range(CREDENTIALS)]
        for cred_id in ids:
            cred = CredentialInput(cred_id, "bench", "a" * TOKEN_BYTES, "r" * 64, expires,
                                   scope="read write")  # fmt: skip
            await store.upsert(cred, due_ms=expires, replace=False)
    return ids


async def measure(
    settings: Settings, ids: list[str], reads: int, concurrency: int, rounds: int
) -> dict[str, Any]:
    rng = random.Random(7)
    async with connect(settings) as client:
        for cred_id in ids[:200]:  # warm-up: connections, script cache
            await client.get(cred_id)
        per_round: list[list[float]] = []
        floor: list[float] = []  # a PING's round trip: what no read can beat here
        cpu_read_s = 0.0
        for _ in range(rounds):
            samples: list[float] = []
            cpu_started = time.process_time()
            for _ in range(reads // rounds):
                cred_id = rng.choice(ids)
                started = time.perf_counter()
                await client.get(cred_id)
                samples.append((time.perf_counter() - started) * 1000)
            cpu_read_s += time.process_time() - cpu_started
            per_round.append(sorted(samples))
            for _ in range(reads // rounds // 4):
                started = time.perf_counter()
                await client._redis.ping()
                floor.append((time.perf_counter() - started) * 1000)
        cpu_us = cpu_read_s * 1e6 / max(1, rounds * (reads // rounds))
        floor.sort()
        samples = sorted(x for r in per_round for x in r)
        round_p99 = sorted(percentile(r, 0.99) for r in per_round)

        per_task = reads // concurrency

        async def reader() -> None:
            for _ in range(per_task):
                await client.get(rng.choice(ids))

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(reader)
        elapsed = time.perf_counter() - started
    return {
        "reads": reads,
        "p50_ms": round(percentile(samples, 0.50), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "p99_ms_per_round": [round(percentile(r, 0.99), 3) for r in per_round],
        "p99_ms_median_round": round(round_p99[len(round_p99) // 2], 3),
        "p999_ms": round(percentile(samples, 0.999), 3),
        "max_ms": round(samples[-1], 3),
        "client_cpu_us_per_read": round(cpu_us, 1),
        "ping_p50_ms": round(percentile(floor, 0.50), 3),
        "ping_p99_ms": round(percentile(floor, 0.99), 3),
        "target_p99_ms": 1.0,
        "p99_met": percentile(samples, 0.99) <= 1.0,
        "concurrent_reads_per_s": round(per_task * concurrency / elapsed),
        "concurrency": concurrency,
    }


def run(work: Path, *, reads: int, rounds: int, concurrency: int) -> dict[str, Any]:
    """The whole measurement on a private Valkey under ``work`` (also the
    ``client_read`` scenario of ``python -m bench``)."""
    server = start_valkey(work / "client-read", fsync="everysec")
    try:
        settings = Settings(redis_url=server.url, prefix="bench-client:")
        ids = anyio.run(seed, settings, backend="asyncio")
        return anyio.run(measure, settings, ids, reads, concurrency, rounds,
                         backend="asyncio")  # fmt: skip
    finally:
        server.stop()


def run_isolated(work: Path, *, reads: int, rounds: int, concurrency: int) -> dict[str, Any]:
    """``run`` in a process of its own, as an application's read would be:
    its own interpreter, heap and event loop, not the benchmark's, which
    has run every earlier scenario (1.6 ms p99 inside the full run in the
    last release, 0.4-0.65 ms in standalone runs)."""
    work.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [sys.executable, "-m", "bench.client_read", "--json", "--reads", str(reads),
         "--rounds", str(rounds), "--concurrency", str(concurrency)],
        check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="the reads split in rounds")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp), reads=args.reads, rounds=args.rounds,
                     concurrency=args.concurrency)  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return
    print("| token read through worker.client (loopback, 800-byte token) | value |")
    print("|---|---:|")
    for name in ("p50_ms", "p99_ms", "p99_ms_per_round", "p999_ms", "max_ms",
                 "client_cpu_us_per_read", "ping_p50_ms", "ping_p99_ms",
                 "concurrent_reads_per_s"):  # fmt: skip
        value = result[name]
        print(f"| {name} | {' / '.join(map(str, value)) if isinstance(value, list) else value} |")
    print(f"p99 {'<=' if result['p99_met'] else '>'} 1 ms target: "
          f"{'met' if result['p99_met'] else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
