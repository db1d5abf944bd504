"""Counters around a timed window: CPU per process, Redis commands, probe
round trips; and small statistics helpers."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.infra import ProcGroup, cpu_seconds
from tests.redis_server import RedisServer

__all__ = [
    "Snapshot",
    "pct",
    "rate_bins",
    "redis_commands",
    "spread_offsets_ms",
    "steady_result",
    "steady_size",
    "steady_window",
    "summary",
    "used_memory",
]


def used_memory(server: RedisServer) -> int:
    """Settled ``used_memory``: the AOF buffer flushed, our client the only one."""
    time.sleep(0.3)
    with server.client(decode_responses=True) as c:
        return int(c.info("memory")["used_memory"])


def redis_commands(server: RedisServer) -> dict[str, int]:
    """Calls per command since the server started (INFO commandstats)."""
    with server.client(decode_responses=True) as c:
        stats = c.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def machine_ticks() -> tuple[int, int, int]:
    """(all CPU ticks, stolen ticks, busy ticks) of the machine. A VM whose
    host is busy loses CPU to steal; busy ticks beyond the measured
    processes' CPU are other load on this machine. Either makes every
    figure here slower, so both are reported."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])
    idle = fields[3] + fields[4]
    return total, fields[7], total - idle - fields[7]


@dataclass
class Snapshot:
    workers: float
    redis: float
    endpoint: float
    commands: dict[str, int]
    round_trips: int
    dumps: list[dict[str, Any]]
    ticks: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def take(cls, workers: ProcGroup, server: RedisServer, endpoint_pid: int) -> Snapshot:
        dumps = workers.dump()
        return cls(
            workers=workers.cpu(),
            redis=cpu_seconds(server.pid),
            endpoint=cpu_seconds(endpoint_pid),
            commands=redis_commands(server),
            round_trips=sum(d["round_trips"] for d in dumps),
            dumps=dumps,
            ticks=machine_ticks(),
        )

    def delta(self, before: Snapshot, n: int) -> dict[str, Any]:
        """Per-refresh costs between two snapshots, over ``n`` refreshes."""
        cmds = {k: v - before.commands.get(k, 0) for k, v in self.commands.items()}
        cmds = {k: v for k, v in sorted(cmds.items(), key=lambda kv: -kv[1]) if v > 0}
        n = max(n, 1)
        return {
            "cpu_ms_per_refresh": {
                "worker": 1000 * (self.workers - before.workers) / n,
                "redis": 1000 * (self.redis - before.redis) / n,
                "endpoint": 1000 * (self.endpoint - before.endpoint) / n,
            },
            "cpu_s": {
                "worker": self.workers - before.workers,
                "redis": self.redis - before.redis,
                "endpoint": self.endpoint - before.endpoint,
            },
            "round_trips_per_refresh": (self.round_trips - before.round_trips) / n,
            "cpu_steal_pct": 100
            * (self.ticks[1] - before.ticks[1])
            / max(self.ticks[0] - before.ticks[0], 1),
            # machine CPU not spent by the worker(s), Redis or the endpoint, in
            # cores (the driver's polling is a few %): other load shows here
            "other_load_cores": _other_load(before, self),
            "commands_per_refresh": sum(cmds.values()) / n,
            "script_calls_per_refresh": (cmds.get("evalsha", 0) + cmds.get("eval", 0)) / n,
            "commands": {k: round(v / n, 3) for k, v in cmds.items()},
        }


