"""`refreshd run|demo|status|watch|server`."""

from __future__ import annotations

import argparse
import time

import anyio

from worker.app import open_store, run_worker, tune_gc
from worker.cli.common import emit, load_settings
from worker.cli.watch import add_parser as add_watch_parser
from worker.embedded import stop_embedded

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the worker until SIGTERM/SIGINT")
    p.set_defaults(handler=_run)

    p = sub.add_parser(
        "demo",
        help="run the whole system against a built-in strict token endpoint and report",
    )
    p.add_argument("--credentials", type=int, default=2000, help="how many (default 2000)")
    p.add_argument("--lifetime", type=float, default=20.0,
                   help="access token lifetime in seconds (default 20)")  # fmt: skip
    p.add_argument("--duration", type=float, default=30.0, help="seconds to run (default 30)")
    p.add_argument(
        "--workers", type=int, default=2, help="workers racing over the same credentials"
    )
    p.add_argument("--keep", action="store_true", help="keep the demo's data afterwards")
    p.set_defaults(handler=_demo)

    p = sub.add_parser("status", help="counts by status, backlog, next due")
    p.set_defaults(handler=_status)

    add_watch_parser(sub)

    p = sub.add_parser("server", help="the embedded Valkey server")
    p.add_argument("action", choices=["stop"])
    p.set_defaults(handler=_server)


async def _run(args: argparse.Namespace) -> int:
    settings = load_settings(log_to_stderr=False)  # the worker logs to stdout
    tune_gc()
    await run_worker(settings)
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from worker.demo import DemoOptions, run_demo

    settings = load_settings()
    options = DemoOptions(
        credentials=args.credentials,
        lifetime_s=args.lifetime,
        duration_s=args.duration,
        workers=args.workers,
        keep=args.keep,
    )
    return await run_demo(settings, options)


async def _status(args: argparse.Namespace) -> int:
    settings = load_settings()
    # read-only: an unsafe Redis is named on stderr, not refused (the operator may be
    # looking into the RefreshdRedisUnsafe alert)
    async with open_store(settings, refuse_unsafe=False) as store:
        now_ms = int(time.time() * 1000)
        counters = await store.counters()
        backlog, scheduled, earliest = await store.schedule_stats(now_ms)
    by_status = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("status:")}
    by_profile = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("profile:")}
    failing = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("failing:")}
    emit(
        {
            "credentials": sum(by_status.values()),
            "by_status": {k: v for k, v in sorted(by_status.items()) if v},
            "by_profile": {k: v for k, v in sorted(by_profile.items()) if v},
            "failing_by_reason": {k: v for k, v in sorted(failing.items()) if v},
            "scheduled": scheduled,
            "backlog": backlog,
            "next_due_ms": earliest,
            "next_due_in_s": None if earliest is None else round((earliest - now_ms) / 1000, 3),
        }
    )
    return 0


async def _server(args: argparse.Namespace) -> int:
    settings = load_settings()
    stopped = await anyio.to_thread.run_sync(stop_embedded, settings.data_dir)
    emit({"stopped": stopped, "data_dir": str(settings.data_dir)})
    return 0
