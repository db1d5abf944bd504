"""`python -m bench`: refreshd against the do-it-yourself alternative (arq).

Starts its own Valkey servers (AOF on, as in production) and its own token
endpoint on 127.0.0.1, runs real worker processes, and writes
``results.json``, ``results.md`` and ``bench.png`` under ``--out``.

    python -m bench                 # the full run (~7 min on 2 cores)
    python -m bench --quick         # CI smoke run (< 1 min)
    python -m bench --scenarios catchup,arq

Besides the head-to-head scenarios, two measure what consumers see:
``client_read`` (a token read through ``worker.client``, p50/p99 on
loopback; ``bench.client_read``) and ``eventlog`` (events per second one
consumer follows from the log, and the catch-up with the log off and on:
worker CPU per refresh, Redis bytes per retained event; ``bench.eventlog_ab``).
``encryption`` runs the catch-up without and with a key ring, alternately,
and seeds credentials with 900 B of random tokens each way: worker CPU per
refresh and Redis bytes per credential (``bench.encryption_ab``, whose own
command takes more rounds). ``cluster`` runs the catch-up on a 3-shard Valkey Cluster (a replica per
primary), on one server and on a primary with a replica, interleaved, and
reads every node's CPU from INFO: Redis CPU per refresh per shard
(``bench.cluster_runs``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.infra import REPO, Endpoint
from bench.refreshd_runs import Ctx
from bench.shared import positive_int
from worker.settings import Settings

ALL = ("calibrate", "catchup", "scaleout", "steady", "memory", "arq", "client_read", "eventlog",
       "encryption", "cluster")  # fmt: skip
ARQ_REQUIREMENTS = REPO / "bench" / "requirements-arq.txt"


def _machine(fsync: str) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from tests.redis_server import server_binary

    version = subprocess.run([server_binary(), "--version"], capture_output=True, text=True,
                             check=False).stdout.split()  # fmt: skip
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "redis": " ".join(version[:3]) + f", appendonly yes, appendfsync {fsync}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def ensure_arq_python(path: str | None, log: Any) -> str:
    """arq needs redis<6; refreshd pins redis 8. arq gets its own venv."""
    if path:
        return path
    venv = REPO / ".venv" / "arq"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.exists() or stamp.stat().st_mtime < ARQ_REQUIREMENTS.stat().st_mtime:
        log(f"creating arq's virtualenv in {venv} (arq needs redis<6)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r",
                        str(ARQ_REQUIREMENTS)], check=True)  # fmt: skip
        stamp.touch()
    return str(python)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a CI smoke run")
    p.add_argument("--scenarios", default=",".join(ALL), help=f"comma list of {', '.join(ALL)}")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument(
        "--credentials", type=positive_int, help="catch-up size (default 20,000; quick 1,000)"
    )
    p.add_argument("--memory-credentials", type=positive_int, help="default 100,000; quick 5,000")
    p.add_argument(
        "--cluster-credentials",
        type=positive_int,
        help="cluster scenario's catch-up size (default 20,000; quick 1,000)",
    )
    p.add_argument("--steady-seconds", type=float, help="default 60; quick 6")
    p.add_argument(
        "--steady-rate",
        type=float,
        help="offered load per second (default: half the catch-up rate)",
    )
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=Settings().concurrency,
        help="REFRESHD_CONCURRENCY, and arq's max_jobs (default: refreshd's default, "
        f"{Settings().concurrency})",
    )
    p.add_argument(
        "--fsync",
        choices=["everysec", "always"],
        default="everysec",
        help="Valkey appendfsync (default everysec, the usual production setting)",
    )
    p.add_argument("--processes", default="1,2,4", help="scale-out process counts")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the 1-process catch-up worker (top functions in the JSON)",
    )
    p.add_argument("--arq-python", help="a python with arq installed (default: .venv/arq)")
    p.add_argument("--work", type=Path, help="keep servers' data and process logs here")
    p.add_argument("--repeat", type=int, default=0,
                   help="catch-up runs of refreshd and arq, interleaved; the median is "
                   "reported (default 3; quick 1)")  # fmt: skip
    p.add_argument("--arq-http", choices=["aiohttp", "httpx"], default="aiohttp",
                   help="the alternative's HTTP client: aiohttp directly, as refreshd "
                   "(default), or httpx on the aiohttp transport")  # fmt: skip
    args = p.parse_args(argv)

    q = args.quick
    n = args.credentials or (1000 if q else 20_000)
    mem_n = args.memory_credentials or (5000 if q else 100_000)
    steady_s = args.steady_seconds or (6.0 if q else 60.0)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(ALL)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    procs = [int(x) for x in args.processes.split(",")] if not q else [1, 2]
    if args.repeat < 0:
        p.error("--repeat must be 1 or more")
    reps = args.repeat or (1 if q else 3)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    arq_python = ensure_arq_python(args.arq_python, log) if "arq" in scenarios else ""
    results: dict[str, Any] = {"machine": _machine(args.fsync), "quick": q, "runs": {}}
    runs = results["runs"]
    with tempfile.TemporaryDirectory(prefix="refreshd-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        endpoint = Endpoint(work)
        ctx = Ctx(out=args.out, work=work, endpoint=endpoint, fsync=args.fsync,
                  concurrency=args.concurrency, log=log, profile=args.profile,
                  arq_python=arq_python, arq_http=args.arq_http)  # fmt: skip
        try:
            from bench import arq_runs, calibrate, memory, refreshd_runs

            if "calibrate" in scenarios:
                log("calibrate: reference costs on this machine")
                runs["calibrate"] = calibrate.calibrate(
                    ctx, requests=100 if q else 1000, rounds=5 if q else 20
                )
                measured = runs["calibrate"]["measured_ms"]
                log(f"  CPU ms: {json.dumps({k: round(v, 3) for k, v in measured.items()})}")
            head_to_head(ctx, runs, scenarios, n=n, repeat=reps, max_jobs=args.concurrency)
            if "scaleout" in scenarios:
                for k in procs:
                    if k == 1:
                        continue
                    log(f"scale-out: {n:,} credentials, {k} refreshd processes")
                    ctx.profile = False
                    runs[f"catch_up_{k}p"] = refreshd_runs.catch_up(ctx, n, k)
                    log("  " + _line(runs[f"catch_up_{k}p"]))
            if "steady" in scenarios:
                cap = runs.get("catch_up_1p", {}).get("refreshes_per_s")
                rate = args.steady_rate or (0.5 * cap if cap else 100.0)
                log(f"steady state: {rate:,.0f} refreshes/s offered for {steady_s:.0f}s")
                runs["steady"] = refreshd_runs.steady(ctx, rate, steady_s)
                log("  " + _line(runs["steady"]))
                if "arq" in scenarios:
                    arq_cap = runs["catch_up_arq"]["refreshes_per_s"]
                    arq_rate = args.steady_rate or 0.5 * arq_cap
                    log(f"arq steady state: {arq_rate:,.0f}/s offered for {steady_s:.0f}s")
                    runs["steady_arq"] = arq_runs.steady_arq(ctx, arq_rate, steady_s)
                    log("  " + _line(runs["steady_arq"]))
            if "memory" in scenarios:
                log(f"memory: {mem_n:,} scheduled credentials")
                runs["memory"] = memory.memory(ctx, mem_n)
            consumer_rows(ctx, runs, scenarios, n=n, quick=q)
            if "encryption" in scenarios:
                encryption_rows(ctx, runs, n=n, quick=q)
            if "cluster" in scenarios:
                from bench import cluster_runs

                ctx.profile = False
                cluster_n = args.cluster_credentials or (1000 if q else 20_000)
                runs["cluster"] = cluster_runs.cluster_scenario(ctx, cluster_n, reps)
        finally:
            endpoint.close()
    results["seconds"] = time.monotonic() - started
    md = "\n".join([
        f"Machine: {results['machine']['cpus']} x {results['machine']['cpu_model']}, "
        f"Python {results['machine']['python']}, {results['machine']['redis']}; "
        f"concurrency {args.concurrency}; {results['machine']['date']}"
        + (" (--quick)" if q else "")
        + f"; CPU stolen by the hypervisor in timed windows: up to {_max_steal(runs):.0f}%"
        + f"; other load on the machine: up to {_max_other(runs):.2f} cores",
        "",
        _report_table(results),
    ])  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(md + "\n")
    print()
    print(md)
    png = _report_plot(results, args.out / "bench.png")
    print()
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}"
          + (f", {png}" if png else " (no matplotlib: no plot)"))  # fmt: skip
    log("done")
    bad = [k for k, v in runs.items() if isinstance(v, dict) and (v.get("endpoint_reuse") or
           v.get("all_committed_once") is False)]  # fmt: skip
    if bad:
        print(f"FAILED: refresh token reuse or lost commits in {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def head_to_head(
    ctx: Ctx, runs: dict[str, Any], scenarios: list[str], *, n: int, repeat: int, max_jobs: int
) -> None:
    """The catch-up of refreshd (1 process) and of arq, ``repeat`` times,
    interleaved: this VM's speed drifts by half within minutes, so runs
    taken one after the other compare like with like, and the median of
    each side (the run itself, all its figures) is what the table shows.
    Every run's rate is kept in ``catch_up_repeats``."""
    from bench import arq_runs, refreshd_runs

    ours = "catchup" in scenarios or "scaleout" in scenarios
    theirs = "arq" in scenarios
    done: dict[str, list[dict[str, Any]]] = {"refreshd": [], "arq": []}
    for i in range(repeat):
        of = f" ({i + 1} of {repeat})" if repeat > 1 else ""
        if ours:
            ctx.log(f"catch-up: {n:,} credentials due now, 1 refreshd process{of}")
            done["refreshd"].append(refreshd_runs.catch_up(ctx, n, 1, tag=f"-{i}" if i else ""))
            ctx.log("  " + _line(done["refreshd"][-1]))
            ctx.profile = False  # py-spy the first run only
        if theirs:
            ctx.log(f"arq: catch-up of {n:,} credentials, max_jobs={max_jobs}{of}")
            done["arq"].append(arq_runs.catch_up_arq(ctx, n, tag=f"-{i}" if i else ""))
            ctx.log("  " + _line(done["arq"][-1]))
    for who, key in (("refreshd", "catch_up_1p"), ("arq", "catch_up_arq")):
        if done[who]:
            runs[key] = median_run(done[who])
    if done["refreshd"] and "profile" in done["refreshd"][0]:
        runs["catch_up_1p"]["profile"] = done["refreshd"][0]["profile"]
    every = done["refreshd"] + done["arq"]
    runs["catch_up_repeats"] = {
        **{who: [r["refreshes_per_s"] for r in rs] for who, rs in done.items()},
        # over every run, not only the medians shown
        "endpoint_reuse": sum(r.get("endpoint_reuse", 0) for r in every),
        "all_committed_once": all(r.get("all_committed_once", True) for r in every),
    }


