"""Sentinel failover under load: a primary, a replica and a sentinel (all real
Valkey processes on loopback), `refreshd run` connected through a
``redis+sentinel://`` URL, and the primary killed mid-run.

What must hold: the worker follows the failover, no refresh token is ever
sent twice, and no rotated token is lost - because every spend intent and
commit waited for the replica (WAIT) before it counted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from tests.harness import make_settings, seed, wait_for
from tests.redis_server import RedisServer, free_port, server_binary
from worker.app import open_store
from worker.errors import ConfigError, StoreUnavailable
from worker.fakeprovider import FakeProvider, FakeProviderConfig
from worker.models import Status
from worker.redisio import connect, guard, parse_sentinel_url

pytestmark = pytest.mark.anyio

SERVICE = "refreshd-primary"


class SentinelProcess:
    def __init__(self, data_dir: Path, primary_port: int) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = data_dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {data_dir}\n"
            f"logfile {data_dir / 'sentinel.log'}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
        )
        self.proc = subprocess.Popen(
            [server_binary(), str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)

    def primary_port(self) -> int | None:
        try:
            addr = self.client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "get-master-addr-by-name", SERVICE
            )
        except redis.RedisError:
            return None
        return int(addr[1]) if addr else None

    def stop(self) -> None:
        self.client.close()
        self.proc.kill()
        self.proc.wait()


def _poll(predicate: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, SentinelProcess]]:
    primary = RedisServer(tmp_path / "primary")
    replica = RedisServer(tmp_path / "replica")
    primary.start()
    replica.start()
    sentinel: SentinelProcess | None = None
    try:
        replica.client().execute_command(  # type: ignore[no-untyped-call]
            "REPLICAOF", "127.0.0.1", str(primary.port)
        )
        info = primary.client(decode_responses=True)
        _poll(lambda: info.info("replication")["connected_slaves"] == 1, 10, "the replica")
        sentinel = SentinelProcess(tmp_path / "sentinel", primary.port)
        _poll(lambda: sentinel.primary_port() == primary.port, 10, "the sentinel")
        yield primary, replica, sentinel
    finally:
        if sentinel is not None:
            sentinel.stop()
        replica.stop()
        primary.stop()


def test_parse_sentinel_url() -> None:
    target = parse_sentinel_url(
        "redis+sentinel://app:p%40ss@10.0.0.1:26379,10.0.0.2:26380/main?sentinel_password=s"
    )
    assert target.hosts == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
    assert target.service == "main"
    assert target.auth == {"username": "app", "password": "p@ss"}
    assert target.sentinel_auth == {"password": "s"}
    assert target.tls == {}


@pytest.mark.parametrize(
    "url",
    [
        "rediss+sentinel://10.0.0.1:26379/main",
        "redis+sentinel://10.0.0.1:26379/main?ssl=true",
        "rediss+sentinel://10.0.0.1:26379/main?ssl=yes",
    ],
)
def test_sentinel_url_asks_for_tls(url: str) -> None:
    assert parse_sentinel_url(url).tls == {"ssl": True}


def test_sentinel_url_tls_options() -> None:
    target = parse_sentinel_url(
        "rediss+sentinel://s1:26379/main?ssl_ca_certs=/etc/ca.pem&ssl_certfile=/c.pem"
        "&ssl_keyfile=/k.pem&ssl_cert_reqs=optional&ssl_check_hostname=false&sentinel_username=u"
    )
    assert target.tls == {
        "ssl": True,
        "ssl_ca_certs": "/etc/ca.pem",
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem",
        "ssl_cert_reqs": "optional",
        "ssl_check_hostname": False,
    }
    assert target.sentinel_auth == {"username": "u"}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379/main?tls=true", r"unknown option\(s\) .*: tls"),
        ("redis+sentinel://s1:26379/main?ssl=maybe", "true or false"),
        ("rediss+sentinel://s1:26379/main?ssl=false", "contradicts"),
        ("redis+sentinel://s1:26379/main?ssl_ca_certs=/ca.pem", "use rediss\\+sentinel://"),
        ("rediss+sentinel://s1:26379/main?ssl_cert_reqs=always", "ssl_cert_reqs is one of"),
    ],
)
def test_sentinel_url_refuses_what_it_would_ignore(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_sentinel_url(url)


async def test_tls_reaches_the_sentinels_and_the_primary() -> None:
    """The options land where redis-py uses them: TLS connections to every
    sentinel and to the primary it names, with the operator's CA, and the
    sentinels keep the socket timeouts (nothing is connected here)."""
    url = "rediss+sentinel://127.0.0.1:1,127.0.0.1:2/main?ssl_ca_certs=/etc/refreshd/ca.pem"
    async with connect(url, socket_timeout=3.0) as client:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert issubclass(pool.connection_class, SentinelManagedSSLConnection)
        assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/refreshd/ca.pem"
        for node in pool.sentinel_manager.sentinels:
            node_pool = node.connection_pool
            assert issubclass(node_pool.connection_class, SSLConnection)
            assert node_pool.connection_kwargs["ssl_ca_certs"] == "/etc/refreshd/ca.pem"
            assert node_pool.connection_kwargs["socket_timeout"] == 3.0


async def test_ssl_true_is_not_ignored_against_a_real_sentinel(
    cluster: tuple[RedisServer, RedisServer, SentinelProcess],
) -> None:
    """This sentinel speaks plain TCP (the bundled Valkey has no TLS, and no
    certificate tooling is installed): the plain URL works, and with
    ``?ssl=true`` or ``rediss+sentinel://`` the TLS handshake is really
    attempted, so the connection fails instead of silently going in clear."""
    _, _, sentinel = cluster
    plain = f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}"
    async with open_store(make_settings(plain)) as store:
        assert await store.ping()
    for url in (f"{plain}?ssl=true", plain.replace("redis+", "rediss+", 1)):
        async with connect(url, socket_connect_timeout=1.0, socket_timeout=1.0) as client:
            with pytest.raises(StoreUnavailable):
                await guard(client.ping())


async def test_worker_follows_a_failover_without_reuse_or_loss(
    cluster: tuple[RedisServer, RedisServer, SentinelProcess],
) -> None:
    primary, replica, sentinel = cluster
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}"
    settings = make_settings(url)
    config = FakeProviderConfig(lifetime_s=4, rotate=True, revoke_on_reuse=True)
    async with FakeProvider(config) as provider:
        async with open_store(settings) as store:
            grants = await seed(store, provider, 40)
            assert store.durability.replicas == 1  # spends and commits WAIT for the replica
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")},
            "REFRESHD_REDIS_URL": url,
            "REFRESHD_HTTP_PORT": "0",
            "REFRESHD_LEASE_SECONDS": "5",
            "REFRESHD_SPEND_MARGIN_SECONDS": "0.5",
            "REFRESHD_BACKOFF_BASE_SECONDS": "0.2",
            "REFRESHD_BACKOFF_MAX_SECONDS": "1",
        }
        worker = await anyio.open_process(
            [sys.executable, "-m", "worker", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            def refreshed(times: int) -> bool:
                return all(
                    provider.grant_state(g.grant_id).refreshes >= times for g in grants.values()
                )

            await wait_for(lambda: refreshed(1), within=20, what="first refreshes")
            primary.kill()  # no goodbye: the sentinel must notice and promote the replica
            await wait_for(
                lambda: sentinel.primary_port() == replica.port, within=30, what="failover"
            )
            before = {gid: provider.grant_state(g.grant_id).refreshes for gid, g in grants.items()}
            await wait_for(
                lambda: all(
                    provider.grant_state(g.grant_id).refreshes >= before[gid] + 2
                    for gid, g in grants.items()
                ),
                within=40,
                what="refreshes after the failover",
            )
        finally:
            worker.terminate()
            with anyio.fail_after(30):
                await worker.wait()
        assert worker.returncode == 0
        assert provider.stats.reuse_events == []
        assert max(provider.send_counts.values()) == 1
        async with open_store(settings) as store:
            for cred_id, grant in grants.items():
                cred = await store.get(cred_id)
                state = provider.grant_state(grant.grant_id)
                assert cred.status is Status.ACTIVE
                assert cred.refresh_token == state.refresh_token  # nothing lost


async def test_the_client_cache_is_flushed_by_a_failover_and_follows_the_new_primary(
    cluster: tuple[RedisServer, RedisServer, SentinelProcess],
) -> None:
    """worker.client's token cache through Sentinel: the primary's death
    flushes it; it comes back on the promoted replica, where a commit
    invalidates it as before."""
    from tests.test_client_cache import CRED, commit_new_token, link_of
    from worker.client import connect as connect_client

    primary, replica, sentinel = cluster
    settings = make_settings(f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}")
    async with FakeProvider() as provider, open_store(settings) as store:
        await seed(store, provider, 1, expires_in=3600)
        key = store.keys.partition_of(CRED).cred(CRED)
    _poll(lambda: replica.client().exists(key), 10, "the credential on the replica")
    async with connect_client(settings) as client:
        link = link_of(client)
        first = await client.get(CRED)
        assert await client.get(CRED) == first
        flushes = link.cache.flushes
        primary.kill()
        await wait_for(lambda: link.cache.flushes > flushes, within=10, what="the flush")
        assert len(link.cache) == 0
        await wait_for(lambda: sentinel.primary_port() == replica.port, within=30, what="failover")
        await wait_for(lambda: link.up and link.can_serve(), within=20, what="the cache back")
        assert link._conn.port == replica.port
        assert (await client.get(CRED)).version == first.version
        async with open_store(settings) as store:
            await commit_new_token(store, CRED, "on-the-new-primary")

            async def moved() -> bool:
                return (await client.get(CRED)).access_token == "on-the-new-primary"

            await wait_for(moved, within=5, what="the invalidation from the new primary")
