"""The oidc-provider peer is a faithful strict peer: refresh tokens rotate on
every use, a replayed rotated token kills the whole grant, and the peer's
counters see exactly that -- including past the ~1,000 entries where
oidc-provider's bundled LRU adapter would have forgotten the used token."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from tests.interop.oidc_peer import MintedGrant, OidcPeer

pytestmark = pytest.mark.interop


@pytest.fixture
def peer() -> Iterator[OidcPeer]:
    reason = OidcPeer.available()
    if reason is not None:
        pytest.skip(reason)
    with OidcPeer() as started:
        yield started


@pytest.fixture
def http(peer: OidcPeer) -> Iterator[httpx.Client]:
    with httpx.Client(auth=httpx.BasicAuth(peer.client_id, peer.client_secret), timeout=30) as c:
        yield c


def refresh(http: httpx.Client, peer: OidcPeer, refresh_token: str) -> httpx.Response:
    """client_secret_basic, form body: what refreshd sends."""
    return http.post(
        peer.token_url,
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
    )


def assert_invalid_grant(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_grant"


def test_mint_gives_distinct_offline_grants(peer: OidcPeer) -> None:
    grants = peer.mint(5)
    assert len(grants) == 5
    assert len({g.refresh_token for g in grants}) == 5
    assert len({g.access_token for g in grants}) == 5
    for grant in grants:
        assert isinstance(grant, MintedGrant)
        assert grant.expires_in == 60
        assert set(grant.scope.split()) == {"openid", "offline_access"}
    assert peer.stats().minted == 5


def test_rotation_and_reuse_revokes_the_grant(peer: OidcPeer, http: httpx.Client) -> None:
    grants = peer.mint(5)
    old = grants[0].refresh_token

    first = refresh(http, peer, old)
    assert first.status_code == 200, first.text
    body = first.json()
    new = body["refresh_token"]
    assert new != old, "rotation is on: every refresh must return a new refresh token"
    assert body["access_token"] != grants[0].access_token
    assert body["token_type"] == "Bearer"

    # Replaying the rotated token is reuse: rejected, and the grant revoked...
    assert_invalid_grant(refresh(http, peer, old))
    stats = peer.stats()
    assert stats.reuse == 1
    assert stats.reuse_by_reason == {"refresh token already used": 1}
    assert stats.revoked >= 1

    # ...which takes the legitimately rotated token down with it.
    assert_invalid_grant(refresh(http, peer, new))

    # Other grants are untouched.
    other = refresh(http, peer, grants[1].refresh_token)
    assert other.status_code == 200, other.text

    stats = peer.stats()
    assert stats.refreshes == 2
    assert stats.reuse == 1, "presenting the revoked (never rotated) token is not reuse"
    assert stats.revoked == stats.revoked_grants == 1
    assert stats.errors == {
        "invalid_grant: refresh token already used": 1,
        "invalid_grant: refresh token not found": 1,
    }


def test_batch_refreshed_once_each_is_never_reuse(peer: OidcPeer, http: httpx.Client) -> None:
    grants = peer.mint(200)
    rotated: list[str] = []
    for grant in grants:
        response = refresh(http, peer, grant.refresh_token)
        assert response.status_code == 200, response.text
        rotated.append(response.json()["refresh_token"])
    assert len(set(rotated)) == 200
    assert not set(rotated) & {g.refresh_token for g in grants}

    stats = peer.stats()
    assert stats.refreshes == 200
    assert stats.reuse == 0
    assert stats.revoked == 0
    assert stats.errors == {}

    # 200 grants leave well over 1,000 stored artifacts; the first rotated
    # token must still be remembered as used, not reported as "not found".
    assert_invalid_grant(refresh(http, peer, grants[0].refresh_token))
    stats = peer.stats()
    assert stats.reuse == 1
    assert stats.reuse_by_reason == {"refresh token already used": 1}
    assert stats.revoked == 1
    assert_invalid_grant(refresh(http, peer, rotated[0]))


def test_stop_reaps_the_node_process() -> None:
    reason = OidcPeer.available()
    if reason is not None:
        pytest.skip(reason)
    peer = OidcPeer()
    peer.start()
    pid = peer.pid
    peer.stop()
    assert not peer.running
    with pytest.raises(RuntimeError, match="not running"):
        peer.mint(1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
