"""The arq alternative's scenarios: catch-up and steady state, on the same
endpoint, the same Valkey configuration and the same offered load."""

from __future__ import annotations

import shutil
import time
from typing import Any

from bench.infra import ArqWorker, run_json, start_valkey
from bench.measure import Snapshot, catch_up_result, steady_size, steady_window, used_memory
from bench.refreshd_runs import Ctx, _wait
from bench.seed import cred_ids
from bench.shared import ARQ_CRED as CRED
from bench.shared import ARQ_QUEUE as QUEUE
from bench.shared import arq_job_id as job_id

__all__ = ["catch_up_arq", "steady_arq"]


def _arm(server: Any, ids: list[str], due_of: Any) -> int:
    with server.client() as c:
        pipe = c.pipeline(transaction=False)
        for start in range(0, len(ids), 5000):
            pipe.zadd(QUEUE, {job_id(i, 0): due_of(k) for k, i in
                              enumerate(ids[start : start + 5000], start)}, xx=True)  # fmt: skip
        pipe.time()
        *_, (secs, micros) = pipe.execute()
    return int(secs) * 1000 + int(micros) // 1000


def _read(server: Any, ids: list[str]) -> list[tuple[int, int]]:
    out = []
    with server.client() as c:
        for start in range(0, len(ids), 5000):
            pipe = c.pipeline(transaction=False)
            for i in ids[start : start + 5000]:
                pipe.hmget(CRED + i, ["version", "refreshed_at"])
            out += [(int(v or 0), int(t or 0)) for v, t in pipe.execute()]
    return out


def _seed(ctx: Ctx, server: Any, n: int, tag: str) -> float:
    res = run_json([ctx.arq_python, "-m", "bench.alt_arq", "seed", "--redis", server.url,
                    "--count", str(n), "--tag", tag])  # fmt: skip
    return float(res["seconds"])


def catch_up_arq(ctx: Ctx, n: int, *, tag: str = "") -> dict[str, Any]:
    """``tag`` keeps repeated runs' seed tokens apart (the endpoint accepts
    each refresh token once)."""
    work = ctx.work / f"catchup-arq{tag}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    server = start_valkey(work / "redis", fsync=ctx.fsync)
    workers = ArqWorker(work)
    try:
        ctx.endpoint.reset(expires_in=3600)
        ids = cred_ids(n)
        mem0 = used_memory(server)
        seed_s = _seed(ctx, server, n, f"arq-catchup{tag}")
        mem_seeded = used_memory(server)
        ctx.log(f"  seeded {n} credentials and jobs in {seed_s:.1f}s")
        workers.start(server.url, 1, python=ctx.arq_python, token_url=ctx.endpoint.url,
                      max_jobs=ctx.concurrency, http=ctx.arq_http)  # fmt: skip
        before = Snapshot.take(workers, server, ctx.endpoint.pid)
        due = int(time.time() * 1000)
        armed_ms = _arm(server, ids, lambda _k: due)

        def endpoint_done() -> bool:
            workers.check_alive()
            return int(ctx.endpoint.stats()["refreshes"]) >= n

        _wait(endpoint_done, within=max(120.0, n / 50), what="arq to refresh every credential")
        _wait(lambda: sum(v for v, _ in _read(server, ids)) >= n, within=30, what="arq commits",
              poll=0.2)  # fmt: skip
        after = Snapshot.take(workers, server, ctx.endpoint.pid)
        ep = ctx.endpoint.stats()
        commits = _read(server, ids)
        workers.stop()
        mem_refreshed = used_memory(server)
    finally:
        workers.stop()
        server.stop()
    result = catch_up_result("arq", n, commits=commits, before=before, after=after, endpoint=ep,
                             armed_ms=armed_ms, seed_s=seed_s,
                             memory=(mem0, mem_seeded, mem_refreshed))  # fmt: skip
    return {**result, "processes": 1, "max_jobs": ctx.concurrency}


def steady_arq(ctx: Ctx, rate: float, seconds: float, *, lifetime_s: int = 20) -> dict[str, Any]:
    work = ctx.work / "steady-arq"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    period, n = steady_size(rate, lifetime_s)
    server = start_valkey(work / "redis", fsync=ctx.fsync)
    workers = ArqWorker(work)
    try:
        ctx.endpoint.reset(expires_in=lifetime_s)
        ids = cred_ids(n)
        seed_s = _seed(ctx, server, n, "arq-steady")
        ctx.log(f"  seeded {n} credentials and jobs in {seed_s:.1f}s")
        workers.start(server.url, 1, python=ctx.arq_python, token_url=ctx.endpoint.url,
                      max_jobs=ctx.concurrency, http=ctx.arq_http)  # fmt: skip
        result = steady_window("arq", workers=workers, server=server, endpoint=ctx.endpoint,
                               n=n, period_s=period, lifetime_s=lifetime_s, seconds=seconds,
                               arm=lambda due_of: _arm(server, ids, due_of))  # fmt: skip
    finally:
        workers.stop()
        server.stop()
    result["seed_s"] = seed_s
    return result
