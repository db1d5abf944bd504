"""Issue 10: a provider's tokens are never thrown away, end to end.

A real provider (``FakeProvider``, which really rotates) sits behind an
``AnswerRewriter`` that makes its 2xx answers odd. Whatever is readable is
stored, the event says which fallback applied, and no refresh token is ever
sent twice.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.faultkit import AnswerRewriter, running, seed_profile
from tests.harness import all_current, make_settings, wait_for
from worker.app import open_store
from worker.fakeprovider import FakeProvider, FakeProviderConfig
from worker.models import Status

pytestmark = pytest.mark.anyio

REFRESHED = "token.refreshed"
FAILED = "token.failed"
QUARANTINED = "credential.quarantined"


def _odd_fields(doc: dict[str, Any]) -> dict[str, Any]:
    return doc | {"scope": None, "token_type": None, "expires_in": "soon"}


async def test_odd_secondary_fields_store_the_tokens_with_warnings(redis_url: str) -> None:
    """Before issue 10, each of these fields quarantined the credential and
    the rotated grant was lost."""
    settings = make_settings(redis_url)
    async with (
        FakeProvider() as provider,
        AnswerRewriter(provider.url, _odd_fields) as rewriter,
        open_store(settings) as store,
    ):
        grants = await seed_profile(
            store,
            provider,
            2,
            profile={"id": "p", "token_url": rewriter.url, "default_lifetime_s": 3600},
        )
        async with running(settings, store) as (events, workers):
            await wait_for(lambda: len(events.items) >= 2, within=10, what="two outcomes")
        assert await all_current(store, provider, grants)
        assert events.of(QUARANTINED) == []
        assert provider.stats.reuse_events == []
        for event in events.of(REFRESHED):
            assert event["schema"] == 1
            assert event["token_type"] == "Bearer"
            assert event["scope"] == grants[event["credential_id"]].scope  # the grant's, kept
            assert sorted(event["warnings"]) == [
                "expires_in_invalid",
                "scope_invalid",
                "token_type_invalid",
            ]
            cred = await store.get(event["credential_id"])
            assert cred.status is Status.ACTIVE
            # the profile's default lifetime
            assert 3590_000 < cred.expires_at_ms - cred.refreshed_at_ms <= 3600_000  # type: ignore[operator]
        counter = workers[0].metrics.answer_warnings
        assert counter.labels("p", "expires_in_invalid")._value.get() == 2


class _DropAccessTokenOnce:
    """Drops the access token from the first answer only."""

    def __init__(self) -> None:
        self.dropped = 0

    def __call__(self, doc: dict[str, Any]) -> dict[str, Any]:
        if self.dropped:
            return doc
        self.dropped += 1
        return {k: v for k, v in doc.items() if k != "access_token"}


async def test_a_new_refresh_token_without_an_access_token_is_stored(redis_url: str) -> None:
    """The grant lives in the new refresh token: it is stored (the old access
    token stays), a token.failed event says the access token did not change,
    and the next refresh, soon, spends the new refresh token."""
    settings = make_settings(redis_url)
    rewrite = _DropAccessTokenOnce()
    async with (
        FakeProvider() as provider,
        AnswerRewriter(provider.url, rewrite) as rewriter,
        open_store(settings) as store,
    ):
        grants = await seed_profile(
            store, provider, 1, profile={"id": "p", "token_url": rewriter.url}
        )
        [(cid, grant)] = grants.items()
        async with running(settings, store) as (events, _):
            await wait_for(lambda: events.of(REFRESHED), within=10, what="a full refresh")
        [partial] = events.of(FAILED)
        assert partial["reason"] == "access_token_missing"
        assert partial["warnings"] == ["access_token_missing"]
        assert partial["version"] == 1
        assert "retry_at" in partial
        [refreshed] = events.of(REFRESHED)
        assert refreshed["version"] == 2
        assert events.of(QUARANTINED) == []
        assert provider.grant_state(grant.grant_id).refreshes == 2
        assert await all_current(store, provider, grants)
        assert provider.stats.reuse_events == []
        assert max(provider.send_counts.values()) == 1
        cred = await store.get(cid)
        assert (cred.failures, cred.status) == (0, Status.ACTIVE)


def _no_refresh_token(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "refresh_token"}


@pytest.mark.parametrize("grace_s", [0, 30])
async def test_a_rotating_provider_without_a_new_refresh_token(
    redis_url: str, grace_s: int
) -> None:
    """The access token is stored and published; the old refresh token,
    probably spent, goes out again only inside the reuse grace window
    (then the grant survives), and otherwise never: quarantined at once."""
    settings = make_settings(redis_url)
    answers = {"n": 0}

    def first_without_rt(doc: dict[str, Any]) -> dict[str, Any]:
        answers["n"] += 1
        return _no_refresh_token(doc) if answers["n"] == 1 else doc

    config = FakeProviderConfig(reuse_grace_s=grace_s)
    async with (
        FakeProvider(config) as provider,
        AnswerRewriter(provider.url, first_without_rt) as rewriter,
        open_store(settings) as store,
    ):
        grants = await seed_profile(
            store,
            provider,
            1,
            profile={"id": "p", "token_url": rewriter.url, "reuse_grace_s": grace_s},
        )
        [(cid, grant)] = grants.items()
        async with running(settings, store) as (events, _):
            if grace_s:
                await wait_for(lambda: len(events.of(REFRESHED)) == 2, within=10, what="2")
            else:
                await wait_for(lambda: events.of(QUARANTINED), within=10, what="quarantine")
        first = events.of(REFRESHED)[0]
        assert first["warnings"] == ["refresh_token_missing"]
        assert provider.stats.reuse_events == []
        cred = await store.get(cid)
        if grace_s:
            assert await all_current(store, provider, grants)
            assert provider.send_counts[grant.refresh_token] == 2  # inside the window
        else:
            # the access token the provider issued is stored and was published
            assert first["access_token"] == cred.access_token
            assert cred.access_token == provider.grant_state(grant.grant_id).access_token
            assert cred.status is Status.QUARANTINED
            assert provider.send_counts[grant.refresh_token] == 1
            assert [e["reason"] for e in events.of(QUARANTINED)] == ["unknown_outcome"]
