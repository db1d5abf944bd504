"""`python -m bench.encryption_ab`: what encryption at rest costs, A/B.

The catch-up scenario (N credentials all due at once, one worker process,
real Valkey with AOF, the bench token endpoint with 800-character access
tokens) run alternately without and with a key ring
(``REFRESHD_ENCRYPTION_KEYS``; the seed is encrypted too, and events carry
the access token encrypted, the default with a ring), several rounds, each
side first in turn. Reports the worker's and Redis's CPU per refresh
(medians), then Redis bytes per scheduled credential with 900 B of tokens,
encryption off and on: with the benchmark's tokens (repetitive text) and
with random base64url tokens of the same length (what real tokens look like).

    python -m bench.encryption_ab --credentials 5000 --rounds 3
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio

from bench.ab import compare, standalone_ctx, worker_env
from bench.infra import fresh_valkey
from bench.measure import used_memory
from bench.refreshd_runs import Ctx, catch_up
from bench.seed import PROFILE, cred_ids, seed_refreshd
from bench.shared import positive_int
from worker.app import open_store
from worker.models import CredentialInput
from worker.settings import Settings

__all__ = ["ab_rounds", "memory_ab"]

#: a fixed benchmark key (never a real one)
RING = "b1:" + base64.b64encode(bytes(range(32))).decode()


@contextmanager
def _ring(on: bool) -> Iterator[dict[str, str]]:
    """The key ring for this process's seeding and the worker's environment."""
    env = {"REFRESHD_ENCRYPTION_KEYS": RING} if on else {}
    saved = os.environ.pop("REFRESHD_ENCRYPTION_KEYS", None)
    os.environ.update(env)
    try:
        yield env
    finally:
        os.environ.pop("REFRESHD_ENCRYPTION_KEYS", None)
        if saved is not None:
            os.environ["REFRESHD_ENCRYPTION_KEYS"] = saved


def _run(ctx: Ctx, n: int, on: bool, tag: str) -> dict[str, Any]:
    with _ring(on) as env, worker_env(env):
        return catch_up(ctx, n, 1, tag=tag)


def ab_rounds(ctx: Ctx, n: int, rounds: int) -> dict[str, Any]:
    """``rounds`` pairs of catch-ups, encryption off and on, alternating
    which goes first (the machine's speed drifts); medians of each side."""
    rows, summary = compare(
        ctx,
        rounds,
        lambda r, mode: _run(ctx, n, mode == "on", f"-enc{mode}{r}"),
        label="encryption",
        extra=lambda result: {"seeded": result["redis_bytes_per_credential"]["seeded"]},
    )
    return {"credentials": n, "rounds": rounds, "runs": rows, **summary}


async def _seed_random(url: str, ids: Sequence[str]) -> None:
    """800 + 100 characters of random base64url, as real tokens look."""
    settings = Settings(redis_url=url, http_port=0, log_level="warning",
                        encryption_keys=os.environ.get("REFRESHD_ENCRYPTION_KEYS", ""))  # fmt: skip
    async with open_store(settings, pool_size=16) as store:
        due = int(time.time() * 1000) + 86_400_000

        async def write(chunk: Sequence[str]) -> None:
            for cred_id in chunk:
                cred = CredentialInput(
                    id=cred_id, profile=PROFILE, access_token=secrets.token_urlsafe(600),
                    refresh_token=secrets.token_urlsafe(75), expires_at_ms=due + 600_000,
                    scope="read write",
                )  # fmt: skip
                await store.upsert(cred, due_ms=due, replace=False)

        async with anyio.create_task_group() as tg:
            for k in range(16):
                tg.start_soon(write, ids[k::16])


def memory_ab(ctx: Ctx, n: int) -> dict[str, Any]:
    """Bytes per scheduled credential (used_memory / n after seeding),
    encryption off and on, with the benchmark's tokens and random ones."""
    out: dict[str, Any] = {"credentials": n}
    for tokens in ("bench", "random"):
        for mode in ("off", "on"):
            server = fresh_valkey(ctx.work / f"enc-memory-{tokens}-{mode}", fsync=ctx.fsync)
            try:
                ids = cred_ids(n)
                with _ring(mode == "on"):
                    before = used_memory(server)
                    # the profile, and every credential (bench) or the first (random)
                    first = ids if tokens == "bench" else ids[:1]
                    anyio.run(seed_refreshd, server.url, first, ctx.endpoint.url, "mem",
                              backend="asyncio")  # fmt: skip
                    if tokens == "random":
                        anyio.run(_seed_random, server.url, ids[1:], backend="asyncio")
                    after = used_memory(server)
                with server.client() as c:
                    sample = c.keys("*cred:c0000002")[0]
                    record = c.strlen(sample)
            finally:
                server.stop()
            per = (after - before) / n
            out[f"{tokens}_{mode}"] = {"bytes_per_credential": per, "record_bytes": record}
            ctx.log(f"  memory, {tokens} tokens, encryption {mode}: {per:.0f} B per credential"
                    f" (record {record} B)")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--credentials", type=positive_int, default=5000)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--memory-credentials", type=positive_int, default=20_000)
    p.add_argument("--concurrency", type=positive_int, default=1024)
    args = p.parse_args(argv)
    with standalone_ctx("refreshd-enc-", args.concurrency) as ctx:
        summary = ab_rounds(ctx, args.credentials, args.rounds)
        by_round = summary["worker_cpu_change_pct_by_round"]
        ctx.log(f"  worker CPU per refresh, encryption on against off:"
                f" {summary['worker_cpu_change_pct']:+.1f} % (the sides' medians);"
                f" round by round {by_round['median']:+.1f} % (median),"
                f" {by_round['mean']:+.1f} % (mean)")  # fmt: skip
        summary["memory"] = memory_ab(ctx, args.memory_credentials)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