def _other_load(before: Snapshot, after: Snapshot) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    wall = (after.ticks[0] - before.ticks[0]) / tick / (os.cpu_count() or 1)
    if wall <= 0:
        return 0.0
    busy = (after.ticks[2] - before.ticks[2]) / tick
    ours = (after.workers - before.workers) + (after.redis - before.redis)
    ours += after.endpoint - before.endpoint
    return max(busy - ours, 0.0) / wall


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (q in 0..100)."""
    if not values:
        return math.nan
    k = max(0, min(len(values) - 1, math.ceil(q / 100 * len(values)) - 1))
    return values[k]


def summary(lags_s: Iterable[float]) -> dict[str, float]:
    v = sorted(lags_s)
    if not v:
        return {"n": 0}
    return {
        "n": len(v),
        "mean_ms": 1000 * sum(v) / len(v),
        "p50_ms": 1000 * pct(v, 50),
        "p90_ms": 1000 * pct(v, 90),
        "p99_ms": 1000 * pct(v, 99),
        "max_ms": 1000 * v[-1],
    }


def rate_bins(times_s: Iterable[float], t0: float, width: float = 0.25) -> list[list[float]]:
    """[[seconds since t0, events per second]] in bins of ``width`` seconds."""
    counts: dict[int, int] = {}
    for t in times_s:
        b = int((t - t0) // width)
        counts[b] = counts.get(b, 0) + 1
    if not counts:
        return []
    return [[b * width, counts.get(b, 0) / width] for b in range(min(counts), max(counts) + 1)]


def spread_offsets_ms(n: int, period_s: float) -> list[float]:
    """Due-time offsets that spread ``n`` credentials evenly over one period,
    shuffled with a fixed seed so both systems get the same schedule."""
    import random

    offsets = [period_s * 1000 * (i + 0.5) / n for i in range(n)]
    random.Random(7).shuffle(offsets)
    return offsets


def steady_size(rate: float, lifetime_s: float) -> tuple[float, int]:
    """(period in seconds, credentials) offering ``rate`` refreshes/s with
    tokens living ``lifetime_s``: the default lead for such a token is half
    its lifetime, minus up to 10 % jitter, so each comes due every ~0.475x."""
    period = lifetime_s / 2 * 0.95
    return period, max(1, round(rate * period))


def steady_window(
    system: str,
    *,
    workers: ProcGroup,
    server: RedisServer,
    endpoint: Any,
    n: int,
    period_s: float,
    lifetime_s: float,
    seconds: float,
    arm: Callable[[Callable[[int], int]], object],
) -> dict[str, Any]:
    """The timed part of a steady-state run, the same for both systems:
    due times spread evenly over one period from a second ahead (``arm``
    writes them, credential index -> due ms), ``seconds`` of running, and
    the row built from what the workers observed."""
    before = Snapshot.take(workers, server, endpoint.pid)
    t0 = int(time.time() * 1000) + 1000
    offsets = spread_offsets_ms(n, period_s)
    arm(lambda i: t0 + int(offsets[i]))
    end = t0 / 1000 + seconds
    while time.time() < end:
        workers.check_alive()
        time.sleep(0.25)
    after = Snapshot.take(workers, server, endpoint.pid)
    return steady_result(
        system,
        before=before,
        after=after,
        t0_ms=t0,
        credentials=n,
        lifetime_s=lifetime_s,
        period_s=period_s,
        seconds=seconds,
        endpoint_reuse=endpoint.stats()["reuse"],
    )


def steady_result(
    system: str,
    *,
    before: Snapshot,
    after: Snapshot,
    t0_ms: int,
    credentials: int,
    lifetime_s: float,
    period_s: float,
    seconds: float,
    endpoint_reuse: int,
) -> dict[str, Any]:
    """The steady-state row, computed the same way for refreshd and arq."""
    starts = [t for d in after.dumps for t in d["starts"]]
    lags = [lag for d in after.dumps for lag in d["lags"]]
    window = [(t, lag) for t, lag in zip(starts, lags, strict=True) if t0_ms / 1000 <= t]
    done = len(window)
    return {
        "scenario": "steady",
        "system": system,
        "credentials": credentials,
        "lifetime_s": lifetime_s,
        "offered_per_s": credentials / period_s,
        "seconds": seconds,
        "refreshes": done,
        "refreshes_per_s": done / seconds,
        "endpoint_reuse": endpoint_reuse,
        "lag": summary(lag for _, lag in window),
        "lag_samples_ms": order_statistics([round(1000 * lag, 3) for _, lag in window]),
        "refreshes_over_time": rate_bins([t for t, _ in window], t0_ms / 1000, 1.0),
        **after.delta(before, done),
    }


def order_statistics(values: Sequence[float], keep: int = 2000) -> list[float]:
    """At most ``keep`` evenly spaced order statistics, ends included: the
    plot's distribution needs no more, and a minute at 1,000/s kept every
    sample (a megabyte of JSON in docs/)."""
    ordered = sorted(values)
    if len(ordered) <= keep:
        return ordered
    last = len(ordered) - 1
    return [ordered[round(i * last / (keep - 1))] for i in range(keep)]


def catch_up_result(
    system: str,
    n: int,
    *,
    commits: Sequence[tuple[int, int]],
    before: Snapshot,
    after: Snapshot,
    endpoint: dict[str, Any],
    armed_ms: int,
    seed_s: float,
    memory: tuple[int, int, int],
) -> dict[str, Any]:
    """The catch-up figures both systems report, measured the same way:
    from the first refresh start to the last commit. ``commits`` is
    (version, committed at ms) per credential; ``memory`` is used_memory
    empty, seeded and after the run."""
    starts = sorted(t for d in after.dumps for t in d["starts"])
    lags = [lag for d in after.dumps for lag in d["lags"]]
    first_start = starts[0]
    seconds = max(t for _, t in commits) / 1000 - first_start
    mem0, mem_seeded, mem_refreshed = memory
    return {
        "scenario": "catch_up",
        "system": system,
        "credentials": n,
        "refreshes": len(commits),
        "all_committed_once": {v for v, _ in commits} == {1},
        "endpoint_reuse": endpoint["reuse"],
        "endpoint_unknown": endpoint["unknown"],
        "seconds": seconds,
        "refreshes_per_s": n / seconds,
        "wake_ms": 1000 * first_start - armed_ms,
        **after.delta(before, n),
        "lag": summary(lags),
        "commits_over_time": rate_bins([t / 1000 for _, t in commits], first_start, 1.0),
        "seed_s": seed_s,
        "redis_bytes_per_credential": {
            "seeded": (mem_seeded - mem0) / n,
            "after_one_refresh": (mem_refreshed - mem0) / n,
        },
    }
