"""`refreshd key generate|status|rotate` against a real Redis and real workers:
rotation while two worker processes refresh (no reuse, nothing lost, every
record under the new key), a plain database encrypted by rotate, an
interrupted rotation resumed, a key id missing from the ring reported, and
the rewrite script's refusals (a changed record, a refresh in flight)."""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from tests import sealed
from tests.cli_helpers import Result, run_refreshd
from tests.harness import add_grants, all_current, make_settings, seed, wait_for, worker_running
from tests.test_process import worker_process
from worker.app import open_store
from worker.cli.progress import Progress
from worker.codec import RECORD_MARK, PlainCodec, SecretContext, text_form
from worker.fakeprovider import FakeProvider, FakeProviderConfig
from worker.keyops import key_status, record_count, rotate
from worker.keyring import AesGcmCodec, generate_key, parse_key_ring
from worker.keys import Keyspace
from worker.models import CredentialInput
from worker.profiles import ProfileStore
from worker.redisio import guard, load_script
from worker.settings import Settings
from worker.store import Store

pytestmark = pytest.mark.anyio

K1 = f"k1:{generate_key()}"
K2 = f"k2:{generate_key()}"


def cli(redis_url: str, *argv: str, keys: str = "", partitions: int = 16) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    env |= {"REFRESHD_REDIS_URL": redis_url, "REFRESHD_LOG_LEVEL": "error",
            "REFRESHD_PARTITIONS": str(partitions)}  # fmt: skip
    if keys:
        env["REFRESHD_ENCRYPTION_KEYS"] = keys
    return run_refreshd(*argv, env=env, timeout=120)


async def acli(redis_url: str, *argv: str, keys: str = "", partitions: int = 16) -> Result:
    call = functools.partial(cli, redis_url, *argv, keys=keys, partitions=partitions)
    return await anyio.to_thread.run_sync(call)


@asynccontextmanager
async def store_with(settings: Settings, keys: str) -> AsyncIterator[Store]:
    async with open_store(dataclasses.replace(settings, encryption_keys=keys)) as store:
        yield store


async def records(store: Store, ids: list[str]) -> list[dict[str, str]]:
    return await store.many_raw_fields(ids)


# ------------------------------------------------------------------ generate


def test_generate_prints_one_new_line_the_ring_accepts() -> None:
    first, second = (
        cli("redis://unused", "key", "generate"),
        cli("redis://unused", "key", "generate"),
    )
    assert (first.code, second.code) == (0, 0), first.err
    assert first.out != second.out
    [line] = first.out.splitlines()
    ring = parse_key_ring(line, source="test", one_per_line=True)
    assert ring.primary.startswith("k")
    assert len(ring.primary) == 14  # k<date>-<4 hex>
    named = cli("redis://unused", "key", "generate", "--kid", "prod-2")
    assert named.out.startswith("prod-2:")
    bad = cli("redis://unused", "key", "generate", "--kid", "no spaces")
    assert bad.code == 2
    assert bad.err.strip().splitlines() == [
        "refreshd: error: --kid 'no spaces': a key id is 1-16 letters, digits, '_' or '-'"
    ]


# ------------------------------------------------------------------ plain -> encrypted


async def test_rotate_encrypts_a_plain_database_online(redis_url: str) -> None:
    """Encryption turned on for an existing database: status says plain,
    rotate rewrites every credential and the profile, the tokens and the
    secret read back unchanged, and a worker then refreshes them all."""
    settings = make_settings(redis_url, partitions=4)
    async with FakeProvider() as fake, open_store(settings) as plain:
        grants = await seed(plain, fake, 30, expires_in=3600,
                            profile={"secret_params": {"passcode": "123456"}})  # fmt: skip
        before = {cred_id: await plain.get(cred_id) for cred_id in grants}
        status = await acli(redis_url, "key", "status", keys=K1, partitions=4)
        rotated = await acli(redis_url, "key", "rotate", keys=K1, partitions=4)
        after = await acli(redis_url, "key", "status", keys=K1, partitions=4)
        assert status.code == 0, status.err
        assert status.json()["credentials"] == {"total": 30, "by_key": {"plain": 30}, "pending": 30}
        assert status.json()["profiles"] == {"total": 1, "by_key": {"plain": 1}, "pending": 1}
        assert rotated.code == 0, rotated.err
        assert rotated.json()["credentials_rewritten"] == 30
        assert rotated.json()["profiles_rewritten"] == 1
        assert after.json()["credentials"] == {"total": 30, "by_key": {"k1": 30}, "pending": 0}
        assert after.json()["profiles"]["by_key"] == {"k1": 1}
        async with store_with(settings, K1) as store:
            for raw in await records(store, sorted(grants)):
                assert raw["access_token"].startswith(RECORD_MARK + "k1.")
                assert raw["refresh_token"].startswith(RECORD_MARK + "k1.")
            raw_profile: dict[str, str] = await guard(store.client.hgetall(store.keys.profile("p")))
            assert raw_profile["client_secret"].startswith("e1.k1.")
            assert fake.config.client_secret not in json.dumps(raw_profile)
            assert "123456" not in json.dumps(raw_profile)
            profile = await ProfileStore(store).load("p")
            assert profile.client_secret == fake.config.client_secret
            assert dict(profile.secret_params) == {"passcode": "123456"}
            for cred_id, cred in before.items():
                now = await store.get(cred_id)
                assert (now.access_token, now.refresh_token, now.version) == (
                    cred.access_token, cred.refresh_token, cred.version)  # fmt: skip
            # the worker reads what rotate wrote: every credential refreshes
            for cred_id in grants:
                await store.set_due(cred_id, 0)
            async with worker_running(dataclasses.replace(settings, encryption_keys=K1)):
                await _wait_all_current(store, fake, grants)
        assert fake.stats.reuse_events == []


