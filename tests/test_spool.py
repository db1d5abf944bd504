"""Tokens received while Redis is away are kept: retried, spooled, replayed.

The end-to-end tests run ``refreshd run`` as a real process against a real
Redis server that is killed mid-refresh (the provider has already rotated
the grant) and stays away longer than the worker's old 30 s commit
patience; the worker is SIGTERMed during the outage and started again once
Redis is back. The other tests drive the spool and its replay directly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import signal
import stat
import time
from pathlib import Path

import anyio
import pytest

from tests.faultkit import captured_logs, log_events
from tests.harness import (
    Events,
    all_current,
    claim_spend_send,
    is_current,
    make_settings,
    seed,
    wait_for,
    worker_running,
)
from tests.redis_server import RedisServer
from tests.test_process import worker_process
from worker.app import build_refresher, open_store
from worker.batcher import ScriptBatcher, _Call
from worker.errors import StoreUnavailable
from worker.events import EventType, build_event
from worker.fakeprovider import FakeProvider, Fault
from worker.keyring import AesGcmCodec, KeyRing
from worker.logs import fingerprint
from worker.metrics import Metrics
from worker.models import Claimed, Status
from worker.oauth2 import TokenSet
from worker.redisio import guard
from worker.spool import SPOOL_FORMAT, PendingCommit, Spool, replay_spool
from worker.store import Store
from worker.transport import make_http_client

pytestmark = pytest.mark.anyio

QUARANTINED = EventType.QUARANTINED.value


def MarkingCodec() -> AesGcmCodec:
    """Encryption at rest, as a worker with a key ring spools."""
    return AesGcmCodec(KeyRing([("spool1", bytes(range(32)))]))


# ------------------------------------------------------------ end to end


@pytest.mark.parametrize(
    "outage_s",
    [31.0, pytest.param(300.0, marks=[pytest.mark.slow, pytest.mark.timeout(480)])],
    ids=["past_the_old_30s_patience", "five_minutes"],
)
async def test_tokens_survive_an_outage_and_a_stop(
    fresh_redis: RedisServer, tmp_path: Path, outage_s: float
) -> None:
    """Redis dies while four requests are out; the provider answers with
    rotated tokens; Redis stays away past the old 30 s commit patience; the
    worker is SIGTERMed meanwhile. Once Redis and the worker are back, every
    new token is stored, nothing is quarantined and no refresh token was
    presented twice. (Before: ``commit.abandoned`` at 30 s, and the
    restarted worker quarantined all four, their grants lost.)"""
    settings = make_settings(fresh_redis.url)
    spool_dir = tmp_path / "spool"
    env = {
        "REFRESHD_SPOOL_DIR": str(spool_dir),
        "REFRESHD_CONCURRENCY": "4",
        "REFRESHD_CLAIM_BATCH": "4",
        "REFRESHD_DRAIN_GRACE_SECONDS": "1",
    }
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 4, profile={"timeout_s": 5})
        provider.inject(*[Fault("delay", delay_s=1.5)] * 4)  # the answers come after the kill
        async with worker_process(fresh_redis.url, **env) as child:
            await wait_for(lambda: provider.stats.requests >= 4, within=10, what="4 requests out")
            fresh_redis.kill()
            await wait_for(lambda: provider.stats.refreshed >= 4, within=10, what="4 answers")
            await anyio.sleep(outage_s)
            assert "commit.abandoned" not in child.log_events()
            files = sorted(spool_dir.glob("commit-*.json"))
            assert len(files) == 4, child.output()
            assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
            assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
            child.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(15):
                assert await child.process.wait() == 0, child.output()
            first_run = child.output()
        assert log_names(first_run).count("commit.spooled") == 4
        assert sorted(spool_dir.glob("commit-*.json")) == files  # left for the next start
        for grant in grants.values():  # no token in the worker's output
            state = provider.grant_state(grant.grant_id)
            assert state.refresh_token not in first_run
            assert state.access_token not in first_run

        await anyio.to_thread.run_sync(fresh_redis.start)
        events = Events()
        async with anyio.create_task_group() as tg:
            await wait_for(lambda: store.ping(), within=10, what="the test's client back")
            await tg.start(events.listen, store)
            async with worker_process(fresh_redis.url, **env) as child:
                await wait_for(
                    lambda: all_current(store, provider, grants), within=20, what="tokens landed"
                )
                second_run = child.output()
            tg.cancel_scope.cancel()

    assert log_names(second_run).count("spool.replayed") == 4
    assert list(spool_dir.iterdir()) == []
    assert events.of(QUARANTINED) == []
    assert provider.stats.reuse_events == []
    assert provider.stats.revoked_grants == 0
    assert max(provider.send_counts.values()) == 1


def log_names(output: str) -> list[str]:
    names = []
    for line in output.splitlines():
        try:
            names.append(json.loads(line)["event"])
        except (ValueError, KeyError, TypeError):
            continue
    return names


# -------------------------------------------------------- in-process retry


async def test_commits_are_retried_and_counted_while_redis_is_away(
    fresh_redis: RedisServer,
) -> None:
    """The retry is observable: a gauge of pending commits, a counter of
    attempts, one ``commit.retrying`` per commit and no line per attempt.
    Redis stays away past the spend deadlines and the leases; once it is
    back the pending commits land at once (not at the end of their backoff)
    and before this worker claims anything, although wake-ups ask it to:
    a claim first would read their intents as unknown outcomes."""
    settings = make_settings(fresh_redis.url)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 3, profile={"timeout_s": 2})
        provider.inject(*[Fault("delay", delay_s=1.0)] * 3)
        events = Events()
        with captured_logs("info") as stream:
            async with worker_running(settings) as [w]:
                # a long backoff: Redis is back long before the next try
                refresher, timing = w.worker.refresher, w.worker.refresher.timing
                refresher.timing = dataclasses.replace(timing, commit_retry_max_delay_s=60)
                await wait_for(lambda: provider.stats.requests >= 3, within=10, what="sent")
                fresh_redis.kill()
                pending = w.metrics.commits_pending
                await wait_for(lambda: _value(pending) == 3, within=10, what="3 pending")
                # past the intents' deadlines (2.5 s), the leases (5 s) and the
                # retry 6.35 s after the first one: the next would be 6.4 s later
                await anyio.sleep(7.5)
                assert w.metrics.commit_retries._value.get() >= 9  # several attempts each ...
                await anyio.to_thread.run_sync(fresh_redis.start)
                back = time.monotonic()
                async with anyio.create_task_group() as tg:
                    await wait_for(lambda: store.ping(), within=10, what="the test's client back")
                    await tg.start(events.listen, store)
                    while _value(pending) and time.monotonic() - back < 5:
                        with contextlib.suppress(StoreUnavailable):  # stale pooled connections
                            await guard(store.client.publish(store.keys.wake, "test"))
                        await anyio.sleep(0.05)
                    landed_after = time.monotonic() - back
                    await wait_for(
                        lambda: all_current(store, provider, grants), within=10, what="current"
                    )
                    await anyio.sleep(0.3)
                    tg.cancel_scope.cancel()
        assert landed_after < 3, f"pending commits landed {landed_after:.1f}s after Redis was back"
        names = [e["event"] for e in log_events(stream)]
        assert names.count("commit.retrying") == 3  # ... but one line each
        assert names.count("commit.recovered") == 3
        assert "commit.abandoned" not in names
        assert names.count("commit.retry_round") <= 1
        assert events.of(QUARANTINED) == []
        assert max(provider.send_counts.values()) == 1


def _value(gauge: object) -> float:
    [metric] = gauge.collect()  # type: ignore[attr-defined]
    return float(metric.samples[0].value)


# ------------------------------------------------------------ the spool


async def _answered(
    store: Store, provider: FakeProvider, cid: str, token: str, *, lease_ms: int = 5000
) -> tuple[Claimed, TokenSet]:
    """Claim, spend and send like a worker; the commit is left to the test.
    The lock lasts ``lease_ms`` (at least 2 s), the spend intent 1.5 s."""
    del provider  # answers through the profile's endpoint
    return await claim_spend_send(store, cid, token=token, lease_ms=lease_ms, spend_timeout_ms=1000)


def _pending(c: Claimed, tokens: TokenSet) -> PendingCommit:
    """The commit the refresher would have made of this answer."""
    event = build_event(
        EventType.REFRESHED,
        credential_id=c.id,
        profile=c.profile,
        version=int(c.version) + 1,
        ts_ms=int(time.time() * 1000),
        access_token=tokens.access_token,
        token_type=tokens.token_type,
        expires_at_ms=tokens.expires_at_ms,
        scope=tokens.scope,
    )
    fields: dict[str, str | int] = {
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "token_type": tokens.token_type,
        "scope": tokens.scope,
        "expires_at": tokens.expires_at_ms,
    }
    next_due = int(time.time() * 1000) + 3_600_000
    return PendingCommit.of(c, "refreshed", next_due, fields, event, "")


def test_a_spool_file_is_private_atomic_and_encoded(tmp_path: Path) -> None:
    directory = tmp_path / "data" / "spool"
    spool = Spool(directory, MarkingCodec())
    c = Claimed(
        id="cred-1", partition=0, token="w:1", due_ms=0, profile="p",
        refresh_token="old-rt", token_type="Bearer", scope="", expires_at_ms=0,
        version="3", failures=0, ambiguous_at_ms=None, recovered=False, claimed_at_ms=0,
    )  # fmt: skip
    fields: dict[str, str | int] = {
        "access_token": "AT-secret-value",
        "refresh_token": "RT-secret-value",
        "extra": '{"id_token": "IDT-secret-value"}',
        "token_type": "Bearer",
        "expires_at": 1_900_000_000_000,
    }
    event = '{"type": "token.refreshed", "access_token": "AT-secret-value"}'
    pending = PendingCommit.of(c, "refreshed", 1_800_000_000_000, fields, event, "")

    path = spool.write(pending)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in directory.iterdir()] == [path.name]  # no temporary file left
    text = path.read_text()
    assert "secret-value" not in text  # every secret went through the codec
    doc = json.loads(text)
    assert doc["format"] == SPOOL_FORMAT
    assert doc["fields"]["token_type"] == "Bearer"
    assert doc["fields"]["expires_at"] == 1_900_000_000_000
    assert spool.load(path) == pending
    assert spool.write(pending) == path  # the same commit again: one entry, rewritten
    assert spool.entries() == [path]


async def test_replaying_twice_lands_the_tokens_once(redis_url: str, tmp_path: Path) -> None:
    """The replay is idempotent: the commit script refuses a commit that
    already landed (its intent is gone) and the replay sees it landed."""
    settings = make_settings(redis_url)
    spool = Spool(tmp_path / "spool", MarkingCodec())
    metrics = Metrics()
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 1)
        claimed, tokens = await _answered(store, provider, "cred-00000", "A")
        path = spool.write(_pending(claimed, tokens))
        copy = path.read_bytes()

        assert await replay_spool(spool, store, metrics) == 0
        assert not path.exists()
        assert await is_current(store, provider, "cred-00000", grants["cred-00000"])
        cred = await store.get("cred-00000")
        assert (cred.version, cred.in_flight, cred.status) == (1, False, Status.ACTIVE)

        path.write_bytes(copy)  # e.g. a crash between the commit and the unlink
        assert await replay_spool(spool, store, metrics) == 0
        assert not path.exists()
        assert (await store.get("cred-00000")).version == 1
        assert await is_current(store, provider, "cred-00000", grants["cred-00000"])
    replays = {
        s.labels["result"]: s.value
        for s in next(iter(metrics.spool_replays.collect())).samples
        if s.name.endswith("_total")
    }
    assert replays == {"landed": 1, "already_landed": 1}


async def test_a_replay_leaves_another_prefixs_entries_alone(
    redis_url: str, tmp_path: Path
) -> None:
    """Deployments with different key prefixes may share one data directory
    (the default is per user). A worker replays only its own prefix's
    entries: another's would not apply here and would be dropped as
    superseded, taking that deployment's tokens with them."""
    settings = make_settings(redis_url)
    ours = Spool(tmp_path / "spool", MarkingCodec(), scope=settings.prefix)
    theirs = Spool(tmp_path / "spool", MarkingCodec(), scope="other:")
    async with FakeProvider() as provider, open_store(settings) as store:
        await seed(store, provider, 1)
        claimed, tokens = await _answered(store, provider, "cred-00000", "A")
        foreign = theirs.write(_pending(claimed, tokens))
        assert ours.entries() == []
        assert await replay_spool(ours, store, Metrics()) == 0
        assert foreign.exists()
        assert theirs.entries() == [foreign]


