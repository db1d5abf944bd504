"""Encryption at rest end to end: real Valkey (its AOF read back), real HTTP,
real workers with a key ring.

- After several rotations per credential, no token the provider issued and
  no secret the profile holds is anywhere in Redis (every key DUMPed), in
  the AOF files, or on pub/sub; the client library with the ring reads
  them all back.
- A record that does not decrypt (altered, swapped with another
  credential's, under a key not in the ring, or a profile secret altered)
  stops that credential with a reason and an event, sends nothing, and
  the worker goes on refreshing the others.
- A database written without encryption keeps working with a ring set,
  and its records are encrypted as they are refreshed.
"""

from __future__ import annotations

import base64
import secrets
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus

from tests.harness import Events, add_grants, make_settings, seed, wait_for, worker_running
from tests.redis_server import RedisServer
from worker.app import open_store
from worker.client import CredentialUnreadable, Quarantined, Refreshed, connect
from worker.codec import PlainCodec, SecretContext
from worker.errors import NotFound, SecretUnreadable
from worker.fakeprovider import FakeProvider, FakeProviderConfig, Fault, IssuedGrant
from worker.keyring import AesGcmCodec, KeyRing
from worker.models import CredentialInput, Status
from worker.profiles import ProfileStore
from worker.settings import Settings
from worker.store import Store

pytestmark = pytest.mark.anyio

RING = "k1:" + base64.b64encode(bytes(range(32))).decode()


def keyed(redis_url: str, **overrides: Any) -> Settings:
    return make_settings(redis_url, encryption_keys=RING, **overrides)


async def _raw_pubsub(
    store: Store, into: list[bytes], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    async with store.client.pubsub() as pubsub:
        await pubsub.subscribe(store.keys.events)
        task_status.started()
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                data = message["data"]
                into.append(data.encode() if isinstance(data, str) else data)


def _dump_everything(server: RedisServer) -> bytes:
    """Every key's DUMP (the serialized value, as a backup or replica holds it)."""
    with server.client() as c:
        return b"\n".join(c.dump(key) or b"" for key in c.scan_iter(count=1000))


def _files(directory: Path) -> bytes:
    """Every file the server wrote (AOF base and increments, RDB)."""
    return b"\n".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
                      and p.suffix not in {".log", ".out", ".conf"})  # fmt: skip


def _found(haystack: bytes, needles: list[str]) -> list[str]:
    return [n for n in needles if n.encode() in haystack]


async def test_no_token_or_secret_in_redis_its_aof_or_events(
    redis_server: RedisServer, redis_url: str
) -> None:
    client_secret, passcode = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    id_token = "eyJ" + secrets.token_urlsafe(60)
    config = FakeProviderConfig(client_secret=client_secret, lifetime_s=2, access_token_bytes=300)
    settings = keyed(redis_url, partitions=4)
    published: list[bytes] = []
    events = Events()
    async with FakeProvider(config) as provider, open_store(settings) as store:
        profile = {"secret_params": {"passcode": passcode}, "keep_fields": ["id_token"]}
        grants = await seed(store, provider, 24, profile=profile, expires_in=1)
        # one answer carries a kept id_token (a secret extra) into the record and its event
        answer = {
            "access_token": "at-" + secrets.token_urlsafe(30),
            "token_type": "Bearer",
            "expires_in": 3600,
            "refresh_token": "rt-" + secrets.token_urlsafe(30),
            "id_token": id_token,
        }
        first = grants["cred-00000"].refresh_token
        provider.inject(Fault("status", match_refresh_token=first, status=200, body=answer))
        rotating = {cid: g for cid, g in grants.items() if cid != "cred-00000"}
        async with anyio.create_task_group() as tg:
            await tg.start(_raw_pubsub, store, published)
            await tg.start(events.listen, store)
            async with worker_running(settings):
                await wait_for(
                    lambda: all(_refreshes(provider, g) >= 3 for g in rotating.values()),
                    within=40,
                    what="three rotations of every credential",
                )
            tg.cancel_scope.cancel()
        # the client library with the ring reads what the provider issued last
        async with connect(settings) as client:
            for cred_id, grant in rotating.items():
                token = await client.get(cred_id, min_ttl=None)
                assert token.access_token == provider.grant_state(grant.grant_id).access_token
            kept = await client.get("cred-00000", min_ttl=None)
            assert kept.extra == {"id_token": id_token}
            opened = [
                e.event
                async for e in client.events(since="start", follow=False)
                if isinstance(e.event, Refreshed)
            ]
    issued = [*provider.minted, str(answer["access_token"]), str(answer["refresh_token"])]
    secret_values = [*issued, client_secret, passcode, id_token]
    assert len(provider.minted) >= 2 * 24 + 3 * 2 * 23  # grants, then 3 rotations each

    # events were published sealed, and the client opened every one
    assert len(opened) >= 3 * 23
    assert all(e.secrets == "" and e.access_token in issued for e in opened)
    assert [e.extra for e in opened if e.credential_id == "cred-00000"] == [{"id_token": id_token}]
    sealed = events.of("token.refreshed")
    assert sealed
    assert all(
        e["secrets"] == "encrypted" and e["access_token"].startswith("e1.k1.") for e in sealed
    )

    # nothing anywhere in clear; the same search finds a value stored plainly
    control = _plain_control(redis_server)
    dumped, on_disk = _dump_everything(redis_server), _files(redis_server.data_dir)
    assert _found(dumped, [control]) == [control]
    assert _found(on_disk, [control]) == [control]
    assert _found(dumped, secret_values) == []
    assert _found(on_disk, secret_values) == []
    assert _found(b"\n".join(published), secret_values) == []