def consumer_rows(
    ctx: Ctx, runs: dict[str, Any], scenarios: list[str], *, n: int, quick: bool
) -> None:
    """What an application sees: a token read through the client library,
    the rate one consumer follows the event log at, and what the log costs
    the catch-up (log off and on, alternating; medians)."""
    from bench import client_read, eventlog_ab

    if "client_read" in scenarios:
        reads, rounds, callers = (2000, 2, 16) if quick else (20_000, 5, 64)
        ctx.log(f"client read: {reads:,} get(id) through worker.client, one at a time")
        res = runs["client_read"] = client_read.run_isolated(
            ctx.work, reads=reads, rounds=rounds, concurrency=callers
        )
        ctx.log(f"  cache off: p50 {res['p50_ms']:.3f} ms, p99 {res['p99_ms']:.3f} ms (rounds: "
                f"{' / '.join(map(str, res['p99_ms_per_round']))}); "
                f"{res['concurrent_reads_per_s']:,}/s from {callers} callers")  # fmt: skip
        if "cached" in res:
            hit = res["cached"]
            ctx.log(f"  cache on: p50 {hit['p50_ms']:.3f} ms, p99 {hit['p99_ms']:.3f} ms, "
                    f"hit ratio {hit['hit_ratio']:.1%}")  # fmt: skip
    if "eventlog" in scenarios:
        events = 10_000 if quick else 100_000
        ctx.log(f"event log: one consumer follows {events:,} events")
        res = runs["eventlog_follow"] = eventlog_ab.follow_rate(ctx.work, events)
        ctx.log(f"  {res['events_per_s']:,.0f} events/s (EventLog.read), "
                f"{res['client_events_per_s']:,.0f}/s through worker.client")  # fmt: skip
        rounds = 1 if quick else 4  # the effect is small: a median of 2 is mostly noise
        ctx.log(f"event log: catch-up of {n:,} credentials, log off and on, {rounds} round(s)")
        ctx.profile = False
        ab = runs["eventlog_ab"] = eventlog_ab.ab_rounds(ctx, n, rounds)
        cpu = ab["worker_cpu_ms_per_refresh"]
        per_event = ab["redis_bytes_per_retained_event"]
        ctx.log(f"  worker CPU ms per refresh off {cpu['off']:.3f}, on {cpu['on']:.3f} "
                f"({ab['worker_cpu_change_pct']:+.1f} %); "
                f"{per_event:,.0f} Redis bytes per retained event")  # fmt: skip