async def test_replay_lands_after_another_worker_recovered_the_intent(
    redis_url: str, tmp_path: Path
) -> None:
    """Several replicas: another worker may claim the credential before this
    one is back, and read the expired intent as an unknown outcome. The
    replayed tokens still land (unchanged version), and win."""
    settings = make_settings(redis_url)
    spool = Spool(tmp_path / "spool", MarkingCodec())
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 1, profile={"timeout_s": 0.5})
        claimed, tokens = await _answered(store, provider, "cred-00000", "A", lease_ms=1000)
        spool.write(_pending(claimed, tokens))
        await anyio.sleep(2.3)  # past the lock and the spend deadline
        part = store.keys.partition_of("cred-00000")
        _, _, [b] = await store.claim(part, limit=1, lease_ms=5000, token="B", ids=["cred-00000"])
        assert b.recovered
        assert await replay_spool(spool, store, Metrics()) == 0
        assert await is_current(store, provider, "cred-00000", grants["cred-00000"])


async def test_a_refused_replay_is_set_aside_not_deleted(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url)
    spool = Spool(tmp_path / "spool", MarkingCodec())
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 1)
        claimed, tokens = await _answered(store, provider, "cred-00000", "A")
        pending = _pending(claimed, tokens)
        # a claim token the record never saw: the script refuses it as stale
        path = spool.write(PendingCommit.of(
            _with_token(claimed, "someone-else"), "refreshed", pending.next_due,
            pending.fields, pending.event, "",
        ))  # fmt: skip
        with captured_logs("info") as stream:
            assert await replay_spool(spool, store, Metrics()) == 0
        assert not path.exists()
        kept = path.with_suffix(".refused")
        assert spool.load(kept).refresh_token == tokens.refresh_token
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        [refused] = [e for e in log_events(stream) if e["event"] == "spool.replay_refused"]
        assert refused["refresh_token_fp"] == fingerprint(tokens.refresh_token)
        assert tokens.refresh_token not in stream.getvalue()
        assert (await store.get("cred-00000")).version == 0
        assert grants


