"""The application users of README "Least privilege" against a real Valkey
ACL: the shipped file loads, the consumer gets tokens, follows the log and
asks for min-TTL refreshes; its attempts to claim, spend, commit, upsert,
write a credential or a profile, or forge an event are refused, and leave
the data as it was. (tests/test_client.py covers a hand-made read-only user.)"""

from __future__ import annotations

import dataclasses
import json
import shlex
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from tests.cli_helpers import run_refreshd
from tests.harness import make_settings, seed, wait_for, worker_running
from tests.redis_server import RedisServer
from worker.acl import (
    CONSUMER_USER,
    OPERATOR_USER,
    READER_USER,
    WORKER_USER,
    acl_file,
    acl_rules,
)
from worker.app import open_store
from worker.client import Client, ClientConfigError, connect
from worker.codec import PlainCodec
from worker.eventlog import EventLog
from worker.fakeprovider import FakeProvider
from worker.keyring import generate_key
from worker.keys import Keyspace
from worker.models import CredentialInput
from worker.redisio import script_source
from worker.serverchecks import find_hazards, inspect_server
from worker.settings import Settings
from worker.store import Store

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "deploy" / "redis" / "acl.conf"
CRED = "cred-00000"
REFUSED = r"(?i)no permissions"  # NOPERM, directly or inside a script


def shipped_users() -> dict[str, list[str]]:
    """User name -> rules, from the shipped ACL file's ``user`` lines."""
    users: dict[str, list[str]] = {}
    for line in SHIPPED.read_text().splitlines():
        if line.startswith("user "):
            _, name, *rules = shlex.split(line, posix=False)
            users[name] = rules
    return users


@asynccontextmanager
async def as_user(
    admin: aioredis.Redis, settings: Settings, name: str
) -> AsyncIterator[tuple[Settings, aioredis.Redis]]:
    """The shipped user ``name`` with a password added (ACL SETUSER at
    runtime): its settings for worker.client and a raw connection."""
    rules = shipped_users()[name]
    await admin.execute_command("ACL", "SETUSER", name, "reset", *rules, ">pw")  # type: ignore[no-untyped-call]
    assert settings.redis_url
    url = settings.redis_url.replace("redis://", f"redis://{name}:pw@")
    conn = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        yield dataclasses.replace(settings, redis_url=url), conn
    finally:
        await conn.aclose()
        await admin.acl_deluser(name)


@asynccontextmanager
async def world(
    redis_url: str, *, expires_in: float = 30
) -> AsyncIterator[tuple[Settings, Store, FakeProvider]]:
    settings = make_settings(redis_url)
    async with FakeProvider() as fake, open_store(settings) as store:
        await seed(store, fake, 1, expires_in=expires_in)
        yield settings, store, fake


async def snapshot(store: Store) -> dict[str, Any]:
    """Everything a refused write could have changed."""
    part = store.keys.partition_of(CRED)
    r = store.client
    return {
        "cred": await r.dump(part.cred(CRED)),
        "lock": await r.exists(part.lock(CRED)),
        "due": await r.zrange(part.due, 0, -1, withscores=True),
        "log": await r.xlen(part.log),
        "profile": await r.dump(store.keys.profile("p")),
        "stats": await r.hgetall(part.stats),
    }


# ------------------------------------------------------------ the file


def test_the_shipped_file_is_what_the_command_prints_for_the_defaults() -> None:
    assert SHIPPED.read_text() == acl_file(Keyspace())
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}  # no REFRESHD_*: the defaults
    result = run_refreshd("consumer", "acl", env=env)
    assert result.code == 0, result.err
    assert result.out == SHIPPED.read_text()
    assert set(shipped_users()) == {CONSUMER_USER, READER_USER, WORKER_USER, OPERATOR_USER}


def test_the_rules_follow_the_prefix_and_partition_count() -> None:
    rules = " ".join(acl_rules(Keyspace("app*1:", 200)))
    assert "%R~{app\\*1:[0-9]}:cred:*" in rules
    assert "%R~{app\\*1:[1-9][0-9][0-9]}:log" in rules  # partitions 100-199
    assert "&app\\*1:events" in rules
    assert "(+publish &app\\*1:wake)" in rules
    assert "+zadd" not in " ".join(acl_rules(Keyspace(), refresh=False))


