"""Load for the cluster fault tests: real `refreshd run` processes against a
``redis+cluster://`` URL and a strict provider in the test's event loop, and
the checks every fault test ends with (zero reuse, nothing lost).

The workers are processes (not tasks in the test's loop) so that a test can
freeze them all at one instant (SIGSTOP) and read what the cluster holds
while nothing moves, and so that the test's blocking cluster operations
(run in a thread) never stall the workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from anyio.abc import Process

from worker.errors import StoreUnavailable
from worker.fakeprovider import FakeProvider, IssuedGrant
from worker.logs import fingerprint
from worker.models import Credential, Status
from worker.store import Store

__all__ = [
    "Workers",
    "grants_refreshed",
    "lost_spends",
    "nothing_lost",
    "refresh_counts",
    "wait_refreshed",
]


@dataclass
class Workers:
    procs: list[Process]

    def freeze(self) -> None:
        """SIGSTOP every worker: requests already sent still get their
        answers from the provider, which lands in the frozen sockets."""
        for p in self.procs:
            os.kill(p.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for p in self.procs:
            os.kill(p.pid, signal.SIGCONT)

    def alive(self) -> bool:
        return all(p.returncode is None for p in self.procs)

    @classmethod
    @asynccontextmanager
    async def running(cls, url: str, count: int, **env: str) -> AsyncIterator[Workers]:
        """``count`` `refreshd run` processes with short leases and backoff;
        SIGTERM (after SIGCONT) at the end, each must exit 0 within 30 s."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
        settings = {
            "REFRESHD_REDIS_URL": url,
            "REFRESHD_HTTP_PORT": "0",
            "REFRESHD_LEASE_SECONDS": "10",
            "REFRESHD_SPEND_MARGIN_SECONDS": "0.5",
            "REFRESHD_BACKOFF_BASE_SECONDS": "0.2",
            "REFRESHD_BACKOFF_MAX_SECONDS": "1",
            "REFRESHD_IDLE_WAKEUP_SECONDS": "1",
            "REFRESHD_CONCURRENCY": "64",
            "REFRESHD_LOG_LEVEL": "warning",
        }
        procs: list[Process] = []
        try:
            for n in range(count):
                procs.append(
                    await anyio.open_process(
                        [sys.executable, "-m", "worker", "run"],
                        env=base | settings | {"REFRESHD_WORKER_ID": f"cluster-{n}"} | env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            yield cls(procs)
        finally:
            for p in procs:
                if p.returncode is None:
                    os.kill(p.pid, signal.SIGCONT)
                    p.terminate()
            with anyio.fail_after(30):
                for p in procs:
                    await p.wait()
        codes = [p.returncode for p in procs]
        assert codes == [0] * count, f"workers exited with {codes}"


def refresh_counts(provider: FakeProvider, grants: Mapping[str, IssuedGrant]) -> dict[str, int]:
    return {cid: provider.grant_state(g.grant_id).refreshes for cid, g in grants.items()}


def grants_refreshed(
    provider: FakeProvider, grants: Mapping[str, IssuedGrant], since: Mapping[str, int], times: int
) -> bool:
    """Every grant refreshed at least ``times`` more since ``since``."""
    now = refresh_counts(provider, grants)
    return all(now[cid] >= since.get(cid, 0) + times for cid in grants)


async def wait_refreshed(
    store: Store,
    provider: FakeProvider,
    grants: Mapping[str, IssuedGrant],
    since: Mapping[str, int],
    times: int,
    *,
    within: float,
) -> None:
    """Every grant refreshed ``times`` more since ``since``; on a timeout the
    error says which are behind, in which partitions, in what state."""
    deadline = anyio.current_time() + within
    while not grants_refreshed(provider, grants, since, times):
        if anyio.current_time() > deadline:
            now = refresh_counts(provider, grants)
            behind = [cid for cid in grants if now[cid] < since.get(cid, 0) + times]
            parts = Counter(store.keys.partition_of(cid).index for cid in behind)
            states: Counter[tuple[str | None, bool, str | None]] = Counter()
            for cid in behind[:200]:
                raw = (await _read(store, cid))[1]
                states[(raw.get("status"), bool(raw.get("intent")), raw.get("last_error"))] += 1
            raise AssertionError(
                f"{len(behind)} of {len(grants)} credentials not refreshed {times} more times "
                f"within {within:.0f}s; by partition {dict(parts)}; (status, intent open, "
                f"last error) {dict(states)}"
            )
        await anyio.sleep(0.1)


async def lost_spends(
    store: Store, provider: FakeProvider, grants: Mapping[str, IssuedGrant]
) -> tuple[int, list[str]]:
    """With every worker frozen: (requests out, credentials whose spend the
    cluster forgot). A refresh token the provider already rotated past was
    sent, hence its spend was acknowledged first; unless its commit landed
    (the stored token is the provider's current one), the spend intent for
    exactly that token must still be open in the store. One that is not
    would let the next claim send the same refresh token again."""
    out, lost = 0, []
    for cid, grant in grants.items():
        current = provider.grant_state(grant.grant_id).refresh_token
        cred, raw = await _read(store, cid)
        if cred.refresh_token == current:
            continue  # committed, or not sent yet
        out += 1
        if raw.get("intent_rt") != fingerprint(cred.refresh_token):
            lost.append(cid)
    return out, lost


async def _read(store: Store, cid: str, within: float = 10.0) -> tuple[Credential, dict[str, str]]:
    """The credential and its raw record, retried as a worker would while
    the client learns that a node died and who took its slots over."""
    deadline = anyio.current_time() + within
    while True:
        try:
            return await store.get(cid), await store.raw_fields(cid)
        except StoreUnavailable:
            if anyio.current_time() > deadline:
                raise
            await anyio.sleep(0.1)


async def nothing_lost(
    store: Store, provider: FakeProvider, grants: Mapping[str, IssuedGrant]
) -> None:
    """The end state: no refresh token presented twice, and every
    credential active with the provider's current refresh token."""
    assert provider.stats.reuse_events == []
    assert max(provider.send_counts.values()) == 1
    for cid, grant in grants.items():
        cred = await store.get(cid)
        state = provider.grant_state(grant.grant_id)
        assert cred.status is Status.ACTIVE, (cid, cred.status, cred.last_error)
        assert cred.refresh_token == state.refresh_token, cid  # nothing lost
