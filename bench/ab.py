"""What the A/B benches (``bench.encryption_ab``, ``bench.eventlog_ab``) share.

Each compares catch-ups with a feature off and on: the same worker
environment patch, the same alternating order of rounds (the machine's
speed drifts, so neither side always goes first), the same medians, and
the same standalone ``main`` (a private work directory and token endpoint,
timestamped progress lines). Kept here once so the two comparisons measure
the same way.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partialmethod
from pathlib import Path
from typing import Any

from bench.infra import Endpoint, RefreshdWorker
from bench.refreshd_runs import Ctx

__all__ = ["alternating", "compare", "median_of", "standalone_ctx", "worker_env"]


@contextmanager
def worker_env(env: Mapping[str, str]) -> Iterator[None]:
    """Every ``RefreshdWorker`` started inside gets ``env`` on top of the
    bench environment (``catch_up`` starts its own workers, so the
    environment cannot be passed to it)."""
    original = RefreshdWorker.start
    RefreshdWorker.start = partialmethod(original, extra_env=dict(env))  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        RefreshdWorker.start = original  # type: ignore[method-assign]


def alternating(rounds: int) -> Iterator[tuple[int, str]]:
    """(round, "off"/"on") for ``rounds`` pairs, the side that goes first
    alternating from round to round."""
    for r in range(rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            yield r, mode


def median_of(rows: Sequence[Mapping[str, float]], key: str) -> float:
    """The median of ``key`` over one side's rows."""
    return float(statistics.median(row[key] for row in rows))


def compare(
    ctx: Ctx,
    rounds: int,
    run: Callable[[int, str], dict[str, Any]],
    *,
    label: str,
    extra: Callable[[dict[str, Any]], dict[str, float]] = lambda _result: {},
    suffix: Callable[[dict[str, float]], str] = lambda _row: "",
) -> tuple[dict[str, list[dict[str, float]]], dict[str, Any]]:
    """``run(round, mode)`` for ``rounds`` pairs of catch-ups (``alternating``),
    a progress line each (``label``, then ``suffix(row)``); returns each
    side's rows (worker/Redis CPU ms per refresh, refreshes per second, plus
    ``extra(result)``) and the medians every A/B reports, with the checks
    ``python -m bench`` makes of every run (endpoint reuse, committed once).
    ``worker_cpu_change_pct_by_round`` compares the two runs of each round,
    one right after the other: the machine's speed drifts between rounds by
    more than the change measured, and within a round much less."""
    rows: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    runs: list[dict[str, Any]] = []
    for r, mode in alternating(rounds):
        result = run(r, mode)
        runs.append(result)
        cpu = result["cpu_ms_per_refresh"]
        per_s = result["refreshes_per_s"]
        row = {"worker_ms": cpu["worker"], "redis_ms": cpu["redis"], "per_s": per_s}
        row.update(extra(result))
        rows[mode].append(row)
        ctx.log(f"  {label} {mode:3}: worker {cpu['worker']:.3f} ms, redis {cpu['redis']:.3f}"
                f" ms per refresh, {per_s:.0f}/s{suffix(row)}")  # fmt: skip

    def med(mode: str, key: str) -> float:
        return median_of(rows[mode], key)

    by_round = [on["worker_ms"] / off["worker_ms"] for on, off in zip(rows["on"], rows["off"],
                                                                       strict=True)]  # fmt: skip

    return rows, {
        "worker_cpu_ms_per_refresh": {m: med(m, "worker_ms") for m in rows},
        "redis_cpu_ms_per_refresh": {m: med(m, "redis_ms") for m in rows},
        "refreshes_per_s": {m: med(m, "per_s") for m in rows},
        "worker_cpu_change_pct": 100 * (med("on", "worker_ms") / med("off", "worker_ms") - 1),
        "worker_cpu_change_pct_by_round": {
            "median": 100 * (statistics.median(by_round) - 1),
            "mean": 100 * (statistics.fmean(by_round) - 1),
        },
        "endpoint_reuse": sum(r.get("endpoint_reuse", 0) for r in runs),
        "all_committed_once": all(r.get("all_committed_once", True) for r in runs),
    }


@contextmanager
def standalone_ctx(prefix: str, concurrency: int) -> Iterator[Ctx]:
    """A ``Ctx`` for running one bench module on its own: a temporary work
    directory and token endpoint (closed on the way out), fsync everysec,
    progress lines stamped with the seconds since the start."""
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        endpoint = Endpoint(work)
        try:
            yield Ctx(out=work, work=work, endpoint=endpoint, fsync="everysec",
                      concurrency=concurrency, log=log)  # fmt: skip
        finally:
            endpoint.close()