async def _wait_all_current(store: Store, fake: FakeProvider, grants: dict[str, Any]) -> None:
    async def refreshed() -> bool:
        return await all_current(store, fake, grants) and all(
            fake.grant_state(g.grant_id).refreshes >= 1 for g in grants.values()
        )

    await wait_for(refreshed, within=30, what="every credential refreshed")


# ------------------------------------------------------------------ online rotation


async def test_rotation_while_two_worker_processes_refresh(redis_url: str) -> None:
    """Workers run with the new key first in their ring (the order the
    README gives); a quarter of the credentials refresh every second or so
    all through the rotation. No refresh token is sent twice, no token is
    lost, and at the end every record is under the new key."""
    settings = make_settings(redis_url)
    config = FakeProviderConfig(lifetime_s=1)
    async with FakeProvider(config) as fake, store_with(settings, K1) as old:
        await ProfileStore(old).create({
            "id": "p", "token_url": fake.url, "client_id": fake.config.client_id,
            "client_secret": fake.config.client_secret, "allow_http": True,
            "allow_private_network": True, "rotation": "always", "timeout_s": 2,
        })  # fmt: skip
        grants = await add_grants(
            old, fake, 400, profile_id="p", expires_in=lambda n: 0 if n % 4 == 0 else 3600
        )
        ring = f"{K2},{K1}"
        env = {"REFRESHD_ENCRYPTION_KEYS": ring, "REFRESHD_LOG_LEVEL": "info"}
        async with (
            store_with(settings, ring) as store,
            worker_process(redis_url, REFRESHD_WORKER_ID="w1", **env) as w1,
            worker_process(redis_url, REFRESHD_WORKER_ID="w2", **env) as w2,
        ):
            await wait_for(lambda: fake.stats.refreshed >= 200, within=20,
                           what="the busy quarter refreshing")  # fmt: skip
            refreshed_before = fake.stats.refreshed
            result = await rotate(store, busy_wait_s=20)
            await anyio.sleep(1.5)  # refreshes go on over rotated records
            for child in (w1, w2):
                child.process.send_signal(signal.SIGTERM)
            for child in (w1, w2):
                with anyio.fail_after(30):
                    assert await child.process.wait() == 0, child.output()[-2000:]
            status = await key_status(store)
            busy = [cred_id for n, cred_id in enumerate(sorted(grants)) if n % 4 == 0]
            assert await all_current(store, fake, {k: grants[k] for k in busy})
    assert fake.stats.reuse_events == []
    assert fake.stats.refreshed > refreshed_before + 100  # refreshing all along
    assert result.complete, result.to_json()
    assert result.credentials_rewritten >= 300  # the idle ones at least
    assert status.credentials.by_key == {"k2": 400}
    assert status.credentials.pending == 0
    assert status.profiles.by_key == {"k2": 1}


