"""Guarded egress (worker/egress.py, worker/urltemplate.py): where a token
request may go and what it may carry.

Profile and import checks are pure. The connect-time guard is tested
against a small HTTP server on 127.0.0.1 that counts the connections it
accepts: a refused request must not even connect. DNS rebinding is played
by a stub resolver that maps a public-looking name onto 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from anyio.abc import SocketAttribute, SocketStream
from multidict import CIMultiDict
from structlog.testing import capture_logs

from tests.harness import make_settings
from worker.app import build_refresher, open_store
from worker.cli.credentials import import_lines
from worker.egress import GuardedConnector, check_token_host, refused_address
from worker.errors import ConfigError, Permanent
from worker.metrics import Metrics
from worker.models import CredentialInput, Profile
from worker.profiles import ProfileStore
from worker.scheduling import Schedule
from worker.store import Store
from worker.strategies import build_request, token_url
from worker.transport import TokenRequest, make_http_client, send

pytestmark = pytest.mark.anyio

NOW_MS = 1_700_000_000_000
HINT = "allow_private_network"


def profile(**overrides: Any) -> Profile:
    fields: dict[str, Any] = {
        "id": "p",
        "token_url": "https://idp.example/oauth/token",
        "client_id": "cid",
        "client_secret": "csecret",
    }
    return Profile(**(fields | overrides))


# ------------------------------------------------------------ profile create


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "https://localhost/token",
        "https://localhost:8443/token",
        "https://10.1.2.3/token",
        "https://172.16.0.9/token",
        "https://192.168.1.1/token",
        "https://100.64.0.1/token",
        "https://127.0.0.1:9/token",
        "https://0.0.0.0/token",
        "https://[::1]/token",
        "https://[fd00::1]/token",
        "https://[fe80::1]/token",
        "https://[::ffff:10.0.0.1]/token",
        "https://kubernetes.default.svc/api",
        "https://kubernetes.default.svc.cluster.local/api",
        "https://metadata.google.internal/computeMetadata/v1/",
        "https://kubernetes/api",
        "https://2130706433/token",
        "https://idp.localhost./token",
    ],
)
def test_profile_create_refuses_private_and_internal_token_hosts(url: str) -> None:
    with pytest.raises(ConfigError, match=HINT):
        profile(token_url=url)


def test_private_token_hosts_are_allowed_with_the_explicit_allowance() -> None:
    p = profile(token_url="https://10.1.2.3/token", allow_private_network=True)
    assert p.allow_private_network is True
    assert p.public()["allow_private_network"] is True
    assert profile().allow_private_network is False


def test_allow_http_alone_no_longer_opens_plain_http_to_any_host() -> None:
    with pytest.raises(ConfigError, match=HINT):
        profile(token_url="http://idp.example/token", allow_http=True)
    with pytest.raises(ConfigError, match=HINT):
        profile(token_url="http://127.0.0.1:9/token", allow_http=True)
    with pytest.raises(ConfigError, match="https"):  # the allowance alone is not http either
        profile(token_url="http://127.0.0.1:9/token", allow_private_network=True)
    ok = profile(token_url="http://127.0.0.1:9/t", allow_http=True, allow_private_network=True)
    assert ok.allow_http is True


@pytest.mark.parametrize(
    "url",
    [
        "https://{host}/token",
        "https://{tenant}.idp.example/token",
        "https://idp.example:{port}/token",
        "{scheme}://idp.example/token",
        "https://user{x}@idp.example/token",
        "https://idp.example/token#{frag}",
    ],
)
def test_placeholders_may_not_choose_scheme_host_or_port(url: str) -> None:
    with pytest.raises(ConfigError, match="placeholder"):
        profile(token_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "https://idp.example/{a.b}/token",
        "https://idp.example/{x:>300000000}/token",
        "https://idp.example/{x!r}/token",
        "https://idp.example/{x[0]}/token",
        "https://idp.example/{}/token",
        "https://idp.example/{{x}}/token",
        "https://idp.example/{x/token",
        "https://idp.example/x}/token",
        "https://idp.example/{x}.json",
        "https://idp.example/v{x}/token",
        "https://idp.example/token?a=b{x}",
        "https://idp.example/token?{x}=1",
    ],
)
def test_format_specs_and_partial_placeholders_are_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="placeholder"):
        profile(token_url=url)


def test_placeholders_are_whole_segments_and_query_values_percent_encoded() -> None:
    p = profile(token_url="https://idp.example/t/{tenant}/x?realm={realm}&v=2")
    assert p.url_params == {"tenant", "realm"}
    url = token_url(p, {"tenant": "a/b?c#d", "realm": "r&s=t %"})
    assert url == "https://idp.example/t/a%2Fb%3Fc%23d/x?realm=r%26s%3Dt%20%25&v=2"
    last = profile(token_url="https://idp.example/api/{id}")
    assert token_url(last, {"id": "42"}) == "https://idp.example/api/42"


@pytest.mark.parametrize("value", ["..", ".", ""])
def test_a_dot_segment_param_is_refused_at_refresh_and_import(value: str) -> None:
    p = profile(token_url="https://idp.example/api/{id}/token")
    with pytest.raises(ConfigError, match="param id"):
        build_request(p, secret="rt", params={"id": value})
    cred = CredentialInput.from_json(
        {"id": "c", "profile": "p", "refresh_token": "rt", "expires_in": 60,
         "params": {"id": value}},
        now_ms=NOW_MS,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="param id"):
        cred.check_against(p)


# ------------------------------------------------------------ CR/LF


@pytest.mark.parametrize(
    "overrides",
    [
        {"client_id": "cid\r\nX-Evil: 1"},
        {"client_secret": "sec\nret"},
        {"secret_params": {"passcode": "1\r\n2"}},
        {"extra_params": {"audience": "a\rb"}},
        {"redirect_uri": "https://app.example/cb\r\nX: y"},
        {"scope": "read\nwrite"},
        {"accept": "application/json\r\nX-Evil: 1"},
        {"name": "acme\x00"},
        {"token_url": "https://idp.example/token\r\nX: y"},
    ],
    ids=lambda o: next(iter(o)),
)
def test_control_characters_are_refused_in_profile_values(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="control characters") as caught:
        profile(**overrides)
    assert not set("\r\n") & set(str(caught.value))


@pytest.mark.parametrize(
    "overrides",
    [
        {"refresh_token": "rt\r\nX-Evil: 1"},
        {"access_token": "at\n"},
        {"token_type": "Bearer\r\n"},
        {"scope": "a\rb"},
        {"params": {"id": "1\r\nX: y"}},
    ],
    ids=lambda o: next(iter(o)),
)
def test_control_characters_are_refused_in_imported_credentials(
    overrides: dict[str, Any],
) -> None:
    line = {"id": "c", "profile": "p", "refresh_token": "rt", "expires_in": 60} | overrides
    with pytest.raises(ConfigError, match="control characters") as caught:
        CredentialInput.from_json(line, now_ms=NOW_MS)
    assert "X-Evil" not in str(caught.value)


def test_a_bearer_secret_with_crlf_is_never_sent() -> None:
    """Defence in depth: the bearer (the profile's client_secret, Workato's
    developer API token) is checked when written; one stored before that
    check still never goes out as ``Authorization: Bearer``."""
    p = profile(strategy="secret_rotation", auth_method="bearer", method="PUT", rotation="never")
    object.__setattr__(p, "client_secret", "dev-token\r\nX-Evil: 1")  # a stored profile
    with pytest.raises(Permanent) as caught:
        build_request(p, secret="")
    assert caught.value.reason == "unsafe_request"
    assert "X-Evil" not in str(caught.value)


def test_a_header_value_that_slipped_past_validation_is_never_sent() -> None:
    p = profile()
    object.__setattr__(p, "accept", "application/json\r\nX-Evil: 1")  # a stored profile
    with pytest.raises(Permanent, match="header Accept"):
        build_request(p, secret="rt")


# ------------------------------------------------------------ connect-time guard


def test_address_classes() -> None:
    assert refused_address("93.184.216.34") is None
    assert refused_address("2606:4700::1111") is None
    assert refused_address("169.254.169.254") == "cloud metadata"
    assert refused_address("127.0.0.1") == "loopback"
    assert refused_address("::ffff:127.0.0.1") == "loopback"
    assert refused_address("64:ff9b::a9fe:a9fe") == "cloud metadata"  # NAT64
    assert refused_address("2002:a00:1::1") == "private"  # 6to4
    assert refused_address("64:ff9b::5db8:d822") is None  # NAT64 of a public address
    assert refused_address("10.0.0.1") == "private"
    assert refused_address("100.64.1.1") == "shared (CGNAT)"
    assert refused_address("224.0.0.1") == "multicast"
    assert refused_address("fe80::1%eth0") == "link-local"
    check_token_host("idp.example")  # a public-looking name passes; its address is checked later


@dataclass
class Server:
    url: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)


@asynccontextmanager
async def counting_server() -> AsyncIterator[Server]:
    """An HTTP server on 127.0.0.1 that answers every request with a token
    and counts the connections it accepts."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - not Django
    server = Server(f"http://127.0.0.1:{port}/token")
    body = b'{"access_token": "at", "expires_in": 60}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"

    async def handle(stream: SocketStream) -> None:
        server.connections += 1
        async with stream:
            with suppress(anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                while True:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += await stream.receive()
                    server.requests.append(data)
                    await stream.send(answer % len(body) + body)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


def request_to(url: str, **options: Any) -> TokenRequest:
    return TokenRequest("POST", url, CIMultiDict({"Accept": "application/json"}), b"x=1", **options)


async def test_a_loopback_token_endpoint_is_refused_before_connecting() -> None:
    async with counting_server() as server, make_http_client() as http:
        with pytest.raises(Permanent) as caught:
            await send(http, request_to(server.url), timeout_s=5)
        localhost = server.url.replace("127.0.0.1", "localhost")
        with pytest.raises(Permanent):  # through DNS: every address it resolves to
            await send(http, request_to(localhost), timeout_s=5)
    assert caught.value.reason == "egress_refused"
    assert "loopback" in caught.value.detail
    assert HINT in caught.value.detail
    assert (server.connections, server.requests) == (0, [])


async def test_the_allowance_lets_a_profile_reach_a_private_endpoint() -> None:
    p = profile(token_url="http://127.0.0.1:9/token", allow_http=True, allow_private_network=True)
    request = build_request(p, secret="rt")
    assert request.allow_private_network is True
    async with counting_server() as server, make_http_client() as http:
        answer = await send(http, request_to(server.url, allow_private_network=True), timeout_s=5)
    assert answer.status == 200


class Rebinding(AbstractResolver):
    """Every name resolves to 127.0.0.1: a public-looking token host whose
    DNS answer later points inside the network."""

    def __init__(self) -> None:
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups += 1
        return [
            {"hostname": host, "host": "127.0.0.1", "port": port,
             "family": socket.AF_INET, "proto": 0, "flags": 0}
        ]  # fmt: skip

    async def close(self) -> None:
        return None


async def test_the_address_actually_connected_to_is_checked_fresh_cached_and_pooled() -> None:
    """DNS rebinding: ``idp.example`` passes profile creation, then resolves
    to 127.0.0.1. Refused on a fresh lookup, on aiohttp's cached lookup, and
    on a pooled connection opened for a profile that allows private networks."""
    resolver = Rebinding()
    connector = GuardedConnector(resolver=resolver, keepalive_timeout=30)
    async with counting_server() as server, aiohttp.ClientSession(connector=connector) as http:
        url = server.url.replace("127.0.0.1", "idp.example")
        with pytest.raises(Permanent, match="egress_refused"):
            await send(http, request_to(url), timeout_s=5)  # fresh lookup
        with pytest.raises(Permanent, match="egress_refused"):
            await send(http, request_to(url), timeout_s=5)  # cached lookup
        assert resolver.lookups == 1
        assert server.connections == 0
        allowed = await send(http, request_to(url, allow_private_network=True), timeout_s=5)
        assert allowed.status == 200
        assert server.connections == 1  # now pooled under idp.example
        with pytest.raises(Permanent, match="egress_refused"):
            await send(http, request_to(url), timeout_s=5)  # the pooled connection
        assert len(server.requests) == 1


# ------------------------------------------------------------ stored profiles


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    settings = make_settings(redis_url, prefix=f"eg{uuid.uuid4().hex[:8]}:")
    async with open_store(settings) as s:
        yield s


async def test_the_allowance_is_logged_and_an_older_private_profile_can_be_repaired(
    store: Store,
) -> None:
    """A profile stored by an earlier release (no ``allow_private_network``
    field) with a loopback host no longer loads; ``profile update`` adds
    the allowance without having to load it first."""
    profiles = ProfileStore(store)
    fields = {"id": "old", "token_url": "http://127.0.0.1:9/token", "auth_method": "none",
              "client_id": "app", "allow_http": True, "allow_private_network": True}  # fmt: skip
    with capture_logs() as logs:
        await profiles.create(fields)
    assert [e["profile_id"] for e in logs if e["event"] == "profile.private_network_allowed"] == [
        "old"
    ]
    await store.client.hdel(store.keys.profile("old"), "allow_private_network")
    with pytest.raises(ConfigError, match=HINT):
        await profiles.load("old")
    updated = await profiles.update("old", {"allow_private_network": True, "name": "fixed"})
    assert (updated["allow_private_network"], updated["name"]) == (True, "fixed")
    assert (await profiles.load("old")).allow_private_network is True


async def test_a_rebound_token_host_stops_the_credential_with_nothing_sent(store: Store) -> None:
    """End to end through the refresher: the profile's host passed creation
    (a public name), its DNS now answers 127.0.0.1. Nothing is sent, the
    refresh token is kept, and the credential waits for an operator as
    ``needs_reauth`` / ``egress_refused`` instead of retrying for ever."""
    settings = make_settings("redis://unused", prefix="unused:")
    async with counting_server() as server:
        port = server.url.rsplit(":", 1)[1].split("/")[0]
        await ProfileStore(store).create(
            {"id": "rb", "token_url": f"https://idp.example:{port}/token",
             "auth_method": "none", "client_id": "app", "rotation": "always"}
        )  # fmt: skip
        line = {"id": "c1", "profile": "rb", "refresh_token": "rt-1", "expires_in": 600}
        await import_lines(store, [json.dumps(line)], schedule=Schedule(), replace=False)
        _, _, claimed = await store.claim(
            store.keys.partition_of("c1"), limit=1, lease_ms=30_000, token="t:1", ids=["c1"]
        )
        connector = GuardedConnector(resolver=Rebinding())
        async with aiohttp.ClientSession(connector=connector) as http:
            refresher = build_refresher(settings, store, http, Metrics())
            outcome = await refresher.refresh(claimed[0])
    cred = await store.get("c1")
    assert (outcome, cred.status, cred.last_error) == (
        "needs_reauth",
        "needs_reauth",
        "egress_refused",
    )
    assert cred.refresh_token == "rt-1"
    assert server.connections == 0


async def test_a_callers_own_socket_factory_runs_after_the_check() -> None:
    made: list[Any] = []

    def factory(addr_info: Any) -> socket.socket:
        made.append(addr_info[4][0])
        return socket.socket(addr_info[0], addr_info[1], addr_info[2])

    connector = GuardedConnector(socket_factory=factory)
    async with counting_server() as server, aiohttp.ClientSession(connector=connector) as http:
        with pytest.raises(Permanent, match="egress_refused"):
            await send(http, request_to(server.url), timeout_s=5)
        assert made == []
        answer = await send(http, request_to(server.url, allow_private_network=True), timeout_s=5)
    assert (answer.status, made) == (200, ["127.0.0.1"])


class TwoPrivate(Rebinding):
    """A name with two private addresses of different kinds."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            {"hostname": host, "host": address, "port": port,
             "family": socket.AF_INET, "proto": 0, "flags": 0}
            for address in ("127.0.0.1", "10.255.255.1")
        ]  # fmt: skip


async def test_every_refused_address_of_a_name_is_still_one_egress_refusal() -> None:
    connector = GuardedConnector(resolver=TwoPrivate())
    async with counting_server() as server, aiohttp.ClientSession(connector=connector) as http:
        url = server.url.replace("127.0.0.1", "idp.example")
        with pytest.raises(Permanent, match="egress_refused"):
            await send(http, request_to(url), timeout_s=5)
    assert server.connections == 0


async def test_a_stored_profile_the_new_rules_refuse_stops_its_credentials(store: Store) -> None:
    """A profile stored by an earlier release with a token host these rules
    refuse (here loopback without ``allow_private_network``) fails to load.
    Before, that ConfigError escaped the refresh and the credential came
    back as ``refresh.crashed`` every lease; now it waits for an operator as
    ``needs_reauth`` / ``config_error``, its refresh token kept."""
    await ProfileStore(store).create(
        {"id": "old", "token_url": "http://127.0.0.1:9/token", "auth_method": "none",
         "client_id": "app", "allow_http": True, "allow_private_network": True}
    )  # fmt: skip
    line = {"id": "c1", "profile": "old", "refresh_token": "rt-1", "expires_in": 600}
    await import_lines(store, [json.dumps(line)], schedule=Schedule(), replace=False)
    # what an earlier release could store: no allowance
    await store.client.hset(store.keys.profile("old"), "allow_private_network", "false")
    _, _, claimed = await store.claim(
        store.keys.partition_of("c1"), limit=1, lease_ms=30_000, token="t:1", ids=["c1"]
    )
    settings = make_settings("redis://unused", prefix="unused:")
    async with make_http_client() as http:
        outcome = await build_refresher(settings, store, http, Metrics()).refresh(claimed[0])
    cred = await store.get("c1")
    assert (outcome, cred.status, cred.last_error) == (
        "needs_reauth",
        "needs_reauth",
        "config_error",
    )
    assert cred.refresh_token == "rt-1"
