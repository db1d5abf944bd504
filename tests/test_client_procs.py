"""Cross-process single flight: 50 concurrent ``get(id, min_ttl)`` calls from
5 consumer processes on one credential about to expire cause exactly one
provider request, through the workers' claim/spend/commit path, and every
caller gets the new token."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.client_caller import fingerprint
from tests.harness import make_settings, seed, worker_running
from worker.app import open_store
from worker.fakeprovider import FakeProvider, FakeProviderConfig

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
PROCESSES, CALLS = 5, 10


def consumer_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    return env | {"REFRESHD_REDIS_URL": redis_url}


async def read_line(stream: BufferedByteReceiveStream) -> str:
    return (await stream.receive_until(b"\n", 1 << 20)).decode()


async def test_fifty_callers_in_five_processes_cause_one_provider_request(
    redis_url: str,
) -> None:
    settings = make_settings(redis_url)
    config = FakeProviderConfig(lifetime_s=3600, rotate=True, revoke_on_reuse=True)
    async with FakeProvider(config) as fake, open_store(settings) as store:
        # 20 s left: every caller's min_ttl of 60 s needs a refresh, and the
        # workers' own schedule (10 s before expiry) is later than the test
        grants = await seed(store, fake, 1, expires_in=20)
        grant = grants["cred-00000"]
        async with worker_running(settings, count=2):
            argv = [
                sys.executable,
                "-m",
                "tests.client_caller",
                "cred-00000",
                str(CALLS),
                "60",
                "20",
            ]
            procs: list[Process] = []
            try:
                for _ in range(PROCESSES):
                    procs.append(
                        await anyio.open_process(argv, cwd=ROOT, env=consumer_env(redis_url))
                    )
                outs = [BufferedByteReceiveStream(p.stdout) for p in procs if p.stdout]
                with anyio.fail_after(30):
                    for out in outs:
                        assert await read_line(out) == "ready"
                    assert fake.stats.requests == 0
                    for proc in procs:
                        assert proc.stdin is not None
                        await proc.stdin.send(b"go\n")
                    results = [json.loads(await read_line(out)) for out in outs]
                    for proc in procs:
                        assert await proc.wait() == 0
            finally:
                for proc in procs:
                    if proc.returncode is None:
                        proc.kill()
                    await proc.aclose()
        state = fake.grant_state(grant.grant_id)
        calls = [call for result in results for call in result]
        assert len(calls) == PROCESSES * CALLS
        assert calls == [{"version": 1, "token": fingerprint(state.access_token)}] * len(calls)
        assert fake.stats.requests == 1
        assert state.refreshes == 1
        assert max(fake.send_counts.values()) == 1
        assert fake.stats.reuse_events == []
        cred = await store.get("cred-00000")
        assert cred.version == 1
        assert cred.expires_at_ms / 1000 - 3500 > cred.updated_at_ms / 1000