async def test_the_rewrite_script_refuses_a_changed_record_and_a_refresh_in_flight(
    redis_url: str,
) -> None:
    settings = make_settings(redis_url, partitions=1)
    async with FakeProvider() as fake, store_with(settings, K1) as old:
        await seed(old, fake, 1, expires_in=3600)
        cred_id = "cred-00000"
        part = old.keys.partition_of(cred_id)
        keys = [part.cred(cred_id), part.lock(cred_id)]
        script = load_script(old.client, "rekey")
        raw = (await records(old, [cred_id]))[0]
        token = (await old.get(cred_id)).access_token
        fresh = old.encode(cred_id, "access_token", "x")
        stale = ["access_token", raw["access_token"], fresh]
        assert await script(keys=keys, args=["7", *stale]) == "changed"  # another version
        assert await script(keys=keys, args=["0", "access_token", "other", fresh]) == "changed"
        assert (await records(old, [cred_id]))[0] == raw
        # claimed by a worker: busy until the lease lapses (no intent was recorded)
        _, _, claimed = await old.claim(part, limit=1, lease_ms=600, token="t", ids=[cred_id])
        assert claimed
        assert await script(keys=keys, args=["0", *stale]) == "busy"
        async with store_with(settings, f"{K2},{K1}") as store:
            first = await rotate(store, busy_wait_s=0)
            assert first.busy == [cred_id]
            assert (await records(store, [cred_id]))[0]["access_token"] == raw["access_token"]
            second = await rotate(store, busy_wait_s=5)  # waits the lease out
            assert second.busy == []
            assert second.credentials_rewritten == 1
            assert (await store.get(cred_id)).access_token == token
            [raw] = await records(store, [cred_id])
            assert raw["access_token"].startswith(RECORD_MARK + "k2.")


async def test_an_open_spend_intent_waits_and_a_lapsed_one_does_not(redis_url: str) -> None:
    """A request is out (intent before its deadline, even with the lock
    gone): busy. Past its deadline no request can still be answered (the
    next claim recovers it), so the record is rotated."""
    settings = make_settings(redis_url, partitions=1)
    async with FakeProvider() as fake, store_with(settings, K1) as old:
        await seed(old, fake, 1, expires_in=3600)
        cred_id = "cred-00000"
        part = old.keys.partition_of(cred_id)
        _, _, [claimed] = await old.claim(part, limit=1, lease_ms=5000, token="t", ids=[cred_id])
        spend = await old.spend(claimed, timeout_ms=800, margin_ms=100, rt_hash="h")
        assert spend.ok
        await old.client.delete(part.lock(cred_id))  # the worker died after sending
        async with store_with(settings, f"{K2},{K1}") as store:
            first = await rotate(store, busy_wait_s=0)
            assert first.busy == [cred_id]
            second = await rotate(store, busy_wait_s=5)  # the deadline passes meanwhile
            raw = (await records(store, [cred_id]))[0]
    assert second.credentials_rewritten == 1
    assert raw["intent"]  # left for the claim's unknown-outcome rule
    assert raw["refresh_token"].startswith(RECORD_MARK + "k2.")


# ------------------------------------------------------------------ resuming


async def test_an_interrupted_rotation_resumes_where_it_stopped(redis_url: str) -> None:
    settings = make_settings(redis_url, partitions=4)
    async with FakeProvider() as fake, store_with(settings, K1) as old:
        await seed(old, fake, 600, expires_in=3600)
        async with store_with(settings, f"{K2},{K1}") as store:
            seen = 0
            with anyio.CancelScope() as scope:

                def count(n: int) -> None:
                    nonlocal seen
                    seen += n
                    if seen >= 250:
                        scope.cancel()  # Ctrl-C, wherever it lands

                await rotate(store, progress=count)
            assert scope.cancelled_caught
            halfway = await key_status(store)
            assert halfway.credentials.by_key["k1"] == halfway.credentials.pending
            assert 0 < halfway.credentials.by_key["k2"] < 600
            progress = Progress("re-encrypting", await record_count(store), unit="records",
                                stream=io.StringIO(), enabled=True)  # fmt: skip
            rest = await rotate(store, progress=progress.advance)
            done = await key_status(store)
    assert progress.line().startswith("re-encrypting: 601 of 601 records (100%)")
    assert rest.credentials_rewritten == halfway.credentials.pending
    assert rest.already_current == halfway.credentials.by_key["k2"] + 1  # + the profile
    assert done.credentials.by_key == {"k2": 600}
    assert done.credentials.pending == 0