async def test_the_file_loads_as_a_servers_aclfile(tmp_path: Path) -> None:
    """As an operator uses it: a password added to each line, the file given
    to the server as its ``aclfile``; the consumer then reads a token."""
    users = tmp_path / "users.acl"
    lines = SHIPPED.read_text().splitlines()
    users.write_text(
        "".join(f"{line} >pw\n" for line in lines) + "user default on nopass +@all ~* &*\n"
    )
    with RedisServer(tmp_path / "redis", config={"aclfile": str(users)}) as server:
        settings = make_settings(server.url)
        async with world(server.url) as (_, store, _fake):
            loaded = await store.client.acl_users()
            consumer = dataclasses.replace(
                settings, redis_url=server.url.replace("redis://", f"redis://{CONSUMER_USER}:pw@")
            )
            async with connect(consumer) as client:
                token = await client.get(CRED)
    assert set(loaded) == {CONSUMER_USER, READER_USER, WORKER_USER, OPERATOR_USER, "default"}
    assert token.version == 0


async def test_shipped_users_cannot_log_in_until_given_a_password(redis_url: str) -> None:
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for name, rules in shipped_users().items():
            await admin.execute_command("ACL", "SETUSER", name, "reset", *rules)  # type: ignore[no-untyped-call]
            user = await admin.acl_getuser(name)
            assert user is not None
            assert "on" in user["flags"]  # type: ignore[operator]
            assert user["passwords"] == []
            assert "nopass" not in user["flags"]  # type: ignore[operator]
            await admin.acl_deluser(name)
    finally:
        await admin.aclose()


# ------------------------------------------------------------ what it may do


async def test_the_consumer_reads_asks_for_a_refresh_and_follows_the_log(redis_url: str) -> None:
    async with (
        world(redis_url) as (settings, store, fake),
        as_user(store.client, settings, CONSUMER_USER) as (consumer, conn),
    ):
        log = EventLog(conn, store.keys)
        start = await log.end()
        async with worker_running(settings), connect(consumer) as client:
            before = await client.get(CRED, min_ttl=None)
            token = await client.get(CRED, min_ttl=60, timeout=10)  # ZADD + PUBLISH wake
        batch = await log.read(start, block_ms=2000)
        group = log.group("billing", "m1")
        grouped = await group.read()
        await group.ack(grouped.entries)
        pubsub = conn.pubsub()
        await pubsub.subscribe(store.keys.events)
        confirmed = await pubsub.get_message(timeout=2)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert (before.version, token.version) == (0, 1)
    assert [(e.credential_id, e.version, e.type) for e in batch.entries] == [
        (CRED, 1, "token.refreshed")
    ]
    assert [e.version for e in grouped.entries] == [1]
    assert confirmed is not None
    assert confirmed["type"] == "subscribe"
    assert fake.stats.requests == 1


async def test_the_consumer_and_reader_read_through_the_token_cache(redis_url: str) -> None:
    """The cache's tracking connection (RESP3, CLIENT TRACKING) runs as the
    shipped users: the second read is served from memory, a commit by the
    workers' scripts invalidates it, and the server refused nothing."""
    async with world(redis_url) as (settings, store, _):
        for name in (CONSUMER_USER, READER_USER):
            async with (
                as_user(store.client, settings, name) as (user, _conn),
                connect(user) as client,
            ):
                first = await client.get(CRED)
                assert await client.get(CRED) == first
                stats = client.cache_stats()
                assert stats is not None
                assert (stats.hits, stats.serving) == (1, True), name
                await _commit(store)

                async def moved(c: Client = client, v: int = first.version) -> bool:
                    return (await c.get(CRED)).version != v

                await wait_for(moved, within=2.0, what=f"the invalidation ({name})")
        assert await denied(store.client, CONSUMER_USER, READER_USER) == []


async def _commit(store: Store) -> None:
    """A refresh's outcome through the workers' claim, spend and commit scripts."""
    part = store.keys.partition_of(CRED)
    _, _, claimed = await store.claim(part, limit=1, lease_ms=5000, token="t", ids=[CRED])
    assert (await store.spend(claimed[0], timeout_ms=1000, margin_ms=100, rt_hash="h")).ok
    res = await store.commit(claimed[0], "refreshed", next_due="", event="",
                             fields={"access_token": f"at-{claimed[0].version}"})  # fmt: skip
    assert res.ok


async def test_the_reader_reads_but_cannot_ask(redis_url: str) -> None:
    async with (
        world(redis_url) as (settings, store, fake),
        as_user(store.client, settings, READER_USER) as (reader, conn),
    ):
        async with connect(reader) as client:
            assert (await client.get(CRED)).version == 0
            with pytest.raises(ClientConfigError, match="no permissions"):
                await client.get(CRED, min_ttl=60, timeout=1)
        with pytest.raises(NoPermissionError):
            await conn.zadd(store.keys.partition_of(CRED).due, {CRED: 0})
        with pytest.raises(NoPermissionError):
            await EventLog(conn, store.keys).group("g", "m").read()
    assert fake.stats.requests == 0


