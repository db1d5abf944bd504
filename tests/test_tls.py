"""TLS to private token endpoints: REFRESHD_CA_FILE, a profile's ca_pem,
and ``tls_error`` that stops after a few attempts. A real https server on
127.0.0.1 with a certificate from a CA made for the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faultkit import running
from tests.harness import make_settings, seed, wait_for, worker_running
from tests.tlscerts import make_ca
from worker.app import open_store
from worker.errors import ConfigError
from worker.fakeprovider import FakeProvider
from worker.models import Status
from worker.profile import Profile
from worker.refresher import TLS_ATTEMPTS

pytestmark = pytest.mark.anyio


async def test_a_profile_ca_lets_the_refresh_through(redis_url: str, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    settings = make_settings(redis_url)
    async with (
        FakeProvider(ssl_context=ca.server_context()) as provider,
        open_store(settings) as store,
    ):
        assert provider.url.startswith("https://")
        await seed(store, provider, 2, profile={"ca_pem": ca.ca_pem.read_text()})
        async with worker_running(settings):
            await wait_for(lambda: provider.stats.refreshed == 2, within=10, what="refreshed")


async def test_refreshd_ca_file_is_added_to_the_system_store(
    redis_url: str, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path / "ca")
    settings = make_settings(redis_url, ca_file=str(ca.ca_pem))
    async with (
        FakeProvider(ssl_context=ca.server_context()) as provider,
        open_store(settings) as store,
    ):
        await seed(store, provider, 1)
        async with worker_running(settings):
            await wait_for(lambda: provider.stats.refreshed == 1, within=10, what="refreshed")


async def test_an_untrusted_certificate_stops_as_tls_error(redis_url: str, tmp_path: Path) -> None:
    """No CA for the server's certificate: ``tls_error`` naming the problem,
    retried a few times, then needs_reauth instead of retrying forever."""
    ca = make_ca(tmp_path / "ca")
    settings = make_settings(redis_url, backoff_base_s=0.1, backoff_max_s=0.2)
    async with (
        FakeProvider(ssl_context=ca.server_context()) as provider,
        open_store(settings) as store,
    ):
        grants = await seed(store, provider, 1)
        async with running(settings, store) as (events, _):

            async def stopped() -> bool:
                return (await store.get("cred-00000")).status is Status.NEEDS_REAUTH

            await wait_for(stopped, within=15, what="the credential to stop")
        cred = await store.get("cred-00000")
        assert cred.failures == TLS_ATTEMPTS
        assert cred.last_error.startswith("tls_error: certificate:")
        assert "unable to get local issuer certificate" in cred.last_error
        assert provider.stats.requests == 0  # the handshake failed: nothing was sent
        (stop,) = events.of("credential.needs_reauth")
        assert stop["reason"] == "tls_error"
        assert stop["detail"] == "certificate: unable to get local issuer certificate"
        assert cred.refresh_token == grants["cred-00000"].refresh_token


def test_a_profile_refuses_a_ca_pem_that_is_not_a_certificate() -> None:
    base = {"id": "p", "token_url": "https://auth.example.com/t", "client_id": "c",
            "client_secret": "s"}  # fmt: skip
    with pytest.raises(ConfigError, match="ca_pem"):
        Profile.from_mapping(base | {"ca_pem": "hello"})
    bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    with pytest.raises(ConfigError, match="ca_pem"):
        Profile.from_mapping(base | {"ca_pem": bad})