def _plain_control(server: RedisServer) -> str:
    """A random value stored plainly and fsynced: proves that the search of
    the DUMPs and the AOF files finds a token when one is there."""
    value = "control-" + secrets.token_urlsafe(24)
    with server.client() as c:
        c.set("control:plain", value)
        c.execute_command("WAITAOF", 1, 0, 5000)
    return value


def _refreshes(provider: FakeProvider, grant: IssuedGrant) -> int:
    return provider.grant_state(grant.grant_id).refreshes


# ------------------------------------------------------- unreadable records


async def _rewrite(store: Store, cred_id: str, **stored: str) -> None:
    """Replace stored token fields with exactly these (already encoded)
    values, as someone with write access to Redis could; due now."""
    raw = await store.raw_fields(cred_id)
    writer = Store(store.client, store.keys, PlainCodec())  # writes values as given
    cred = CredentialInput(
        id=cred_id,
        profile=raw["profile"],
        access_token=stored.get("access_token", raw["access_token"]),
        refresh_token=stored.get("refresh_token", raw["refresh_token"]),
        expires_at_ms=int(time.time() * 1000) + 3_600_000,
        scope=raw.get("scope", ""),
    )
    await writer.upsert(cred, due_ms=int(time.time() * 1000), replace=True)


async def test_an_unreadable_record_stops_that_credential_and_sends_nothing(
    redis_url: str,
) -> None:
    settings = keyed(redis_url)
    events = Events()
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 5, expires_in=3600)
        raw = {cid: await store.raw_fields(cid) for cid in grants}
        rt = {cid: fields["refresh_token"] for cid, fields in raw.items()}
        # altered: one character of the ciphertext changed
        pos = len(rt["cred-00000"]) // 2
        flipped = "A" if rt["cred-00000"][pos] != "A" else "B"
        await _rewrite(store, "cred-00000", refresh_token=rt["cred-00000"][:pos] + flipped
                       + rt["cred-00000"][pos + 1 :])  # fmt: skip
        # swapped: each holds the other's (valid) ciphertext
        await _rewrite(store, "cred-00001", refresh_token=rt["cred-00002"])
        await _rewrite(store, "cred-00002", refresh_token=rt["cred-00001"])
        # under a key id the ring does not have
        gone = AesGcmCodec(KeyRing([("gone", bytes(32))]))
        plaintext = grants["cred-00003"].refresh_token
        ctx = SecretContext(store.keys.prefix, "credential", "cred-00003", "refresh_token")
        await _rewrite(store, "cred-00003", refresh_token=gone.encode(plaintext, ctx))
        # a profile whose client secret was altered: its credential stops too
        await ProfileStore(store).create({"id": "p2", "token_url": provider.url,
            "client_id": provider.config.client_id, "client_secret": "s3cret",
            "allow_http": True, "allow_private_network": True})  # fmt: skip
        other = await add_grants(store, provider, 1, profile_id="p2", prefix="p2cred",
                                 expires_in=0)  # fmt: skip
        key = store.keys.profile("p2")
        stored_secret = str(await store.client.hget(key, "client_secret"))
        await store.client.hset(key, "client_secret", stored_secret[:-2] + "zz")
        await store.set_due("cred-00004", int(time.time() * 1000))
        bad = ["cred-00000", "cred-00001", "cred-00002", "cred-00003", "p2cred-00000"]
        reasons = {"cred-00000": "undecryptable", "cred-00001": "undecryptable",
                   "cred-00002": "undecryptable", "cred-00003": "unknown_key",
                   "p2cred-00000": "undecryptable"}  # fmt: skip

        async def stopped() -> bool:
            return await _all_stopped(store, bad)

        async with anyio.create_task_group() as tg:
            await tg.start(events.listen, store)
            async with worker_running(settings) as workers:
                await wait_for(stopped, within=20, what="every unreadable credential stopped")
                await wait_for(lambda: _refreshes(provider, grants["cred-00004"]) == 1)
                # the worker is alive and keeps refreshing the readable one
                await store.set_due("cred-00004", int(time.time() * 1000))
                await wait_for(lambda: _refreshes(provider, grants["cred-00004"]) == 2)
                assert not workers[0].worker.stopped
            tg.cancel_scope.cancel()

        all_grants = grants | other
        for cid in bad:
            assert _refreshes(provider, all_grants[cid]) == 0, cid  # nothing was sent
            assert provider.send_counts.get(all_grants[cid].refresh_token, 0) == 0
            cred = await store.get(cid, secrets=False)
            assert cred.last_error == reasons[cid]
        quarantined = {e["credential_id"]: e["reason"] for e in events.of("credential.quarantined")}
        assert quarantined == reasons
        assert provider.stats.requests == 2  # cred-00004, twice

        # the client library: a typed error for a record it cannot read
        ctx = SecretContext(store.keys.prefix, "credential", "cred-00004", "access_token")
        await _rewrite(store, "cred-00004", access_token=gone.encode("at", ctx))
        await store.set_due("cred-00004", int(time.time() * 1000) + 3_600_000)
        async with connect(settings) as client:
            with pytest.raises(CredentialUnreadable) as err:
                await client.get("cred-00004", min_ttl=None)
            assert err.value.reason == "unknown_key"
            assert "gone" in str(err.value)
            with pytest.raises(Quarantined):  # its access token reads; it is stopped
                await client.get("cred-00000", min_ttl=None)
            listed = await client.list()
            assert len(listed.rows) == 6  # a listing does not decrypt, nor stop at one