async def test_rotate_moves_an_earlier_releases_text_form_into_the_record_form(
    redis_url: str,
) -> None:
    """Records an earlier release wrote hold the text form (base64url) of
    their ciphertext: they read as before, count as pending, and rotate
    rewrites them in the record form under the same key, a quarter smaller."""
    settings = make_settings(redis_url, partitions=2)
    async with FakeProvider() as fake, store_with(settings, K1) as store:
        grants = await seed(store, fake, 3, expires_in=3600)
        writer = Store(store.client, store.keys, PlainCodec())  # writes values as given
        for cred_id in grants:
            raw = (await records(store, [cred_id]))[0]
            await writer.upsert(
                CredentialInput(
                    id=cred_id,
                    profile=raw["profile"],
                    access_token=text_form(raw["access_token"]),
                    refresh_token=text_form(raw["refresh_token"]),
                    expires_at_ms=int(raw["expires_at"]),
                ),
                due_ms=int(raw["expires_at"]),
                replace=True,
            )
        before = await records(store, sorted(grants))
        assert all(r["refresh_token"].startswith("e1.k1.") for r in before)
        status = await key_status(store)
        result = await rotate(store)
        after = await records(store, sorted(grants))
        for cred_id in grants:
            assert (await store.get(cred_id)).refresh_token == grants[cred_id].refresh_token
    assert status.credentials.by_key == {"k1": 3}
    assert status.credentials.pending == 3
    assert result.credentials_rewritten == 3
    assert (await key_status_of(settings)).credentials.pending == 0
    for old, new in zip(before, after, strict=True):
        for name in ("access_token", "refresh_token"):
            assert new[name].startswith(RECORD_MARK + "k1.")
            assert len(new[name].encode("utf-8", "surrogateescape")) < 0.8 * len(old[name])


async def test_a_database_of_the_previous_release_keeps_the_text_form_until_compact(
    redis_url: str,
) -> None:
    """The previous release reads encrypted secrets in the text form only.
    In a database it created (no ``secrets`` in the layout) this release
    writes the text form too, so both run side by side during an upgrade;
    ``key rotate --compact``, once nothing older runs, lets records hold
    bytes and rewrites them."""
    settings = make_settings(redis_url, partitions=2)
    async with store_with(settings, K1) as first:
        await first.client.hdel(first.keys.layout, "secrets")  # as the previous release left it
    async with FakeProvider() as fake, store_with(settings, K1) as store:
        assert not store.secrets_as_bytes
        grants = await seed(store, fake, 3, expires_in=3600)
        before = await records(store, sorted(grants))
        status = await acli(redis_url, "key", "status", keys=K1, partitions=2)
        plain_rotate = await acli(redis_url, "key", "rotate", keys=K1, partitions=2)
        rotated = await acli(redis_url, "key", "rotate", "--compact", keys=K1, partitions=2)
        after = await records(store, sorted(grants))
        done = await acli(redis_url, "key", "status", keys=K1, partitions=2)
        for cred_id, grant in grants.items():
            assert (await store.get(cred_id)).refresh_token == grant.refresh_token
    for raw in before:
        assert raw["refresh_token"].startswith("e1.k1.")
        assert raw["access_token"].startswith("e1.k1.")
    assert status.json()["record_form"] == "text"
    assert status.json()["credentials"]["pending"] == 0
    assert plain_rotate.json()["credentials_rewritten"] == 0
    assert rotated.code == 0, rotated.err
    assert rotated.json()["credentials_rewritten"] == 3
    for raw in after:
        assert raw["refresh_token"].startswith(RECORD_MARK + "k1.")
        assert raw["access_token"].startswith(RECORD_MARK + "k1.")
    assert done.json()["record_form"] == "bytes"
    assert done.json()["credentials"]["pending"] == 0


def payload_kind(stored: str | bytes, ctx: SecretContext) -> int:
    return sealed.payload_kind(stored, ctx, base64.b64decode(K1.split(":", 1)[1]))


async def test_the_layout_decides_the_payload_kind_too(redis_url: str) -> None:
    """Payload kind 2 (base64url packed 6 bits a character) is new in this
    release, like the record form, and follows the same word of the layout:
    a database of the previous release gets kind 1 (Huffman codes) in both
    forms, also in events, until ``key rotate --compact``."""
    settings = make_settings(redis_url, partitions=2)
    token = base64.urlsafe_b64encode(os.urandom(600)).decode()
    ctx = SecretContext(settings.prefix, "credential", "c1", "access_token")
    async with store_with(settings, K1) as fresh:
        assert payload_kind(fresh.encode("c1", "access_token", token), ctx) == 2
        await fresh.client.hdel(fresh.keys.layout, "secrets")  # as the previous release left it
    async with store_with(settings, K1) as store:
        assert payload_kind(store.encode("c1", "access_token", token), ctx) == 1
        assert payload_kind(store.codec.encode(token, ctx), ctx) == 1  # an event's
        sealed = store.encode("c1", "access_token", token)
        assert isinstance(sealed, str)  # the text form
        assert store.decode("c1", "access_token", sealed) == token
        # one codec given to stores of two databases (the client library
        # takes one): each store writes what its own database's layout allows
        shared = AesGcmCodec(parse_key_ring(K1, source="K1", one_per_line=False))
        older = Store(store.client, store.keys, shared)
        newer = Store(store.client, Keyspace("newer:", 2), shared)
        await older.check_layout()
        await newer.check_layout()
        newer_ctx = ctx._replace(prefix="newer:")
        assert payload_kind(newer.encode("c1", "access_token", token), newer_ctx) == 2
        assert payload_kind(older.encode("c1", "access_token", token), ctx) == 1
        await store.allow_secrets_as_bytes()
        assert payload_kind(store.encode("c1", "access_token", token), ctx) == 2
        assert payload_kind(store.codec.encode(token, ctx), ctx) == 2