#: commands neither refreshd process needs, asked of the server with ACL DRYRUN
FORBIDDEN = [
    ("KEYS", "*"), ("FLUSHALL",), ("FLUSHDB",), ("RANDOMKEY",),
    ("CONFIG", "SET", "appendonly", "no"), ("CONFIG", "REWRITE"), ("DEBUG", "SLEEP", "0"),
    ("ACL", "SETUSER", "evil"), ("ACL", "LIST"),
    ("SHUTDOWN", "NOSAVE"), ("CLIENT", "KILL", "TYPE", "normal"), ("CLIENT", "LIST"),
    ("MONITOR",), ("SCRIPT", "FLUSH"), ("SCRIPT", "KILL"), ("FUNCTION", "FLUSH"),
    ("MODULE", "LIST"), ("REPLICAOF", "NO", "ONE"), ("SAVE",), ("BGREWRITEAOF",),
    ("SLAVEOF", "NO", "ONE"), ("MIGRATE", "h", "1", "k", "0", "1"), ("SWAPDB", "0", "1"),
    ("DUMP", "{refreshd:0}:cred:x"), ("RESTORE", "{refreshd:0}:cred:x", "0", "x"),
    ("OBJECT", "ENCODING", "{refreshd:0}:cred:x"), ("RENAME", "{refreshd:0}:due", "x"),
]  # fmt: skip


def trespasses(conn: aioredis.Redis, cred_key: str) -> list[Callable[[], Awaitable[Any]]]:
    """Calls outside a refreshd process's keys, channels and commands, run for real."""
    return [
        lambda: conn.set("elsewhere", "x"),
        lambda: conn.get("{other:0}:cred:x"),
        lambda: conn.get("{refreshd:staging:0}:cred:x"),
        lambda: conn.publish("other:events", "x"),
        lambda: conn.eval("return redis.call('SET', KEYS[1], 'x')", 1, "elsewhere"),
        lambda: conn.eval("return redis.call('KEYS', '*')", 0),
        lambda: conn.dump(cred_key),
        lambda: conn.keys("*"),
        lambda: conn.flushall(),
        lambda: conn.config_set("appendonly", "no"),
    ]


