"""`python -m bench.eventlog_ab`: what the durable event log costs, A/B.

The catch-up scenario (N credentials all due at once, one worker process,
real Valkey with AOF, the bench token endpoint) run alternately with the log
on and off (REFRESHD_EVENT_LOG), several rounds. Reports the worker's and
Redis's CPU per refresh and the Redis memory each retained event costs
(used_memory after the run, on minus off, per refresh). The XADD runs inside
commit.lua, so it shows in Redis CPU, not in the worker's.

    python -m bench.eventlog_ab --credentials 5000 --rounds 3

Then how fast one consumer reads the log (``EventLog.read`` batches from a
cursor, typed events included, and the same through ``worker.client``'s
``events()``): ``--follow-events`` entries of the documented layout,
800-character access tokens, 16 partitions.

``python -m bench`` runs the same measurements (``ab_rounds``,
``follow_rate``) as its ``eventlog`` scenario, in the same run as the arq
comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import anyio

from bench.ab import compare, median_of, standalone_ctx, worker_env
from bench.infra import start_valkey
from bench.refreshd_runs import Ctx, catch_up
from worker.client import connect as client_connect
from worker.eventlog import EventLog
from worker.events import EventType, build_event
from worker.keys import Keyspace
from worker.redisio import connect
from worker.settings import Settings


def _run(ctx: Ctx, n: int, log_on: bool, tag: str) -> dict[str, Any]:
    env = {"REFRESHD_EVENT_LOG": "true" if log_on else "false"}
    with worker_env(env):
        return catch_up(ctx, n, 1, tag=tag)


async def _follow_rate(url: str, events: int) -> dict[str, Any]:
    keys = Keyspace()
    async with connect(url) as client:
        pipe = client.pipeline(transaction=False)
        for n in range(events):
            cred_id = f"cred-{n % 10_000:06d}"
            raw = build_event(EventType.REFRESHED, credential_id=cred_id, profile="bench",
                              version=n // 10_000 + 1, ts_ms=n, access_token="a" * 800,
                              token_type="Bearer", expires_at_ms=n, scope="read write")  # fmt: skip
            fields = {"v": "1", "type": EventType.REFRESHED.value, "id": cred_id,
                      "version": str(n // 10_000 + 1), "json": raw}  # fmt: skip
            pipe.xadd(keys.partition_of(cred_id).log, fields)  # type: ignore[arg-type]
            if len(pipe) >= 1000:
                await pipe.execute()
        await pipe.execute()
        log = EventLog(client, keys)
        cursor, seen = log.beginning(), 0
        started = time.perf_counter()
        while True:
            batch = await log.read(cursor, count=200)
            if not batch.entries:
                break
            seen += len(batch.entries)
            assert batch.cursor is not None
            cursor = batch.cursor
        seconds = time.perf_counter() - started
    # the same events through the client library (what an application runs)
    async with client_connect(Settings(redis_url=url)) as tokens:
        started, through_client = time.perf_counter(), 0
        async for _ in tokens.events(since="start", follow=False, count=200):
            through_client += 1
        client_s = time.perf_counter() - started
    return {"events": seen, "seconds": seconds, "events_per_s": seen / seconds,
            "client_events": through_client,
            "client_events_per_s": through_client / client_s}  # fmt: skip


def ab_rounds(ctx: Ctx, n: int, rounds: int) -> dict[str, Any]:
    """``rounds`` pairs of catch-ups, log off and on, alternating which goes
    first (the machine's speed drifts); medians of each side."""
    rows, summary = compare(
        ctx,
        rounds,
        lambda r, mode: _run(ctx, n, mode == "on", f"-log{mode}{r}"),
        label="log",
        extra=lambda result: {"bytes": result["redis_bytes_per_credential"]["after_one_refresh"]},
        suffix=lambda row: f", {row['bytes']:.0f} B/cred",
    )
    retained = median_of(rows["on"], "bytes") - median_of(rows["off"], "bytes")
    # endpoint_reuse and all_committed_once are checked by `python -m bench`
    # like every other run
    return {"credentials": n, "rounds": rounds, **summary,
            "redis_bytes_per_retained_event": retained}  # fmt: skip


def follow_rate(work: Path, events: int) -> dict[str, Any]:
    """One consumer reading ``events`` entries from a private Valkey."""
    server = start_valkey(work / "follow", fsync="everysec")
    try:
        return anyio.run(_follow_rate, server.url, events, backend="asyncio")
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--credentials", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=1024)
    p.add_argument("--follow-events", type=int, default=100_000)
    args = p.parse_args(argv)
    with standalone_ctx("refreshd-ab-", args.concurrency) as ctx:
        summary = ab_rounds(ctx, args.credentials, args.rounds)
        follow = follow_rate(ctx.work, args.follow_events)
        ctx.log(f"one consumer read {follow['events']} events at {follow['events_per_s']:.0f}/s")
    summary["consumer_events_per_s"] = follow["events_per_s"]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
