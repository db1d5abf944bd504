"""worker.client against a real Redis, a real token endpoint and real workers:
reads, min-TTL refreshes through the workers' path, typed errors, put and
delete, the sync facade."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from tests.harness import make_settings, seed, wait_for, worker_running
from worker.app import open_store
from worker.client import (
    AccessToken,
    ClientConfigError,
    ClientError,
    CredentialConflict,
    CredentialNotFound,
    InvalidCredential,
    MinTtlUnreachable,
    NeedsReauthorization,
    NoWorkerRunning,
    Quarantined,
    RefreshFailed,
    connect,
    connect_sync,
)
from worker.fakeprovider import FakeProvider, FakeProviderConfig, Fault, IssuedGrant
from worker.models import CredentialInput, Status
from worker.settings import Settings
from worker.store import Outcome, Store

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def world(
    redis_url: str, *, expires_in: float = 3600.0, count: int = 1, **provider: Any
) -> AsyncIterator[tuple[Settings, Store, FakeProvider, dict[str, IssuedGrant]]]:
    """A provider, profile ``p`` and ``count`` credentials ``cred-0000N``."""
    settings = make_settings(redis_url)
    async with (
        FakeProvider(FakeProviderConfig(**provider)) as fake,
        open_store(settings) as store,
    ):
        grants = await seed(store, fake, count, expires_in=expires_in)
        yield settings, store, fake, grants


async def stop_as(store: Store, credential_id: str, outcome: Outcome, reason: str) -> None:
    """Stop a credential through the workers' own claim and commit scripts."""
    part = store.keys.partition_of(credential_id)
    _, _, claimed = await store.claim(
        part, limit=1, lease_ms=5000, token=uuid.uuid4().hex, ids=[credential_id]
    )
    res = await store.commit(claimed[0], outcome, next_due="", fields={}, event="", reason=reason)
    assert res.ok


# ------------------------------------------------------------------- get


async def test_get_returns_the_stored_token_and_never_the_refresh_token(redis_url: str) -> None:
    async with world(redis_url) as (settings, _store, _, grants), connect(settings) as client:
        token = await client.get("cred-00000")
    grant = grants["cred-00000"]
    assert isinstance(token, AccessToken)
    assert token.access_token == grant.access_token
    assert token.authorization == f"Bearer {grant.access_token}"
    assert (token.token_type, token.scope, token.version) == ("Bearer", grant.scope, 0)
    assert token.status is Status.ACTIVE
    assert token.profile == "p"
    assert 3590 < token.expires_in() <= 3600
    assert token.expires_at.timestamp() == pytest.approx(token.expires_at_ms / 1000)
    assert token.expires_at.tzinfo is not None
    values = [str(getattr(token, f.name)) for f in dataclasses.fields(token)]
    assert grant.refresh_token not in values
    assert not hasattr(token, "refresh_token")
    assert grant.access_token not in repr(token)


async def test_get_returns_kept_extras(redis_url: str) -> None:
    async with world(redis_url) as (settings, store, _, _), connect(settings) as client:
        part = store.keys.partition_of("cred-00000")
        _, _, claimed = await store.claim(part, limit=1, lease_ms=5000, token="t",
                                          ids=["cred-00000"])  # fmt: skip
        spent = await store.spend(claimed[0], timeout_ms=1000, margin_ms=100, rt_hash="h")
        assert spent.ok
        fields: dict[str, str | int] = {
            "access_token": "new-at",
            "expires_at": int(time.time() * 1000) + 60_000,
            "extra": json.dumps({"instance_url": "https://x.example"}),
        }
        res = await store.commit(claimed[0], "refreshed", next_due="", fields=fields, event="")
        assert res.ok
        token = await client.get("cred-00000")
    assert token.access_token == "new-at"
    assert token.version == 1
    assert dict(token.extra) == {"instance_url": "https://x.example"}