def cli(url: str, *argv: str, stdin: str | None = None, keys: str = "") -> Any:
    """`refreshd ARGV` as a real process logged in through ``url`` (with the
    key ring ``keys``, if any); its JSON."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT), "REFRESHD_REDIS_URL": url,
           "REFRESHD_LOG_LEVEL": "error"}  # fmt: skip
    if keys:
        env["REFRESHD_ENCRYPTION_KEYS"] = keys
    result = run_refreshd(*argv, env=env, stdin=stdin)
    assert result.code == 0, (argv, result.err)
    assert "unsafe" not in result.err
    try:
        return json.loads(result.out)
    except ValueError:
        return result.out  # watch: one JSON line per event


async def denied(admin: aioredis.Redis, *names: str) -> list[str]:
    """What ACL LOG recorded as refused for these users: any entry means a
    command refreshd needs is missing from the shipped rules."""
    entries = await admin.execute_command("ACL", "LOG")  # type: ignore[no-untyped-call]
    found = []
    for entry in entries:  # a map under RESP3, a flat list under RESP2
        fields = (
            entry if isinstance(entry, dict) else dict(zip(entry[::2], entry[1::2], strict=True))
        )
        if fields["username"] in names:
            found.append(f"{fields['username']}: {fields['reason']} {fields['object']}")
    return found


async def test_everything_runs_under_the_shipped_users(redis_url: str, tmp_path: Path) -> None:
    """The operator creates a profile, imports, lists, gets, refreshes now,
    watches, rotates keys and deletes through the real CLI; two workers refresh (cluster
    rate limit, event log, kept extras); the consumer asks for a refresh:
    each as its own user, none as the server's default user, and ACL LOG
    records not one refused command of refreshd's own."""
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    settings = make_settings(redis_url)
    await admin.execute_command("ACL", "LOG", "RESET")  # type: ignore[no-untyped-call]
    try:
        async with (
            as_user(admin, settings, OPERATOR_USER) as (operator, _),
            as_user(admin, settings, WORKER_USER) as (worker, worker_conn),
            as_user(admin, settings, CONSUMER_USER) as (consumer, _),
            FakeProvider() as fake,
        ):
            assert operator.redis_url
            profile = {"id": "p", "token_url": fake.url, "client_id": fake.config.client_id,
                       "client_secret": fake.config.client_secret, "allow_http": True,
                       "allow_private_network": True, "rotation": "always",
                       "rate_limit_per_s": 50, "keep_fields": ["id_token"]}  # fmt: skip
            (tmp_path / "p.json").write_text(json.dumps(profile))
            await anyio.to_thread.run_sync(
                lambda: cli(operator.redis_url or "", "profile", "create", "p",
                            "--from-file", str(tmp_path / "p.json"))
            )  # fmt: skip
            grants = [fake.issue_grant(scope="read") for _ in range(3)]
            lines = "".join(
                json.dumps({"id": f"cred-{n:05d}", "profile": "p", "access_token": g.access_token,
                            "refresh_token": g.refresh_token, "expires_in": 30}) + "\n"
                for n, g in enumerate(grants)
            )  # fmt: skip
            await anyio.to_thread.run_sync(
                lambda: cli(operator.redis_url or "", "credential", "import", "-", stdin=lines)
            )
            async with worker_running(worker, count=2), connect(consumer) as client:
                token = await client.get(CRED, min_ttl=60, timeout=10)
                refreshed = await anyio.to_thread.run_sync(
                    lambda: cli(operator.redis_url or "", "credential", "refresh", "cred-00001")
                )
            facts = await inspect_server(worker_conn)  # INFO, CONFIG GET, WAITAOF
            assert find_hazards(facts, settings.durability) == {}

            def operator_reads() -> list[Any]:
                url = operator.redis_url or ""
                return [
                    cli(url, "status"),
                    cli(url, "credential", "list"),
                    cli(url, "credential", "get", CRED),
                    cli(url, "profile", "list"),
                    cli(url, "watch", "--since", "start", "--count", "2"),
                    cli(url, "key", "rotate", keys=ring),  # plain -> encrypted
                    cli(url, "key", "status", keys=ring),
                    cli(url, "credential", "delete", "cred-00002", keys=ring),
                    cli(url, "profile", "delete", "p", "--force", keys=ring),
                ]

            ring = f"k1:{generate_key()}"
            (
                status,
                listed,
                got,
                profiles,
                watched,
                rotated,
                keys,
                _,
                _,
            ) = await anyio.to_thread.run_sync(operator_reads)
            assert await denied(admin, OPERATOR_USER, WORKER_USER, CONSUMER_USER) == []
    finally:
        await admin.aclose()
    assert token.version == 1
    assert refreshed["outcome"] in {"refreshed", "in_flight_elsewhere"}
    assert status["credentials"] == 3
    assert listed["total"] == 3
    assert got["id"] == CRED
    assert [p["id"] for p in profiles["result"]] == ["p"]
    assert len(watched.splitlines()) == 2
    assert rotated["credentials_rewritten"] == 3
    assert keys["credentials"]["by_key"] == {"k1": 3}
    assert fake.stats.reuse_events == []


async def test_the_worker_and_operator_are_refused_what_they_do_not_need(redis_url: str) -> None:
    """No command outside their lists (KEYS, FLUSHALL, CONFIG SET, DEBUG,
    ACL, SHUTDOWN...), no other installation's keys or channels; the worker
    cannot write a profile, even from Lua."""
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    settings = make_settings(redis_url)
    try:
        async with (
            as_user(admin, settings, WORKER_USER) as (_, worker),
            as_user(admin, settings, OPERATOR_USER) as (_, operator),
            world(redis_url, expires_in=3600) as (_, store, _fake),
        ):
            part = store.keys.partition_of(CRED)
            profile = store.keys.profile("p")
            before = await snapshot(store)
            for name in (WORKER_USER, OPERATOR_USER):
                for command in FORBIDDEN:  # asked of the ACL, never run
                    verdict = await admin.execute_command("ACL", "DRYRUN", name, *command)  # type: ignore[no-untyped-call]
                    assert "no permissions" in str(verdict), (name, command, verdict)
            for conn in (worker, operator):
                for call in trespasses(conn, part.cred(CRED)):
                    with pytest.raises(ResponseError, match=REFUSED):
                        await call()
            for call in (
                lambda: worker.hset(profile, "token_url", "https://attacker.example/token"),
                lambda: worker.delete(profile),
                lambda: worker.zadd(store.keys.profiles, {"evil": 0}),
                lambda: worker.eval("return redis.call('HSET', KEYS[1], 'x', 'y')", 1, profile),
                lambda: worker.scan(),
            ):
                with pytest.raises(ResponseError, match=REFUSED):
                    await call()
            assert await snapshot(store) == before
            assert (await worker.hgetall(profile))["token_url"] == _fake.url  # but it reads it
    finally:
        await admin.aclose()