def _with_token(c: Claimed, token: str) -> Claimed:
    from dataclasses import replace

    return replace(c, token=token)


async def test_an_unreadable_spool_file_is_reported_and_kept(
    redis_url: str, tmp_path: Path
) -> None:
    settings = make_settings(redis_url)
    spool = Spool(tmp_path / "spool", MarkingCodec())
    spool.directory.mkdir(mode=0o700)
    broken = spool.directory / f"commit-{spool.tag}-0123.json"
    broken.write_text('{"format": "refreshd-spool-1", "fields": ')
    async with open_store(settings) as store:
        with captured_logs("info") as stream:
            assert await replay_spool(spool, store, Metrics()) == 1
    assert broken.exists()
    names = [e["event"] for e in log_events(stream)]
    assert "spool.unreadable" in names
    assert "spool.entries_left" in names


async def test_a_replay_with_redis_away_keeps_every_entry(
    fresh_redis: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(fresh_redis.url)
    spool = Spool(tmp_path / "spool", MarkingCodec())
    async with FakeProvider() as provider, open_store(settings) as store:
        await seed(store, provider, 1)
        claimed, tokens = await _answered(store, provider, "cred-00000", "A")
        path = spool.write(_pending(claimed, tokens))
        fresh_redis.kill()
        with pytest.raises(StoreUnavailable):
            await replay_spool(spool, store, Metrics())
        assert path.exists()
        await anyio.to_thread.run_sync(fresh_redis.start)
        await wait_for(lambda: store.ping(), within=10, what="the client back")
        assert await replay_spool(spool, store, Metrics()) == 0
        assert (await store.get("cred-00000")).version == 1


async def test_an_unwritable_spool_is_reported_at_start(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    spool = Spool(blocker / "spool", MarkingCodec())
    async with open_store(settings) as store:
        with captured_logs("info") as stream:
            assert await replay_spool(spool, store, Metrics()) == 0
    [warning] = [e for e in log_events(stream) if e["event"] == "spool.unavailable"]
    assert warning["level"] == "warning"
    assert "REFRESHD_SPOOL_DIR" in warning["note"]


@pytest.mark.parametrize("ring", ["", "k1:" + base64.b64encode(bytes(range(32))).decode()],
                         ids=["plain", "encrypted"])  # fmt: skip
async def test_commits_never_acknowledged_are_spooled_when_the_batcher_stops(
    fresh_redis: RedisServer, tmp_path: Path, ring: str
) -> None:
    """A commit whose script ran but whose acknowledgement died with the
    connection may be lost by the server: the batch re-applies it for as
    long as it runs (was: 30 s), and hands it to the spool when it stops.
    Encrypted, the commit carries its secrets in the record form, as bytes
    (``SecretCodec.encode_record``), and the spool reads them back."""
    settings = make_settings(fresh_redis.url, encryption_keys=ring)
    spool = Spool(tmp_path / "spool", MarkingCodec())
    async with (
        FakeProvider() as provider,
        open_store(settings) as store,
        make_http_client() as http,
    ):
        grants = await seed(store, provider, 1)
        claimed, tokens = await _answered(store, provider, "cred-00000", "A")
        pending = _pending(claimed, tokens)
        keys, args = store.commit_call(
            claimed, "refreshed", next_due=pending.next_due, fields=pending.fields,
            event=pending.event,
        )  # fmt: skip
        assert any(isinstance(arg, bytes) for arg in args) == bool(ring)
        assert _timeless(PendingCommit.from_commit_args(args, store)) == _timeless(pending)
        refresher = build_refresher(settings, store, http, Metrics())
        refresher.spool = spool
        batcher = ScriptBatcher(store, on_unconfirmed=refresher.keep_unconfirmed)
        fresh_redis.kill()
        with captured_logs("info") as stream:
            async with anyio.create_task_group() as tg:
                await tg.start(batcher.run)
                future = asyncio.get_running_loop().create_future()
                batcher._reapplying += 1  # as a batch that lost its acknowledgement does
                tg.start_soon(
                    batcher._reapply, [_Call(store.scripts.commit, keys, args, False, future)]
                )
                await anyio.sleep(1.0)  # several attempts, all refused
                assert spool.entries() == []  # kept in memory while the process runs
                tg.cancel_scope.cancel()  # the worker stops
        [path] = spool.entries()
        assert _timeless(spool.load(path)) == _timeless(pending)
        [spooled] = [e for e in log_events(stream) if e["event"] == "commit.spooled"]
        assert spooled["refresh_token_fp"] == fingerprint(tokens.refresh_token)

        await anyio.to_thread.run_sync(fresh_redis.start)
        await wait_for(lambda: store.ping(), within=10, what="the client back")
        assert await replay_spool(spool, store, Metrics()) == 0
        assert await is_current(store, provider, "cred-00000", grants["cred-00000"])


def _timeless(commit: PendingCommit | None) -> PendingCommit:
    assert commit is not None
    return dataclasses.replace(commit, received_ms=0)


async def test_a_write_cut_short_is_removed_at_start(redis_url: str, tmp_path: Path) -> None:
    """A temporary file left by a crash mid-write is incomplete and holds
    secrets: the next start removes it (a fresh one may be another
    process's write in progress)."""
    settings = make_settings(redis_url)
    spool = Spool(tmp_path / "spool", MarkingCodec())
    spool.directory.mkdir(mode=0o700)
    old = spool.directory / ".commit-0123.json.99.tmp"
    fresh = spool.directory / ".commit-4567.json.98.tmp"
    for path in (old, fresh):
        path.write_text('{"format": "refreshd-spool-1", "fie')
    os.utime(old, (time.time() - 120, time.time() - 120))
    async with open_store(settings) as store:
        assert await replay_spool(spool, store, Metrics()) == 0
    assert not old.exists()
    assert fresh.exists()