async def key_status_of(settings: Settings) -> Any:
    async with store_with(settings, K1) as store:
        return await key_status(store)


async def test_ctrl_c_stops_the_command_cleanly_and_a_rerun_finishes(redis_url: str) -> None:
    """`key rotate` as a real process, interrupted (SIGINT) while it waits
    for a credential held by a refresh: exit 130, no traceback, the rest
    rotated; run again once the refresh is over, it rewrites only that one."""
    settings = make_settings(redis_url, partitions=2)
    async with FakeProvider() as fake, store_with(settings, K1) as old:
        await seed(old, fake, 50, expires_in=3600)
        held = "cred-00007"
        part = old.keys.partition_of(held)
        _, _, claimed = await old.claim(part, limit=1, lease_ms=60_000, token="t", ids=[held])
        assert claimed
        env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
        env |= {"REFRESHD_REDIS_URL": redis_url, "REFRESHD_LOG_LEVEL": "error",
                "REFRESHD_PARTITIONS": "2", "REFRESHD_ENCRYPTION_KEYS": f"{K2},{K1}"}  # fmt: skip
        async with store_with(settings, f"{K2},{K1}") as store:
            proc = await anyio.open_process(
                [sys.executable, "-m", "worker", "key", "rotate", "--busy-wait", "60"], env=env
            )
            async with proc:

                async def swept() -> bool:
                    return (await key_status(store)).credentials.pending == 1

                await wait_for(swept, within=30, what="everything but the held credential")
                proc.send_signal(signal.SIGINT)
                with anyio.fail_after(10):
                    code = await proc.wait()
                assert proc.stderr is not None
                err = b"".join([chunk async for chunk in proc.stderr]).decode()
            assert code == 130, err
            assert "Traceback" not in err
            await old.client.delete(part.lock(held))  # the refresh is over
            again = await acli(redis_url, "key", "rotate", keys=f"{K2},{K1}", partitions=2)
            status = await key_status(store)
    assert again.code == 0, again.err
    assert again.json()["credentials_rewritten"] == 1
    assert again.json()["already_current"] == 50  # 49 credentials and the profile
    assert status.credentials.by_key == {"k2": 50}


# ------------------------------------------------------------------ unknown key


async def test_a_key_missing_from_the_ring_is_reported_and_nothing_is_rewritten(
    redis_url: str,
) -> None:
    settings = make_settings(redis_url)
    async with FakeProvider() as fake, store_with(settings, K1) as old:
        grants = await seed(old, fake, 5, expires_in=3600)
        before = await records(old, sorted(grants))
        status = await acli(redis_url, "key", "status", keys=K2)
        rotated = await acli(redis_url, "key", "rotate", keys=K2)
        unset = await acli(redis_url, "key", "rotate")
        after = await records(old, sorted(grants))
    assert status.code == 0, status.err
    assert status.json()["unknown_keys"] == ["k1"]
    assert status.json()["credentials"]["by_key"] == {"k1": 5}
    assert status.err.strip().splitlines() == [
        "refreshd: 5 credential(s) and 1 profile(s) are encrypted under key id 'k1', which is "
        "not in the key ring: they cannot be read until it is added back"
    ]
    assert rotated.code == 1
    assert rotated.json()["unreadable"] == {"credential unknown_key k1": 5,
                                            "profile unknown_key k1": 1}  # fmt: skip
    assert rotated.error_line == (
        "refreshd: error: not rotated, cannot be read with this key ring: 5 credential "
        "unknown_key k1, 1 profile unknown_key k1; add the missing key back to the ring (after "
        "the primary) and run `refreshd key rotate` again"
    )
    assert unset.code == 2
    assert "no ring is set" in unset.err
    assert "Traceback" not in rotated.err + status.err + unset.err
    assert after == before
