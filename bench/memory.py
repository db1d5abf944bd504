"""Redis memory per scheduled credential: refreshd's layout against a plain
hash per credential plus a due-time sorted set (the smallest thing a
do-it-yourself scheduler could keep)."""

from __future__ import annotations

import time
from typing import Any

import anyio

from bench.measure import used_memory
from bench.refreshd_runs import Ctx
from bench.seed import cred_ids, seed_refreshd
from bench.shared import seed_tokens
from tests.redis_server import RedisServer

__all__ = ["memory"]


def _plain_hashes(server: RedisServer, ids: list[str]) -> None:
    with server.client() as c:
        for start in range(0, len(ids), 2000):
            pipe = c.pipeline(transaction=False)
            due = {}
            for i in range(start, min(start + 2000, len(ids))):
                access, refresh = seed_tokens(i)
                pipe.hset(f"plain:cred:{ids[i]}", mapping={"access_token": access,
                          "refresh_token": refresh, "expires_at": 1795000000000 + i})  # fmt: skip
                due[ids[i]] = 1795000000000 + i
            pipe.zadd("plain:due", due)
            pipe.execute()


def memory(ctx: Ctx, n: int) -> dict[str, Any]:
    from bench.infra import fresh_valkey

    results: dict[str, Any] = {"scenario": "memory", "credentials": n}
    for layout in ("refreshd", "plain_hash"):
        server = fresh_valkey(ctx.work / f"memory-{layout}", fsync=ctx.fsync)
        try:
            ids = cred_ids(n)
            before = used_memory(server)
            if layout == "refreshd":
                seconds = anyio.run(seed_refreshd, server.url, ids, ctx.endpoint.url, "memory",
                                    backend="asyncio")  # fmt: skip
            else:
                started = time.perf_counter()
                _plain_hashes(server, ids)
                seconds = time.perf_counter() - started
            after = used_memory(server)
            with server.client() as c:
                sample = c.keys("*cred:c0000001")[0]
                kind = c.type(sample).decode()
                encoding = c.object("encoding", sample).decode()
                # a hash's field count, or a packed record's size
                shape = f"{c.hlen(sample)} fields" if kind == "hash" else f"{c.strlen(sample)} B"
        finally:
            server.stop()
        access, refresh = seed_tokens(1)
        results[layout] = {
            "bytes_per_credential": (after - before) / n,
            "token_bytes": len(access) + len(refresh),
            "type": kind,
            "encoding": encoding,
            "shape": shape,
            "seed_s": seconds,
        }
        ctx.log(f"  {layout}: {(after - before) / n:.0f} B per credential ({kind}, {encoding}, "
                f"{shape}), seeded in {seconds:.1f}s")  # fmt: skip
    return results