def encryption_rows(ctx: Ctx, runs: dict[str, Any], *, n: int, quick: bool) -> None:
    """Encryption at rest's two targets: worker CPU per refresh with a key
    ring (the catch-up, no ring and one, alternating; medians) and Redis
    bytes per credential with 900 B of random tokens."""
    from bench import encryption_ab

    rounds = 1 if quick else 5  # README "Encryption at rest" quotes its own 30-round run
    ctx.log(f"encryption at rest: catch-up of {n:,} credentials, no key ring and one,"
            f" {rounds} round(s)")  # fmt: skip
    ctx.profile = False
    ab = runs["encryption_ab"] = encryption_ab.ab_rounds(ctx, n, rounds)
    cpu = ab["worker_cpu_ms_per_refresh"]
    ctx.log(f"  worker CPU ms per refresh off {cpu['off']:.3f}, on {cpu['on']:.3f}"
            f" ({ab['worker_cpu_change_pct']:+.1f} %)")  # fmt: skip
    runs["encryption_memory"] = encryption_ab.memory_ab(ctx, 5000 if quick else 20_000)


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (the lower middle one of an even count)."""
    ordered = sorted(results, key=lambda r: r["refreshes_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def _line(r: dict[str, Any]) -> str:
    cpu = r.get("cpu_ms_per_refresh", {})
    lag = r.get("lag", {})
    return (f"{r['refreshes_per_s']:,.0f} refreshes/s; CPU ms/refresh worker "
            f"{cpu.get('worker', 0):.3f} Redis {cpu.get('redis', 0):.3f} endpoint "
            f"{cpu.get('endpoint', 0):.3f}; {r.get('round_trips_per_refresh', 0):.2f} round "
            f"trips/refresh; lag p50 {lag.get('p50_ms', 0):,.1f} p99 {lag.get('p99_ms', 0):,.1f}"
            f" max {lag.get('max_ms', 0):,.1f} ms; reuse {r.get('endpoint_reuse')}; CPU steal "
            f"{r.get('cpu_steal_pct', 0):.1f}%; other load {r.get('other_load_cores', 0):.2f} "
            "cores")  # fmt: skip


def _timed(runs: dict[str, Any]) -> list[dict[str, Any]]:
    """Every timed run, the cluster scenario's kinds included."""
    out = [v for v in runs.values() if isinstance(v, dict)]
    cluster = runs.get("cluster", {})
    return out + [cluster[k] for k in ("single", "replica", "cluster") if k in cluster]


def _max_steal(runs: dict[str, Any]) -> float:
    return max((v.get("cpu_steal_pct", 0.0) for v in _timed(runs)), default=0.0)


def _max_other(runs: dict[str, Any]) -> float:
    return max((v.get("other_load_cores", 0.0) for v in _timed(runs)), default=0.0)


def _report_table(results: dict[str, Any]) -> str:
    from bench.report import table

    return table(results)


def _report_plot(results: dict[str, Any], path: Path) -> Path | None:
    from bench.report import plot

    return plot(results, path)


if __name__ == "__main__":
    sys.exit(main())