async def test_unknown_credential(redis_url: str) -> None:
    async with world(redis_url) as (settings, *_), connect(settings) as client:
        with pytest.raises(CredentialNotFound, match="'nope'"):
            await client.get("nope")
        with pytest.raises(CredentialNotFound):
            await client.get("nope", min_ttl=60, timeout=1)


async def test_stopped_credentials_raise_typed_errors(redis_url: str) -> None:
    async with (
        world(redis_url, count=2) as (settings, store, _, grants),
        connect(settings) as client,
    ):
        await stop_as(store, "cred-00000", "needs_reauth", "invalid_grant")
        await stop_as(store, "cred-00001", "quarantined", "unknown_outcome")
        with pytest.raises(NeedsReauthorization, match="invalid_grant") as reauth:
            await client.get("cred-00000")
        with pytest.raises(Quarantined, match="unknown_outcome") as quarantined:
            await client.get("cred-00001", min_ttl=7200, timeout=1)
    assert reauth.value.reason == "invalid_grant"
    assert quarantined.value.reason == "unknown_outcome"
    # the token, still valid, is there for an app that prefers it to none
    assert reauth.value.current is not None
    assert reauth.value.current.access_token == grants["cred-00000"].access_token
    assert isinstance(reauth.value, ClientError)


async def test_min_ttl_refreshes_through_the_workers(redis_url: str) -> None:
    async with world(redis_url, expires_in=30) as (settings, _store, fake, grants):
        # re-reads only every 5 s: a quicker answer is the commit's event
        async with worker_running(settings, count=2), connect(settings, poll_interval=5) as client:
            before = await client.get("cred-00000", min_ttl=10)  # 30 s left: no refresh
            assert before.version == 0
            assert fake.stats.refreshed == 0
            started = time.monotonic()
            token = await client.get("cred-00000", min_ttl=60, timeout=10)
            assert time.monotonic() - started < 4
            again = await client.get("cred-00000", min_ttl=60)
        state = fake.grant_state(grants["cred-00000"].grant_id)
        assert token.version == 1
        assert token.access_token == state.access_token
        assert token.expires_in() > 3000
        assert again == token  # fresh enough: read, not refreshed again
        assert fake.stats.refreshed == 1
        assert max(fake.send_counts.values()) == 1


async def test_without_pubsub_the_rereads_still_deliver(redis_url: str) -> None:
    """A Redis user that may not SUBSCRIBE: the periodic re-read is the
    safety net under the events subscription."""
    async with world(redis_url, expires_in=30) as (settings, store, fake, grants):
        await store.client.acl_setuser(
            "nosub", enabled=True, passwords=["+pw"], keys=["~*"], channels=["*"],
            categories=["+@all"], commands=["-subscribe", "-psubscribe", "-ssubscribe"],
        )  # fmt: skip
        consumer = dataclasses.replace(
            settings, redis_url=redis_url.replace("redis://", "redis://nosub:pw@")
        )
        try:
            async with worker_running(settings), connect(consumer, poll_interval=0.3) as client:
                started = time.monotonic()
                token = await client.get("cred-00000", min_ttl=60, timeout=5)
                elapsed = time.monotonic() - started
        finally:
            await store.client.acl_deluser("nosub")
    assert token.version == 1
    assert token.access_token == fake.grant_state(grants["cred-00000"].grant_id).access_token
    assert 0.3 <= elapsed < 4  # the commit could only be seen by the next re-read
    assert fake.stats.refreshed == 1


