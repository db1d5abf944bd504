"""`refreshd run|demo|status|watch|server`."""

from __future__ import annotations

import argparse
import time

import anyio

from worker.app import open_store, run_worker, tune_gc
from worker.cli.common import bounded, emit, human_number, load_settings, table
from worker.cli.watch import add_parser as add_watch_parser
from worker.embedded import embedded_info, stop_embedded

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the worker until SIGTERM/SIGINT")
    p.set_defaults(handler=_run)

    p = sub.add_parser(
        "demo",
        help="run the whole system against a built-in strict token endpoint and report",
    )
    _demo_options(p)
    p.add_argument("--keep", action="store_true", help="keep the demo's data afterwards")
    p.set_defaults(handler=_demo)

    p = sub.add_parser("status", help="counts by status, backlog, next due")
    p.add_argument("--table", action="store_true", help="a table instead of JSON")
    p.set_defaults(handler=_status)

    add_watch_parser(sub)

    p = sub.add_parser(
        "server",
        help="the embedded Valkey server: `info` (how a consumer connects; password "
        "only with --show-password), `stop`",
    )
    p.add_argument("action", choices=["info", "stop"])
    p.add_argument(
        "--show-password",
        action="store_true",
        help="info: print the URL with its password (it grants every token)",
    )
    p.set_defaults(handler=_server)


def _demo_options(p: argparse.ArgumentParser) -> None:
    from worker.demo import LIMITS

    def limits(name: str) -> str:
        low, high = LIMITS[name]
        return f"{human_number(low)} to {human_number(high)}"

    p.add_argument(
        "--credentials",
        type=bounded(int, *LIMITS["credentials"]),
        default=2000,
        help=f"how many ({limits('credentials')}; default 2000)",
    )
    p.add_argument(
        "--lifetime",
        type=bounded(float, *LIMITS["lifetime_s"]),
        default=20.0,
        help=f"access token lifetime in seconds ({limits('lifetime_s')}; default 20)",
    )
    p.add_argument(
        "--duration",
        type=bounded(float, *LIMITS["duration_s"]),
        default=30.0,
        help=f"seconds to run ({limits('duration_s')}; default 30)",
    )
    p.add_argument("--workers", type=bounded(int, *LIMITS["workers"]), default=2,
                   help=f"workers racing over the same credentials ({limits('workers')}; "
                   "default 2)")  # fmt: skip


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
        spread = store.partitions_by_node()
    by_status = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("status:")}
    by_profile = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("profile:")}
    failing = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("failing:")}
    summary = {
            "credentials": sum(by_status.values()),
            "by_status": {k: v for k, v in sorted(by_status.items()) if v},
            "by_profile": {k: v for k, v in sorted(by_profile.items()) if v},
            "failing_by_reason": {k: v for k, v in sorted(failing.items()) if v},
            "scheduled": scheduled,
            "backlog": backlog,
            "next_due_ms": earliest,
            "next_due_in_s": None if earliest is None else round((earliest - now_ms) / 1000, 3),
    }  # fmt: skip
    if spread is not None:  # a cluster: how evenly the partitions fall on the primaries
        summary["partitions_by_primary"] = spread
    if args.table:
        rows = [{"what": "credentials", "value": summary["credentials"]}]
        for group in ("by_status", "by_profile", "failing_by_reason"):
            counts: dict[str, int] = summary[group]  # type: ignore[assignment]
            rows += [{"what": f"{group}.{key}", "value": n} for key, n in counts.items()]
        rows += [{"what": key, "value": summary[key]}
                 for key in ("scheduled", "backlog", "next_due_ms", "next_due_in_s")]  # fmt: skip
        rows += [{"what": f"partitions_by_primary.{node}", "value": n}
                 for node, n in (spread or {}).items()]  # fmt: skip
        table(rows, ["what", "value"])
    else:
        emit(summary)
    return 0


async def _server(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.action == "info":
        info = await anyio.to_thread.run_sync(embedded_info, settings.data_dir)
        emit(info.public(show_password=args.show_password))
        return 0
    stopped = await anyio.to_thread.run_sync(stop_embedded, settings.data_dir)
    emit({"stopped": stopped, "data_dir": str(settings.data_dir)})
    return 0
