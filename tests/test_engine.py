"""The central promise, end to end: real Redis, real HTTP, racing workers."""

from __future__ import annotations

import base64

import anyio
import pytest

from tests.harness import Events, make_settings, seed, wait_for, worker_running
from worker.app import open_store
from worker.fakeprovider import FakeProvider, FakeProviderConfig
from worker.models import Status

pytestmark = pytest.mark.anyio


RING = "k1:" + base64.b64encode(bytes(range(32))).decode()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_racing_workers_never_send_a_refresh_token_twice(
    redis_url: str, encrypted: bool
) -> None:
    """With encryption at rest too: the claim carries ciphertext, each
    worker decrypts the token it sends, and nothing else changes."""
    ring = {"encryption_keys": RING} if encrypted else {}
    settings = make_settings(redis_url, claim_batch=20, **ring)
    config = FakeProviderConfig(lifetime_s=3, rotate=True, revoke_on_reuse=True)
    async with FakeProvider(config) as provider, open_store(settings) as store:
        grants = await seed(store, provider, 150)  # all due now: a catch-up burst
        events = Events()
        async with anyio.create_task_group() as tg:
            await tg.start(events.listen, store)
            async with worker_running(settings, count=3) as workers:

                def refreshed_three_times() -> bool:
                    return all(
                        provider.grant_state(g.grant_id).refreshes >= 3 for g in grants.values()
                    )

                await wait_for(refreshed_three_times, within=30, what="3 refreshes each")
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()

        assert provider.stats.reuse_events == []
        assert max(provider.send_counts.values()) == 1
        assert all(not provider.grant_state(g.grant_id).revoked for g in grants.values())
        # every worker took part in the race
        assert all(w.metrics.claimed._value.get() > 0 for w in workers)
        total_versions = 0
        for cred_id, grant in grants.items():
            cred = await store.get(cred_id)
            state = provider.grant_state(grant.grant_id)
            assert cred.status is Status.ACTIVE
            # nothing lost: the stored refresh token is the provider's current one
            assert cred.refresh_token == state.refresh_token
            assert cred.access_token == state.access_token
            assert cred.version == state.refreshes
            total_versions += cred.version
        # one event per commit, and nothing but successes
        assert len(events.of("token.refreshed")) == total_versions
        assert len(events.items) == total_versions
        published = {(e["credential_id"], e["version"]) for e in events.items}
        assert len(published) == total_versions
        assert all("refresh_token" not in e for e in events.items)
        if encrypted:
            raw = await store.raw_fields(next(iter(grants)))
            assert store.codec.key_id(raw["refresh_token"]) == "k1"
            assert {e["secrets"] for e in events.items} == {"encrypted"}