async def test_reads_need_no_writes_and_refusals_are_client_errors(redis_url: str) -> None:
    async with world(redis_url, expires_in=30) as (settings, store, fake, _):
        await store.client.acl_setuser(
            "reader", enabled=True, passwords=["+pw"], keys=["~*"], channels=["*"],
            categories=["-@all", "+@read", "+@connection"],
            commands=["+evalsha", "+eval", "+script|load", "+time"],
        )  # fmt: skip
        reader = dataclasses.replace(
            settings, redis_url=redis_url.replace("redis://", "redis://reader:pw@")
        )
        try:
            async with connect(reader) as client:
                assert (await client.get("cred-00000")).version == 0
                with pytest.raises(ClientConfigError, match="Redis refused the call"):
                    await client.get("cred-00000", min_ttl=60, timeout=1)
                with pytest.raises(ClientConfigError):
                    await client.delete("cred-00000")
        finally:
            await store.client.acl_deluser("reader")
        assert (await store.get("cred-00000")).version == 0
    assert fake.stats.requests == 0


async def test_an_expired_token_is_refreshed_before_it_is_returned(redis_url: str) -> None:
    async with world(redis_url, expires_in=3600) as (settings, store, fake, _):
        await store.upsert(
            dataclasses.replace(await _input(store, "cred-00000"), expires_at_ms=1000),
            due_ms=int(time.time() * 1000) + 3_600_000, replace=True,
        )  # fmt: skip
        async with worker_running(settings), connect(settings) as client:
            stale = await client.get("cred-00000", min_ttl=None)  # None: as stored, no wait
            token = await client.get("cred-00000")
    assert stale.expires_in() < 0
    assert token.expires_in() > 3000
    assert fake.stats.refreshed == 1


async def _input(store: Store, credential_id: str) -> CredentialInput:
    cred = await store.get(credential_id)
    return CredentialInput(cred.id, cred.profile, cred.access_token, cred.refresh_token,
                           cred.expires_at_ms, scope=cred.scope)  # fmt: skip


async def test_no_worker_running_is_said_so(redis_url: str) -> None:
    async with world(redis_url, expires_in=30) as (settings, store, fake, _):
        async with connect(settings) as client:
            started = time.monotonic()
            with pytest.raises(NoWorkerRunning, match="no refreshd worker is running"):
                await client.get("cred-00000", min_ttl=60, timeout=1.0)
            assert 0.9 < time.monotonic() - started < 3
        # the request stays: the credential is due now, for the next worker
        cred = await store.get("cred-00000")
        assert cred.due_at_ms is not None
        assert cred.due_at_ms <= int(time.time() * 1000)
        async with worker_running(settings):
            await wait_for(lambda: fake.stats.refreshed == 1, within=10)
    assert fake.stats.refreshed == 1


async def test_a_failed_refresh_raises_with_the_reason_and_the_current_token(
    redis_url: str,
) -> None:
    async with world(redis_url, expires_in=30) as (settings, _store, fake, grants):
        fake.inject(Fault("status", status=503, headers={"Retry-After": "20"}))
        async with worker_running(settings), connect(settings) as client:
            with pytest.raises(RefreshFailed) as failed:
                await client.get("cred-00000", min_ttl=60, timeout=10)
            # in backoff with the next attempt past the timeout: at once, not moved
            started = time.monotonic()
            with pytest.raises(RefreshFailed, match="in backoff") as backoff:
                await client.get("cred-00000", min_ttl=60, timeout=2)
            assert time.monotonic() - started < 1.5
        assert fake.stats.requests == 1  # the backoff was not overridden
    assert failed.value.reason == backoff.value.reason != ""
    assert failed.value.retry_at_ms > int(time.time() * 1000)
    assert failed.value.current is not None
    assert failed.value.current.access_token == grants["cred-00000"].access_token


async def test_min_ttl_longer_than_the_providers_tokens_is_refused(redis_url: str) -> None:
    async with world(redis_url, expires_in=30, lifetime_s=120) as (settings, _, fake, _):
        async with worker_running(settings), connect(settings) as client:
            token = await client.get("cred-00000", min_ttl=60)
            assert token.version == 1
            with pytest.raises(MinTtlUnreachable, match="live 120s") as refused:
                await client.get("cred-00000", min_ttl=300)
        assert fake.stats.refreshed == 1  # no refresh that could not help
    assert refused.value.current == token