# ---------------------------------------------------- an existing database


async def test_plain_records_work_with_a_ring_and_are_encrypted_by_refreshes(
    redis_url: str,
) -> None:
    plain = make_settings(redis_url)
    async with FakeProvider() as provider:
        async with open_store(plain) as store:
            grants = await seed(store, provider, 4, expires_in=3600)
            assert (await store.raw_fields("cred-00000"))["refresh_token"] == grants[
                "cred-00000"
            ].refresh_token
        settings = keyed(redis_url)
        async with open_store(settings) as store, connect(settings) as client:
            # read as they are (the ring's codec accepts plain values)
            cred = await store.get("cred-00001")
            assert cred.refresh_token == grants["cred-00001"].refresh_token
            token = await client.get("cred-00001", min_ttl=None)
            assert token.access_token == grants["cred-00001"].access_token
            # refreshed with the plain profile secret, and written back encrypted
            await store.set_due("cred-00000", int(time.time() * 1000))
            async with worker_running(settings):
                await wait_for(lambda: _refreshes(provider, grants["cred-00000"]) == 1)
                await wait_for(lambda: _version(store, "cred-00000"), what="the refresh's commit")
            raw = await store.raw_fields("cred-00000")
            assert store.codec.key_id(raw["refresh_token"]) == "k1"
            assert store.codec.key_id(raw["access_token"]) == "k1"
            assert (
                store.codec.key_id((await store.raw_fields("cred-00002"))["refresh_token"]) is None
            )
            state = provider.grant_state(grants["cred-00000"].grant_id)
            assert (await store.get("cred-00000")).refresh_token == state.refresh_token


async def _version(store: Store, cred_id: str) -> bool:
    return (await store.get(cred_id, secrets=False)).version >= 1


async def test_a_worker_without_the_ring_sends_no_ciphertext(redis_url: str) -> None:
    """Started without the ring on an encrypted database, a worker must not
    hand ciphertext to the provider as if it were the token."""
    async with FakeProvider() as provider:
        async with open_store(keyed(redis_url)) as store:
            grants = await seed(store, provider, 2, expires_in=0)
        async with open_store(make_settings(redis_url)) as store:
            assert isinstance(store.codec, PlainCodec)
            async with worker_running(make_settings(redis_url)):
                await wait_for(lambda: _all_stopped(store, list(grants)), what="both stopped")
            cred = await store.get("cred-00000", secrets=False)
            assert cred.last_error == "unknown_key"
    assert provider.stats.requests == 0


