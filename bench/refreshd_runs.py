"""refreshd's scenarios: catch-up (1..K processes), steady state, memory."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from bench.infra import Endpoint, RefreshdWorker, start_valkey
from bench.measure import Snapshot, catch_up_result, steady_size, steady_window, used_memory
from bench.seed import arm, cred_ids, read_commits, seed_refreshd

__all__ = ["Ctx", "catch_up", "steady", "wait_caught_up"]


@dataclass
class Ctx:
    out: Path
    work: Path
    endpoint: Endpoint
    fsync: str
    concurrency: int
    log: Any  # callable(str)
    profile: bool = False
    arq_python: str = ""
    arq_http: str = "aiohttp"


def _wait(
    predicate: Any, *, within: float, what: str | Callable[[], str], poll: float = 0.05
) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"timed out after {within:.0f}s waiting for {what() if callable(what) else what}"
            )
        time.sleep(poll)


def wait_caught_up(ctx: Ctx, workers: RefreshdWorker, n: int) -> None:
    """Until the endpoint has seen ``n`` refreshes (the workers still alive)
    and the workers have committed them: the end of every catch-up, on one
    server or a cluster, so both time the same thing."""

    def endpoint_done() -> bool:
        workers.check_alive()
        return int(ctx.endpoint.stats()["refreshes"]) >= n

    _wait(endpoint_done, within=max(60.0, n / 100),
          what=lambda: f"the endpoint to see every refresh ({ctx.endpoint.stats()['refreshes']}"
          f" of {n})")  # fmt: skip
    _wait(lambda: workers.refreshed_total() >= n, within=30, what="the last commits")


def catch_up(ctx: Ctx, n: int, processes: int = 1, *, tag: str = "") -> dict[str, Any]:
    """N credentials all due at once; ``processes`` workers; until every one
    is refreshed and committed."""
    name = f"catchup-{processes}p{tag}"
    work = ctx.work / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    server = start_valkey(work / "redis", fsync=ctx.fsync)
    workers = RefreshdWorker(work)
    try:
        ctx.endpoint.reset(expires_in=3600)
        ids = cred_ids(n)
        mem0 = used_memory(server)
        seed_s = anyio.run(seed_refreshd, server.url, ids, ctx.endpoint.url, name,
                           backend="asyncio")  # fmt: skip
        mem_seeded = used_memory(server)
        ctx.log(f"  seeded {n} credentials in {seed_s:.1f}s")
        workers.start(server.url, processes, concurrency=ctx.concurrency)
        time.sleep(0.5)
        before = Snapshot.take(workers, server, ctx.endpoint.pid)
        profiler = _start_profiler(ctx, workers, work) if ctx.profile else None
        due = int(time.time() * 1000)
        armed_ms = anyio.run(arm, server.url, ids, lambda _i: due, backend="asyncio")
        wait_caught_up(ctx, workers, n)
        after = Snapshot.take(workers, server, ctx.endpoint.pid)
        profile = _stop_profiler(profiler, work) if profiler else None
        ep = ctx.endpoint.stats()
        commits = anyio.run(read_commits, server.url, ids, backend="asyncio")
        workers.stop()
        mem_refreshed = used_memory(server)
    finally:
        workers.stop()
        server.stop()
    result = catch_up_result("refreshd", n, commits=commits, before=before, after=after,
                             endpoint=ep, armed_ms=armed_ms, seed_s=seed_s,
                             memory=(mem0, mem_seeded, mem_refreshed))  # fmt: skip
    result |= {"processes": processes, "concurrency_per_process": ctx.concurrency}
    if profile is not None:
        result["profile"] = profile
    return result


def steady(ctx: Ctx, rate: float, seconds: float, *, lifetime_s: int = 20) -> dict[str, Any]:
    """Offered load ``rate``/s for ``seconds``: credentials whose tokens live
    ``lifetime_s``, so each is refreshed about every ``lifetime_s/2`` seconds
    under the default lead rule; their first due times are spread evenly over
    one period. Lag = refresh start - due, measured for every refresh."""
    name = "steady"
    work = ctx.work / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    period, n = steady_size(rate, lifetime_s)
    server = start_valkey(work / "redis", fsync=ctx.fsync)
    workers = RefreshdWorker(work)
    try:
        ctx.endpoint.reset(expires_in=lifetime_s)
        ids = cred_ids(n)
        seed_s = anyio.run(seed_refreshd, server.url, ids, ctx.endpoint.url, name,
                           backend="asyncio")  # fmt: skip
        ctx.log(f"  seeded {n} credentials in {seed_s:.1f}s")
        workers.start(server.url, 1, concurrency=ctx.concurrency)
        time.sleep(0.5)

        def arm_at(due_of: Callable[[int], int]) -> None:
            anyio.run(arm, server.url, ids, due_of, backend="asyncio")

        return steady_window("refreshd", workers=workers, server=server, endpoint=ctx.endpoint,
                             n=n, period_s=period, lifetime_s=lifetime_s, seconds=seconds,
                             arm=arm_at)  # fmt: skip
    finally:
        workers.stop()
        server.stop()


def _start_profiler(ctx: Ctx, workers: RefreshdWorker, work: Path) -> Any:
    import subprocess
    import sys

    spy = Path(sys.executable).with_name("py-spy")
    out = work / "profile.raw.txt"
    argv = [str(spy), "record", "--pid", str(workers.pids[0]), "--rate", "250",
            "--format", "raw", "--output", str(out), "--nonblocking"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, out


def _stop_profiler(profiler: Any, work: Path) -> dict[str, Any]:
    import signal

    from bench.profile import top_functions

    proc, out = profiler
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    return top_functions(out)