# ------------------------------------------------------------ put/delete


def grant_line(grant: IssuedGrant, credential_id: str = "app-1", **more: Any) -> dict[str, Any]:
    return {
        "id": credential_id,
        "profile": "p",
        "access_token": grant.access_token,
        "refresh_token": grant.refresh_token,
        "expires_in": grant.expires_in,
        "scope": grant.scope,
    } | more


async def test_put_creates_and_validates_like_import(redis_url: str) -> None:
    async with world(redis_url) as (settings, _, fake, _), connect(settings) as client:
        grant = fake.issue_grant()
        assert await client.put(grant_line(grant)) is True
        token = await client.get("app-1")
        assert token.access_token == grant.access_token
        assert await client.put(grant_line(grant)) is False  # replaced
        bad = [
            (grant_line(grant, extra_field=1), "unknown field"),
            (grant_line(grant, profile="nope"), "unknown profile 'nope'"),
            (grant_line(grant, refresh_token=""), "needs refresh_token"),
            (grant_line(grant, access_token="x" * 20_000), "access_token is longer"),
            (grant_line(grant, access_token="a\r\nX: y"), "access_token"),
            ({**grant_line(grant), "expires_at": 1}, "exactly one of expires_in"),
        ]
        for line, message in bad:
            with pytest.raises(InvalidCredential, match=message) as refused:
                await client.put(line)
            assert grant.refresh_token not in str(refused.value)


async def test_put_reauthorizes_a_quarantined_credential(redis_url: str) -> None:
    async with world(redis_url) as (settings, store, fake, grants):
        async with connect(settings) as client:
            await stop_as(store, "cred-00000", "quarantined", "unknown_outcome")
            with pytest.raises(Quarantined):
                await client.get("cred-00000")
            consent = fake.issue_grant()  # the user went through consent again
            assert await client.put(grant_line(consent, "cred-00000", expires_in=30)) is False
            back = await client.get("cred-00000", min_ttl=None)
            assert back.status is Status.ACTIVE
            assert back.access_token == consent.access_token
            cred = await store.get("cred-00000")
            assert (cred.failures, cred.last_error) == (0, "")
            counters = await store.counters()
            assert counters.get("status:quarantined", 0) == 0
            assert counters.get("failing:unknown_outcome", 0) == 0
            async with worker_running(settings):
                token = await client.get("cred-00000", min_ttl=60)
        state = fake.grant_state(consent.grant_id)
        assert token.access_token == state.access_token
        assert state.refreshes == 1
        assert fake.grant_state(grants["cred-00000"].grant_id).refreshes == 0
        assert max(fake.send_counts.values()) == 1


async def test_put_refuses_a_spent_refresh_token(redis_url: str) -> None:
    async with world(redis_url, expires_in=30) as (settings, _, fake, grants):
        async with worker_running(settings), connect(settings) as client:
            await client.get("cred-00000", min_ttl=60)  # rotates the refresh token
            with pytest.raises(CredentialConflict, match="already spent"):
                await client.put(grant_line(grants["cred-00000"], "cred-00000"))
        assert max(fake.send_counts.values()) == 1


async def test_delete(redis_url: str) -> None:
    async with world(redis_url) as (settings, store, *_), connect(settings) as client:
        await client.delete("cred-00000")
        with pytest.raises(CredentialNotFound):
            await client.get("cred-00000")
        with pytest.raises(CredentialNotFound):
            await client.delete("cred-00000")
        assert (await store.counters()).get("status:active", 0) == 0


async def test_writes_refuse_an_unsafe_redis_reads_do_not(redis_url: str) -> None:
    async with world(redis_url) as (settings, store, fake, _):
        await store.client.config_set("maxmemory-policy", "allkeys-lru")
        try:
            async with connect(settings) as client:
                assert (await client.get("cred-00000")).version == 0
                with pytest.raises(ClientConfigError, match="eviction"):
                    await client.put(grant_line(fake.issue_grant()))
        finally:
            await store.client.config_set("maxmemory-policy", "noeviction")