async def _all_stopped(store: Store, ids: list[str]) -> bool:
    for cid in ids:
        if (await store.get(cid, secrets=False)).status is not Status.QUARANTINED:
            return False
    return True


async def test_the_claim_reply_carries_ciphertext_only(redis_url: str) -> None:
    """Up to a batch of refresh tokens cross the wire in each claim reply:
    with a ring, each is ciphertext, decrypted by the worker that sends it."""
    async with FakeProvider() as provider, open_store(keyed(redis_url, partitions=1)) as store:
        grants = await seed(store, provider, 5, expires_in=0)
        part = store.keys.partition(0)
        reply = await store.scripts.claim(
            keys=[part.due, part.stats], args=[part.base, 10, 5000, "tok", ""]
        )
        assert len(reply) == 2 + 5
        wire = repr(reply)
        assert all(g.refresh_token not in wire for g in grants.values())
        assert all(store.codec.key_id(item[3]) == "k1" for item in reply[2:])
        claimed = store._claimed(part, "tok", reply)
        assert {c.id: c.refresh_token for c in claimed} == {
            cid: g.refresh_token for cid, g in grants.items()
        }


async def test_a_profile_whose_secret_does_not_decrypt_can_be_shown_and_repaired(
    redis_url: str,
) -> None:
    settings = keyed(redis_url)
    async with FakeProvider() as provider, open_store(settings) as store:
        profiles = ProfileStore(store)
        await seed(store, provider, 1, profile={"secret_params": {"passcode": "123456"}})
        key = store.keys.profile("p")
        for name in ("client_secret", "secret_params"):
            stored = str(await store.client.hget(key, name))
            await store.client.hset(key, name, stored[:-2] + "zz")
        shown = await profiles.get("p")
        assert shown["unreadable_secrets"] == ["client_secret", "secret_params"]
        assert shown["has_client_secret"] is True
        assert [p["id"] for p in await profiles.list()] == ["p"]  # one bad secret hides nothing
        with pytest.raises(SecretUnreadable, match="give a new client_secret"):
            await profiles.update("p", {"timeout_s": 3})
        repaired = await profiles.update(
            "p",
            {
                "client_secret": provider.config.client_secret,
                "secret_params": {"passcode": "654321"},
            },
        )
        assert "unreadable_secrets" not in repaired
        profile = await profiles.load("p")
        assert profile.client_secret == provider.config.client_secret
        assert dict(profile.secret_params) == {"passcode": "654321"}


async def test_a_profile_whose_secret_does_not_decrypt_can_still_be_deleted(
    redis_url: str,
) -> None:
    settings = keyed(redis_url)
    async with FakeProvider() as provider, open_store(settings) as store:
        profiles = ProfileStore(store)
        await seed(store, provider, 2)
        key = store.keys.profile("p")
        stored = str(await store.client.hget(key, "client_secret"))
        await store.client.hset(key, "client_secret", stored[:-2] + "zz")
        assert await profiles.delete("p", force=True) == 2
        with pytest.raises(NotFound):
            await profiles.get("p")
        with pytest.raises(NotFound):
            await profiles.delete("p")


@pytest.mark.parametrize("ring", ["", RING], ids=["plain", "encrypted"])
async def test_a_record_with_900_bytes_of_random_tokens_fits_one_kib(
    redis_url: str, ring: str
) -> None:
    """Redis allocates a record's value in size classes (1 KiB, then 1.25):
    encrypted, a record with 900 characters of random base64url tokens
    (what real tokens look like) must stay in the class a plain one is in.
    The text form of its ciphertext took 1,166 bytes; the record form,
    packed first, takes less than the plain record."""
    settings = make_settings(redis_url, partitions=1, encryption_keys=ring)
    async with FakeProvider() as provider, open_store(settings) as store:
        await seed(store, provider, 1, expires_in=3600)
        cred = CredentialInput(
            id="random-1", profile="p", access_token=secrets.token_urlsafe(600),
            refresh_token=secrets.token_urlsafe(75), expires_at_ms=int(time.time() * 1000)
            + 3_600_000, scope="read write",
        )  # fmt: skip
        await store.upsert(cred, due_ms=cred.expires_at_ms, replace=False)
        size = await store.client.strlen(store.keys.partition_of("random-1").cred("random-1"))
        got = await store.get("random-1")
    assert (got.access_token, got.refresh_token) == (cred.access_token, cred.refresh_token)
    assert size <= 1024
    if ring:  # payload kind 2, 6 bits a character (kind 1, Huffman codes, took 900 B)
        assert size <= 880
