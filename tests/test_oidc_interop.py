"""refreshd against a real, strict authorization server: node oidc-provider
(``tests/interop/oidc_peer.py``) with refresh-token rotation on every use,
where presenting a rotated refresh token again revokes the whole grant.

Racing workers refresh batches of real grants several times each; the peer
must see no reuse, no revocation, and exactly one refresh per committed
version. Afterwards every stored refresh token must still be live at the
peer, which proves refreshd kept each rotated token and lost none. A
negative control feeds refreshd an already-rotated token to show that the
peer (and so these tests) does catch a second send.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote_plus

import anyio
import httpx
import pytest

from tests.harness import Events, RunningWorker, make_settings, wait_for, worker_running
from tests.interop.oidc_peer import MintedGrant, OidcPeer, PeerStats
from worker.app import open_store, schedule_from
from worker.cli.credentials import import_lines
from worker.models import AuthMethod, Credential, Profile, Status
from worker.oauth2 import build_refresh_request
from worker.profiles import ProfileStore
from worker.settings import Settings
from worker.store import Store

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

# The peer's access tokens live ACCESS_TTL_S; refreshd refreshes LEAD_S
# before expiry. Schedule.lead_s caps a profile lead at 90 % of the
# lifetime and jitter moves the due time up to 10 % of the lead earlier, so
# each credential comes due again 0.1-1.0 s after every refresh: many
# rounds of racing in a few seconds.
ACCESS_TTL_S = 10
LEAD_S = 9.5
ROUNDS = 3


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def peer() -> Iterator[OidcPeer]:
    reason = OidcPeer.available()
    if reason is not None:
        pytest.skip(reason)
    with OidcPeer(access_token_ttl=ACCESS_TTL_S) as started:
        yield started


# ----------------------------------------------------------------- helpers


def profile_fields(peer: OidcPeer, auth_method: AuthMethod, profile_id: str) -> dict[str, Any]:
    return {
        "id": profile_id,
        "token_url": peer.token_url,
        "client_id": peer.client_id,
        "client_secret": peer.client_secret,
        "auth_method": auth_method.value,
        "body_format": "form",
        "rotation": "always",
        "refresh_lead_s": LEAD_S,
        "timeout_s": 5,
        "allow_http": True,
        "allow_private_network": True,
    }


async def import_grants(
    store: Store,
    settings: Settings,
    grants: dict[str, MintedGrant],
    *,
    profile_id: str,
) -> None:
    """Import each grant as a credential due now (``expires_in`` 0)."""
    lines = [
        json.dumps(
            {
                "id": cred_id,
                "profile": profile_id,
                "access_token": grant.access_token,
                "refresh_token": grant.refresh_token,
                "expires_in": 0,
                "scope": grant.scope,
            }
        )
        for cred_id, grant in grants.items()
    ]
    summary = await import_lines(store, lines, schedule=schedule_from(settings), replace=False)
    assert summary["created"] == len(grants), summary
    assert summary["failed"] == 0, summary["errors"]


async def stored(store: Store, ids: list[str]) -> dict[str, Credential]:
    return {cred_id: await store.get(cred_id) for cred_id in ids}


async def versions(store: Store, ids: list[str]) -> list[int]:
    """Every credential's version in one round trip: polling with one
    ``store.get`` per credential would lag seconds behind racing workers
    that share this event loop."""
    return [int(f.get("version") or 0) for f in await store.many_raw_fields(ids)]


async def peer_stats(peer: OidcPeer) -> PeerStats:
    return await anyio.to_thread.run_sync(peer.stats)


def refresh_request(peer: OidcPeer, refresh_token: str, auth_method: AuthMethod) -> dict[str, Any]:
    """httpx keyword arguments for one direct refresh, as a plain client would
    send it. Basic credentials are form-encoded first (RFC 6749 §2.3.1)."""
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if auth_method is AuthMethod.CLIENT_SECRET_POST:
        data |= {"client_id": peer.client_id, "client_secret": peer.client_secret}
        return {"data": data}
    raw = f"{quote_plus(peer.client_id)}:{quote_plus(peer.client_secret)}".encode()
    basic = "Basic " + base64.b64encode(raw).decode("ascii")
    return {"data": data, "headers": {"Authorization": basic}}


async def refresh_directly(
    http: httpx.AsyncClient, peer: OidcPeer, refresh_token: str, auth_method: AuthMethod
) -> httpx.Response:
    return await http.post(peer.token_url, **refresh_request(peer, refresh_token, auth_method))


async def race_to_rounds(
    peer: OidcPeer,
    redis_url: str,
    *,
    count: int,
    auth_method: AuthMethod,
    workers: int,
    concurrency: int = 32,
) -> None:
    """Mint ``count`` grants, let ``workers`` racing workers refresh each at
    least ``ROUNDS`` times, then check everything the peer and refreshd say.
    A concurrency below ``count`` keeps one worker from taking all."""
    settings = make_settings(redis_url, concurrency=concurrency)
    minted = await anyio.to_thread.run_sync(peer.mint, count)
    grants = {f"oidc-{n:04d}": grant for n, grant in enumerate(minted)}
    ids = sorted(grants)
    async with open_store(settings) as store:
        await ProfileStore(store).create(profile_fields(peer, auth_method, "oidc"))
        await import_grants(store, settings, grants, profile_id="oidc")
        events = Events()
        async with anyio.create_task_group() as tg:
            await tg.start(events.listen, store)
            async with worker_running(settings, count=workers) as running:

                async def all_refreshed() -> bool:
                    return min(await versions(store, ids)) >= ROUNDS

                await wait_for(all_refreshed, within=30, what=f"{ROUNDS} refreshes each")
            # workers are drained; let the last events arrive
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()

        creds = await stored(store, ids)
        stats = await peer_stats(peer)
        total_versions = sum(c.version for c in creds.values())

        # The peer saw no refresh token twice, revoked nothing, refused nothing.
        assert stats.reuse == 0, stats
        assert stats.reuse_by_reason == {}, stats
        assert stats.revoked == 0, stats
        assert stats.revoked_grants == 0, stats
        assert stats.errors == {}, stats
        assert stats.minted == count
        # Every request the peer answered was committed, and only those.
        assert stats.refreshes == total_versions, (stats, total_versions)
        assert all_took_part(running)

        for cred_id, cred in creds.items():
            assert cred.status is Status.ACTIVE, (cred_id, cred.last_error)
            assert cred.version >= ROUNDS
            assert cred.failures == 0, (cred_id, cred.last_error)
            assert cred.last_error == ""
            assert not cred.in_flight, cred_id
            assert cred.refresh_token != grants[cred_id].refresh_token
            assert set(cred.scope.split()) == {"openid", "offline_access"}
            assert cred.token_type == "Bearer"
        assert len({c.refresh_token for c in creds.values()}) == count

        # One token.refreshed event per commit, versions 1..n for each
        # credential, nothing else, and never a refresh token.
        assert len(events.of("token.refreshed")) == total_versions
        assert len(events.items) == total_versions, [e["type"] for e in events.items]
        published = {(e["credential_id"], e["version"]) for e in events.items}
        expected = {(i, v) for i, c in creds.items() for v in range(1, c.version + 1)}
        assert published == expected
        assert all("refresh_token" not in e for e in events.items)
        latest = {
            e["credential_id"]: e
            for e in events.items
            if e["version"] == creds[e["credential_id"]].version
        }
        for cred_id, cred in creds.items():
            assert latest[cred_id]["access_token"] == cred.access_token
            assert latest[cred_id]["expires_at"] == cred.expires_at_ms

        # Every stored refresh token is the grant's live one: refreshd kept
        # each rotated token. A lost or stale one would be refused (and, if
        # already rotated, revoke the grant and show up as reuse).
        async with httpx.AsyncClient(timeout=10) as http:
            for cred_id, cred in creds.items():
                response = await refresh_directly(http, peer, cred.refresh_token, auth_method)
                assert response.status_code == 200, (cred_id, response.text)
                assert response.json()["refresh_token"] != cred.refresh_token
        after = await peer_stats(peer)
        assert after.refreshes == total_versions + count
        assert after.reuse == 0, after
        assert after.revoked_grants == 0, after
        assert after.errors == {}, after


def all_took_part(running: list[RunningWorker]) -> bool:
    return all(w.metrics.claimed._value.get() > 0 for w in running)


# ------------------------------------------------------------------- tests


async def test_racing_workers_refresh_real_grants_without_reuse(
    peer: OidcPeer, redis_url: str
) -> None:
    """100 real grants, client_secret_basic, 3 racing workers, >= 3 rotations each."""
    await race_to_rounds(
        peer, redis_url, count=100, auth_method=AuthMethod.CLIENT_SECRET_BASIC, workers=3
    )


async def test_client_secret_post_refreshes_real_grants_without_reuse(
    peer: OidcPeer, redis_url: str
) -> None:
    """The same promise when the client authenticates in the form body."""
    # What refreshd sends for this profile: the secret in the body, no Basic header.
    profile = Profile.from_mapping(profile_fields(peer, AuthMethod.CLIENT_SECRET_POST, "oidc"))
    request = build_refresh_request(profile, refresh_token="rt", granted_scope="openid")
    assert "authorization" not in request.headers
    body = dict(httpx.QueryParams(request.content.decode()))
    assert body["client_id"] == peer.client_id
    assert body["client_secret"] == peer.client_secret

    await race_to_rounds(
        peer, redis_url, count=20, auth_method=AuthMethod.CLIENT_SECRET_POST, workers=3
    )


async def test_awkward_client_credentials_interoperate_over_basic(redis_url: str) -> None:
    """A client id and secret holding ``: + % / = & ~`` and a space: refreshd
    form-encodes them before base64 (RFC 6749 §2.3.1, the profile default),
    which is what oidc-provider decodes."""
    reason = OidcPeer.available()
    if reason is not None:
        pytest.skip(reason)
    with OidcPeer(
        access_token_ttl=ACCESS_TTL_S,
        client_id="refreshd:interop+1%",
        client_secret="s3cr3t+/:%=&~ x",
    ) as peer:
        await race_to_rounds(
            peer,
            redis_url,
            count=10,
            auth_method=AuthMethod.CLIENT_SECRET_BASIC,
            workers=2,
            concurrency=4,
        )


async def test_negative_control_an_already_rotated_token_is_caught(
    peer: OidcPeer, redis_url: str
) -> None:
    """Proves the zero-reuse assertions can fail: refreshd is handed a refresh
    token that was already rotated elsewhere. Its one send is reuse at the
    peer, which revokes the grant; refreshd stops (needs_reauth), says so,
    and never sends that token again."""
    settings = make_settings(redis_url)
    (grant,) = await anyio.to_thread.run_sync(peer.mint, 1)
    async with httpx.AsyncClient(timeout=10) as http:
        first = await refresh_directly(
            http, peer, grant.refresh_token, AuthMethod.CLIENT_SECRET_BASIC
        )
        assert first.status_code == 200, first.text
        rotated = first.json()["refresh_token"]
        assert rotated != grant.refresh_token

        async with open_store(settings) as store:
            await ProfileStore(store).create(
                profile_fields(peer, AuthMethod.CLIENT_SECRET_BASIC, "oidc")
            )
            await import_grants(store, settings, {"stale-0000": grant}, profile_id="oidc")
            events = Events()
            async with anyio.create_task_group() as tg:
                await tg.start(events.listen, store)
                async with worker_running(settings, count=1):

                    async def gave_up() -> bool:
                        return (await store.get("stale-0000")).status is not Status.ACTIVE

                    await wait_for(gave_up, within=15, what="the stale credential to stop")
                    # Time for several more rounds had it kept going.
                    await anyio.sleep(1.5)
                await anyio.sleep(0.3)
                tg.cancel_scope.cancel()

            cred = await store.get("stale-0000")
        stats = await peer_stats(peer)

        # The peer caught exactly one second send and revoked the grant.
        assert stats.reuse == 1, stats
        assert stats.reuse_by_reason == {"refresh token already used": 1}, stats
        assert stats.revoked_grants == 1, stats
        assert stats.refreshes == 1, "only the direct refresh succeeded"
        assert stats.errors == {"invalid_grant: refresh token already used": 1}, stats

        # refreshd stopped at the refusal and told consumers.
        assert cred.status is Status.NEEDS_REAUTH
        assert cred.version == 0
        assert cred.last_error == "invalid_grant (HTTP 400)"
        assert cred.refresh_token == grant.refresh_token
        assert not cred.in_flight
        assert [e["type"] for e in events.items] == ["credential.needs_reauth"]
        (event,) = events.of("credential.needs_reauth")
        assert event["credential_id"] == "stale-0000"
        assert event["reason"] == "invalid_grant"
        assert event["version"] == 0
        assert "refresh_token" not in event

        # The revocation took the legitimately rotated token down with it.
        dead = await refresh_directly(http, peer, rotated, AuthMethod.CLIENT_SECRET_BASIC)
        assert dead.status_code == 400, dead.text
        assert dead.json()["error"] == "invalid_grant"