# ------------------------------------------------------------ what it may not


async def test_the_consumer_cannot_claim_spend_commit_or_upsert(redis_url: str) -> None:
    """The worker's own scripts, run through the consumer's connection (a
    Store on it: EVALSHA, SCRIPT LOAD on NOSCRIPT), are refused, and so is
    a commit of a credential the worker side really claimed."""
    async with (
        world(redis_url, expires_in=3600) as (settings, store, _),
        as_user(store.client, settings, CONSUMER_USER) as (_, conn),
    ):
        rogue = Store(conn, store.keys, PlainCodec())
        part = store.keys.partition_of(CRED)
        before = await snapshot(store)
        with pytest.raises(ResponseError, match=REFUSED):
            await rogue.claim(part, limit=1, lease_ms=5000, token="x", ids=[CRED])
        cred = CredentialInput.from_json(
                {"id": CRED, "profile": "p", "access_token": "a", "refresh_token": "r",
                 "expires_in": 60}, now_ms=0
            )  # fmt: skip
        with pytest.raises(ResponseError, match=REFUSED):
            await rogue.upsert(cred, due_ms=0, replace=True)
        with pytest.raises(ResponseError, match=REFUSED):
            await rogue.delete(CRED, force=True)
        assert await snapshot(store) == before
        # a credential the worker side claimed: the consumer can neither
        # spend its refresh token nor commit tokens of its own
        _, _, claimed = await store.claim(
            part, limit=1, lease_ms=5000, token=uuid.uuid4().hex, ids=[CRED]
        )
        taken = await snapshot(store)
        with pytest.raises(ResponseError, match=REFUSED):
            await rogue.spend(claimed[0], timeout_ms=1000, margin_ms=100, rt_hash="h")
        with pytest.raises(ResponseError, match=REFUSED):
            await rogue.commit(
                    claimed[0], "refreshed", next_due="", event="",
                    fields={"access_token": "forged", "version": 9},
                )  # fmt: skip
        assert await snapshot(store) == taken
        assert (await store.get(CRED)).access_token != "forged"


async def test_the_consumer_cannot_write_keys_profiles_or_events(redis_url: str) -> None:
    async with (
        world(redis_url, expires_in=3600) as (settings, store, _),
        as_user(store.client, settings, CONSUMER_USER) as (_, conn),
    ):
        part = store.keys.partition_of(CRED)
        profile = store.keys.profile("p")
        before = await snapshot(store)
        refused = [
            conn.set(part.cred(CRED), "x"),
            conn.hset(part.cred(CRED), "access_token", "x"),
            conn.delete(part.cred(CRED)),
            conn.set(part.lock(CRED), "mine", nx=True, px=60000),
            conn.zadd(part.lock(CRED), {"x": 1}),  # a key it may not write
            conn.xadd(part.log, {"v": "1", "type": "token.refreshed", "id": CRED}),
            conn.publish(store.keys.events, '{"type": "token.refreshed"}'),
            conn.get(profile),  # profiles hold client secrets
            conn.hset(profile, "client_secret", "x"),
            conn.set(profile, "x"),
            conn.zadd(store.keys.profiles, {"evil": 0}),
            conn.hset(store.keys.layout, "partitions", "3"),
            conn.config_get("maxmemory-policy"),
            conn.flushall(),
            # Lua is no way around it: inner commands meet the same ACL
            conn.eval(
                "return redis.call('SET', KEYS[1], 'x')",
                3,
                part.cred(CRED),
                part.due,
                part.lock(CRED),
            ),
            conn.eval(
                "return redis.call('PUBLISH', ARGV[1], 'x')",
                3,
                part.cred(CRED),
                part.due,
                part.lock(CRED),
                store.keys.events,
            ),
            conn.eval(
                script_source("commit"),
                5,
                part.cred(CRED),
                part.lock(CRED),
                part.due,
                part.stats,
                part.log,
            ),
        ]
        for call in refused:
            with pytest.raises(ResponseError, match=REFUSED):
                await call
        # a script the worker side cached is no way around it either
        sha = await store.client.script_load("return redis.call('SET', KEYS[1], ARGV[1])")
        with pytest.raises(ResponseError, match=REFUSED):
            await conn.evalsha(sha, 3, part.cred(CRED), part.due, part.lock(CRED), "x")
        assert await snapshot(store) == before
