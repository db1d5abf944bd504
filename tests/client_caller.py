"""A consumer process for the client tests: connects with ``REFRESHD_*`` from
its environment, says ``ready``, waits for a line on stdin, then makes
``calls`` concurrent ``get(id, min_ttl=...)`` calls and prints one JSON list:
per call the version and a fingerprint of the token (never the token), or
the error's class name.

    python -m tests.client_caller ID CALLS MIN_TTL TIMEOUT
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import anyio

from worker.client import ClientError, connect


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


async def main(credential_id: str, calls: int, min_ttl: float, timeout_s: float) -> None:
    results: list[dict[str, Any]] = []

    async def one(client: Any) -> None:
        try:
            token = await client.get(credential_id, min_ttl=min_ttl, timeout=timeout_s)
        except ClientError as exc:
            results.append({"error": type(exc).__name__})
        else:
            results.append({"version": token.version, "token": fingerprint(token.access_token)})

    async with connect() as client:
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        async with anyio.create_task_group() as tg:
            for _ in range(calls):
                tg.start_soon(one, client)
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    cred, calls, min_ttl, timeout = sys.argv[1:5]
    anyio.run(main, cred, int(calls), float(min_ttl), float(timeout))
