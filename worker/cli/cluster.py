"""`refreshd cluster balance`: the partitions spread evenly over a Redis Cluster's primaries."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from redis import exceptions as redis_errors

from worker.cli.common import bounded, emit, load_settings
from worker.cli.progress import Progress
from worker.cluster import CLUSTER_SCHEMES, ClusterRouter, parse_cluster_url, router_of
from worker.clusterbalance import (
    balanced,
    migrate_auth,
    move_slot,
    plan_moves,
    read_view,
    spread_after,
)
from worker.errors import ConfigError, Conflict
from worker.keyring import codec_from_settings
from worker.keys import Keyspace
from worker.redisio import connect
from worker.store import Store

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cluster",
        help="Redis Cluster: `balance` moves partition slots until every primary owns an "
        "even share of the partitions, online (admin commands: run as an admin user)",
    )
    csub = p.add_subparsers(dest="cluster_command", required=True, metavar="{balance}")
    b = csub.add_parser(
        "balance",
        help="move the fewest partition slots (CLUSTER SETSLOT, MIGRATE) from the busiest "
        "primaries to the idlest until each owns floor or ceil(partitions / primaries); "
        "workers keep running; prints the moves and a JSON summary",
    )
    b.add_argument("--dry-run", action="store_true",
                   help="print the plan as JSON and change nothing")  # fmt: skip
    b.add_argument(
        "--batch-keys",
        type=bounded(int, 1, 10_000),
        default=100,
        metavar="N",
        help="keys per MIGRATE (default 100)",
    )
    b.add_argument(
        "--timeout",
        type=bounded(float, 0.1, 600),
        default=10.0,
        metavar="SECONDS",
        help="MIGRATE's timeout: the longest the source waits on the target (default 10)",
    )
    b.set_defaults(handler=_balance)


async def _balance(args: argparse.Namespace) -> int:
    settings = load_settings()
    url = settings.redis_url
    if not url or not url.lower().startswith(CLUSTER_SCHEMES):
        where = "is not set (the embedded server)" if not url else "is not a cluster URL"
        raise ConfigError(
            f"cluster balance needs a Redis Cluster: REFRESHD_REDIS_URL {where}; "
            "use redis+cluster://host:port[,host:port...]"
        )
    # the client waits for a whole MIGRATE batch: longer than its own timeout
    async with connect(url, max_connections=4, socket_timeout=args.timeout + 10) as client:
        router = router_of(client)
        assert router is not None  # a cluster URL makes a cluster client
        store = Store(client, Keyspace(settings.prefix, settings.partitions),
                      codec_from_settings(settings))  # fmt: skip
        try:
            await store.check_layout()  # the partition count the data was written with
            summary = await _plan_and_move(router, store.keys, args, url)
        except redis_errors.NoPermissionError as exc:
            raise Conflict(
                "cluster balance needs admin commands (CLUSTER NODES, CLUSTER SETSLOT, "
                "MIGRATE): run it as the default or an admin Redis user, not "
                f"refreshd-operator ({str(exc).splitlines()[0][:160]})"
            ) from None
    emit(summary)
    return 0


async def _plan_and_move(
    router: ClusterRouter, keys: Keyspace, args: argparse.Namespace, url: str
) -> dict[str, Any]:
    """The plan (``--dry-run``, or nothing to do), else the moves made: a
    progress line each on a terminal, then the spread re-read."""
    view = await read_view(router, keys)
    moves = plan_moves(view)
    before = view.spread()
    if args.dry_run or not moves:
        if not moves:
            even = "already even" if balanced(before) else "as even as their slots allow"
            spread = "/".join(str(n) for n in before.values())
            print(f"refreshd: the partitions are {even} over the primaries ({spread})",
                  file=sys.stderr)  # fmt: skip
        return {
            "partitions_by_primary": before,
            "moves": [m.to_json() for m in moves],
            "after": spread_after(before, moves),
            "dry_run": bool(args.dry_run),
        }
    auth = migrate_auth(parse_cluster_url(url).auth)
    done: list[dict[str, Any]] = []
    for n, move in enumerate(moves, 1):
        what = (f"move {n}/{len(moves)}: partition {move.partitions[0]} (slot {move.slot}) "
                f"{move.source} -> {move.target}")  # fmt: skip
        progress = Progress(what, move.keys or None, unit="keys")
        started = time.monotonic()
        try:
            moved = await move_slot(router, view, move, batch_keys=args.batch_keys,
                                    timeout_ms=int(args.timeout * 1000), auth=auth,
                                    on_keys=progress.advance)  # fmt: skip
        finally:
            progress.close()
        seconds = round(time.monotonic() - started, 3)
        done.append(move.to_json() | {"keys": moved, "seconds": seconds})
    after = (await read_view(router, keys)).spread()
    return {"before": before, "moves": done, "partitions_by_primary": after}