async def test_settings_errors_are_client_errors(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(make_settings(redis_url, partitions=4)):
        pass  # records the layout
    with pytest.raises(ClientConfigError, match="REFRESHD_PARTITIONS=4"):
        async with connect(make_settings(redis_url, partitions=8)):
            pass
    monkeypatch.setenv("REFRESHD_BOGUS", "1")
    with pytest.raises(ClientConfigError, match="REFRESHD_BOGUS"):
        async with connect():
            pass


# --------------------------------------------------------------- boundaries


def test_the_client_needs_no_worker_internals() -> None:
    code = (
        "import sys, worker.client\n"
        "bad = ['worker.refresher', 'worker.runner', 'worker.app', 'worker.transport',"
        " 'worker.cli', 'worker.egress', 'aiohttp']\n"
        "print([m for m in bad if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_sync_client(redis_url: str) -> None:
    settings = make_settings(redis_url)

    async def prepare() -> IssuedGrant:
        async with FakeProvider() as fake, open_store(settings) as store:
            await seed(store, fake, 0)
            return fake.issue_grant()

    grant = anyio.run(prepare)
    with connect_sync(settings) as client:
        assert client.put(grant_line(grant)) is True
        token = client.get("app-1")
        assert token.access_token == grant.access_token
        with pytest.raises(NoWorkerRunning):
            client.get("app-1", min_ttl=7200, timeout=0.5)
        client.delete("app-1")
        with pytest.raises(CredentialNotFound):
            client.get("app-1")
    client.close()  # idempotent
    with pytest.raises(ClientConfigError, match="REFRESHD_PARTITIONS=16"):
        connect_sync(make_settings(redis_url, partitions=3))  # its loop thread is stopped


async def test_a_wait_ends_with_tokens_put_meanwhile(redis_url: str) -> None:
    """No worker runs; the consent flow puts new tokens while a caller waits."""
    async with (
        world(redis_url, expires_in=30) as (settings, _, fake, _),
        connect(settings) as client,
    ):
        consent = fake.issue_grant()

        async def put_soon() -> None:
            await anyio.sleep(0.3)
            await client.put(grant_line(consent, "cred-00000"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(put_soon)
            token = await client.get("cred-00000", min_ttl=60, timeout=5)
    assert (token.access_token, token.version) == (consent.access_token, 1)
    assert fake.stats.requests == 0


# ------------------------------------------------- the read's connection


async def test_reads_load_the_script_again_after_the_cache_is_flushed(redis_url: str) -> None:
    async with world(redis_url) as (settings, store, _, grants), connect(settings) as client:
        await client.get("cred-00000")
        await store.client.script_flush()  # as a restarted server would have it
        token = await client.get("cred-00000")
    assert token.access_token == grants["cred-00000"].access_token


async def test_a_read_cancelled_before_its_reply_never_hands_that_reply_to_the_next(
    redis_url: str,
) -> None:
    """A reply that arrives after its caller gave up must die with its
    connection: handed back to the pool, the next read would return the
    other credential's token. (The token cache is off: with it, the second
    read would be a hit; tests/test_client_cache.py has its own variant.)"""
    async with (
        world(redis_url, count=2) as (settings, store, _, grants),
        connect(dataclasses.replace(settings, client_cache=0)) as c,
    ):
        await c.get("cred-00000")  # one pooled connection, reused next
        await store.client.client_pause(300, all=True)
        with anyio.move_on_after(0.1) as scope:
            await c.get("cred-00000")
        assert scope.cancelled_caught
        await anyio.sleep(0.4)  # the paused command runs now and its reply arrives
        token = await c.get("cred-00001")
    assert token.credential_id == "cred-00001"
    assert token.access_token == grants["cred-00001"].access_token
