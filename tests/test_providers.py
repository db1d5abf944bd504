"""The seed systems end to end: each preset against a strict stand-in of its
system (``tests/seed_servers.py``), with real Redis, real HTTP and real
workers.

A stand-in refuses any request not of its system's exact shape, so every
success here proves the shape; the tests still check the recorded request
field by field (present *and* absent), the stored result, the events, and
that a spent token was sent exactly once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from tests.harness import Events, make_settings, wait_for, worker_running
from tests.seed_servers import (
    FORM,
    ClientCredentialsServer,
    CspServer,
    Exchange,
    SmartThingsServer,
    WebMethodsServer,
    WorkatoServer,
)
from worker.app import build_refresher, open_store
from worker.cli.credentials import import_lines
from worker.errors import ConfigError, NotFound
from worker.metrics import Metrics
from worker.models import Credential, CredentialInput, Rotation, Status
from worker.presets import PRESETS
from worker.profiles import ProfileStore
from worker.scheduling import Schedule
from worker.settings import Settings
from worker.store import Store
from worker.transport import make_http_client

pytestmark = pytest.mark.anyio

DAY_MS = 86_400_000
REFRESHED, FAILED, REAUTH = "token.refreshed", "token.failed", "credential.needs_reauth"


@dataclass
class Env:
    settings: Settings
    store: Store
    profiles: ProfileStore
    events: Events

    async def profile(self, **fields: Any) -> dict[str, Any]:
        """``profile create --preset ...``: local endpoints are plain http."""
        return await self.profiles.create(
            {"allow_http": True, "allow_private_network": True} | fields
        )

    async def import_(self, *creds: dict[str, Any]) -> dict[str, Any]:
        lines = [json.dumps(c) for c in creds]
        return await import_lines(self.store, lines, schedule=Schedule(), replace=False)

    async def refresh_once(self, cred_id: str) -> str:
        """Claim this credential and refresh it once, as ``credential refresh`` does."""
        part = self.store.keys.partition_of(cred_id)
        _, _, claimed = await self.store.claim(
            part,
            limit=1,
            lease_ms=int(self.settings.lease_s * 1000),
            token=f"test:{uuid.uuid4().hex}",
            ids=[cred_id],
        )
        assert len(claimed) == 1
        async with make_http_client(max_connections=4) as http:
            refresher = build_refresher(self.settings, self.store, http, Metrics())
            return await refresher.refresh(claimed[0])

    async def settled(self, count: int) -> list[dict[str, Any]]:
        """Every event, once ``count`` have arrived and a moment has passed for
        any extra one (a retry, a duplicate) to show up."""
        await wait_for(lambda: len(self.events.items) >= count, within=10, what=f"{count} events")
        await anyio.sleep(0.2)
        return self.events.items

    async def refreshed(self, count: int) -> None:
        await wait_for(
            lambda: len(self.events.of(REFRESHED)) >= count, within=10, what=f"{count} refreshes"
        )

    async def due_now(self, cred_id: str) -> None:
        """Make a running worker refresh this credential again."""
        assert await self.store.set_due(cred_id, 0)
        await self.store.client.publish(self.store.keys.wake, cred_id)

    async def get(self, cred_id: str) -> Credential:
        return await self.store.get(cred_id)


@asynccontextmanager
async def environment(redis_url: str) -> AsyncIterator[Env]:
    settings = make_settings(redis_url)
    async with open_store(settings) as store, anyio.create_task_group() as tg:
        events = Events()
        await tg.start(events.listen, store)
        try:
            yield Env(settings, store, ProfileStore(store), events)
        finally:
            tg.cancel_scope.cancel()


def assert_lifetime(cred: Credential, seconds: int) -> None:
    """``expires_at`` is the answer's lifetime counted from the refresh."""
    assert cred.refreshed_at_ms is not None
    assert abs(cred.expires_at_ms - (cred.refreshed_at_ms + seconds * 1000)) < 2000


# ------------------------------------------------ profile and import checks


async def test_unknown_preset_is_refused_with_the_list_of_presets(redis_url: str) -> None:
    async with environment(redis_url) as env:
        with pytest.raises(ConfigError, match="unknown preset 'smartthing'") as caught:
            await env.profile(id="x", preset="smartthing", token_url="http://127.0.0.1:9/t")
        assert all(name in str(caught.value) for name in PRESETS)
        assert await env.profiles.list() == []


async def test_webmethods_preset_needs_the_users_token_url(redis_url: str) -> None:
    async with environment(redis_url) as env:
        with pytest.raises(ConfigError, match="preset webmethods needs token_url"):
            await env.profile(id="wm", preset="webmethods", client_id="c", client_secret="s")
        assert await env.profiles.list() == []


@pytest.mark.parametrize("auth", ["client_secret_basic", "client_secret_post", "none"])
async def test_secret_rotation_refuses_any_auth_but_bearer(redis_url: str, auth: str) -> None:
    async with environment(redis_url) as env:
        with pytest.raises(
            ConfigError, match="secret_rotation authenticates with auth_method bearer"
        ):
            await env.profile(
                id="wk",
                preset="workato_secret",
                token_url="http://127.0.0.1:9/api/api_access_profiles/{api_access_profile_id}/x",
                auth_method=auth,
                client_id="c",
                client_secret="s",
            )
        with pytest.raises(NotFound):
            await env.profiles.load("wk")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "auth_method bearer sends client_secret as the bearer token"),
        (
            {"client_secret": "dev-token", "rotation": "always"},
            "secret_rotation spends nothing single-use: rotation must be never",
        ),
    ],
    ids=["no-developer-token", "rotation-always"],
)
async def test_workato_profile_needs_the_developer_token_and_rotation_never(
    redis_url: str, fields: dict[str, Any], message: str
) -> None:
    async with environment(redis_url) as env:
        with pytest.raises(ConfigError, match=message):
            await env.profile(
                id="wk",
                preset="workato_secret",
                token_url=WorkatoServer.url_at("http://127.0.0.1:9"),
                **fields,
            )
        assert await env.profiles.list() == []


async def test_import_reports_bad_lines_by_number_and_imports_the_rest(redis_url: str) -> None:
    async with environment(redis_url) as env:
        await env.profile(
            id="workato",
            preset="workato_secret",
            token_url=WorkatoServer.url_at("http://127.0.0.1:9"),
            client_secret="dev-token",
        )
        await env.profile(
            id="cc",
            preset="client_credentials",
            token_url="http://127.0.0.1:9/t",
            client_id="c",
            client_secret="s",
        )
        await env.profile(
            id="st",
            preset="smartthings",
            token_url="http://127.0.0.1:9/t",
            client_id="c",
            client_secret="s",
        )
        summary = await env.import_(
            {
                "id": "wk-1",
                "profile": "workato",
                "access_token": "tok-1",
                "expires_in": 60,
                "params": {"api_access_profile_id": "17"},
            },
            {"id": "wk-2", "profile": "workato", "access_token": "SECRET-tok-2", "expires_in": 60},
            {
                "id": "wk-3",
                "profile": "workato",
                "expires_in": 0,
                "params": {"api_access_profile_id": 18},
            },
            {"id": "cc-1", "profile": "cc", "expires_in": 0},
            {"id": "st-1", "profile": "st", "access_token": "at", "expires_in": 60},
            {
                "id": "wk-4",
                "profile": "workato",
                "refresh_token": "SECRET-tok-4",
                "expires_in": 0,
                "params": {"api_access_profile_id": "19"},
            },
        )
        assert summary["created"] == 3
        assert summary["errors"] == [
            {"line": 2, "error": "params must set api_access_profile_id (used in the token URL)"},
            {"line": 5, "error": "profile st needs refresh_token"},
            {
                "line": 6,
                "error": "profile workato rotates a secret: give the current secret as "
                "access_token, not refresh_token (the profile's client_secret authorizes)",
            },
        ]
        assert "SECRET" not in json.dumps(summary)
        assert dict((await env.get("wk-1")).params) == {"api_access_profile_id": "17"}
        assert dict((await env.get("wk-3")).params) == {"api_access_profile_id": "18"}
        assert (await env.get("cc-1")).refresh_token == ""
        for missing in ("wk-2", "st-1", "wk-4"):
            with pytest.raises(NotFound):
                await env.get(missing)


async def test_profile_update_with_a_preset_applies_its_settings_again(redis_url: str) -> None:
    """Issue 13: ``profile update --preset X`` re-applies X (it used to only
    relabel): its knobs replace the stored ones, the knobs an earlier
    preset set go back to their defaults, the fields given win, and
    secrets and client ids are kept."""
    async with environment(redis_url) as env:
        url = "http://127.0.0.1:9/v1/oauth/token"
        await env.profile(
            id="p", preset="smartthings", token_url=url, client_id="c", client_secret="s"
        )
        changed = await env.profiles.update("p", {"rotation": "never", "default_lifetime_s": 60})
        assert (changed["rotation"], changed["default_lifetime_s"]) == ("never", 60)

        again = await env.profiles.update("p", {"preset": "smartthings", "token_url": url})
        assert (again["rotation"], again["default_lifetime_s"]) == ("always", 86400)
        assert (again["client_id"], again["has_client_secret"]) == ("c", True)
        assert again["keep_fields"] == PRESETS["smartthings"]["keep_fields"]

        given = await env.profiles.update(
            "p", {"preset": "smartthings", "token_url": url, "default_lifetime_s": 120}
        )
        assert (given["rotation"], given["default_lifetime_s"]) == ("always", 120)

        wk = WorkatoServer.url_at("http://127.0.0.1:9")
        api_key = "http://127.0.0.1:9/api/v2/api_clients/{api_client_id}/api_keys/{api_key_id}/x"
        await env.profile(id="w", preset="workato_api_key", token_url=api_key, client_secret="t")
        moved = await env.profiles.update("w", {"preset": "workato_secret", "token_url": wk})
        assert (moved["preset"], moved["answer_root"], moved["token_url"]) == (
            "workato_secret",
            "",  # workato_api_key's knob, not workato_secret's: back to the default
            wk,
        )
        with pytest.raises(ConfigError, match="preset webmethods needs token_url"):
            await env.profiles.update("w", {"preset": "webmethods"})
        with pytest.raises(ConfigError, match="unknown preset 'workato'"):
            await env.profiles.update("w", {"preset": "workato"})
        assert (await env.profiles.get("w")) == moved | {"updated_at": moved["updated_at"]}


# ------------------------------------------------------ Workato (seed 000)


async def workato_profile(
    env: Env, wk: WorkatoServer, preset: str = "workato_secret", **fields: Any
) -> None:
    """A Workato profile whose bearer is the stand-in's developer API token."""
    url = {
        "workato_secret": wk.token_url,
        "workato_api_key": wk.api_key_url,
        "workato_api_key_embedded": wk.embedded_url,
    }[preset]
    await env.profile(
        id="workato", preset=preset, token_url=url, client_secret=wk.api_token, **fields
    )


async def import_workato(
    env: Env, params: dict[str, Any], *, current: str = "", cred_id: str = "wk-1"
) -> None:
    line: dict[str, Any] = {"id": cred_id, "profile": "workato", "expires_in": 0, "params": params}
    if current:
        line["access_token"] = current  # the secret clients use until the first rotation
    summary = await env.import_(line)
    assert summary["failed"] == 0, summary


def assert_workato_request(exchange: Exchange, wk: WorkatoServer, path: str) -> None:
    """PUT, the developer API token as bearer, nothing else: no body, no
    Content-Type, no query."""
    assert exchange.method == "PUT"
    assert exchange.raw_path == path
    assert exchange.authorization == f"Bearer {wk.api_token}"
    assert (exchange.raw, exchange.query, exchange.content_type) == (b"", {}, "")


async def test_workato_rotates_with_the_developer_token_and_delivers_the_new_secret(
    redis_url: str,
) -> None:
    async with WorkatoServer() as wk, environment(redis_url) as env:
        access = wk.add_profile("token")
        first = access.token
        await workato_profile(env, wk)
        await import_workato(env, {"api_access_profile_id": access.id}, current=first)
        assert (await env.get("wk-1")).access_token == first
        async with worker_running(env.settings):
            await env.refreshed(1)
            second = access.token
            await env.due_now("wk-1")
            await env.refreshed(2)
        events = await env.settled(2)

        assert wk.shape_errors == []
        assert [e.status for e in wk.exchanges] == [200, 200]
        for exchange in wk.exchanges:
            assert_workato_request(
                exchange, wk, f"/api/api_access_profiles/{access.id}/refresh_secret"
            )
        # the bearer is never consumed; each answer minted a secret and killed the last
        assert wk.uses == {wk.api_token: 2}
        assert access.issued == [first, second, access.token]
        assert {first, second} == wk.dead

        cred = await env.get("wk-1")
        assert cred.status is Status.ACTIVE
        assert cred.version == 2
        # the output: the live secret as the access token; nothing to spend is kept
        assert (cred.access_token, cred.refresh_token) == (access.token, "")
        assert dict(cred.extra) == {"id": str(access.id), "name": access.name, "auth_type": "token"}
        assert cred.due_at_ms is not None
        assert cred.due_at_ms > cred.updated_at_ms + 29 * DAY_MS  # the preset rotates monthly
        assert [(e["type"], e["version"]) for e in events] == [(REFRESHED, 1), (REFRESHED, 2)]
        assert [e["access_token"] for e in events] == [second, access.token]
        assert events[1]["extra"]["auth_type"] == "token"


async def test_workato_oauth2_profile_keeps_the_new_client_id_in_extra(redis_url: str) -> None:
    async with WorkatoServer() as wk, environment(redis_url) as env:
        access = wk.add_profile("oauth2")
        old_secret, old_client_id = access.token, access.oauth_client_id
        await workato_profile(env, wk)
        await import_workato(env, {"api_access_profile_id": access.id}, current=old_secret)
        assert await env.refresh_once("wk-1") == "refreshed"
        (event,) = await env.settled(1)

        assert wk.shape_errors == []
        assert wk.uses == {wk.api_token: 1}
        assert_workato_request(
            wk.exchanges[0], wk, f"/api/api_access_profiles/{access.id}/refresh_secret"
        )
        cred = await env.get("wk-1")
        # new secret and new client id replaced together, in one commit
        assert cred.access_token == access.token != old_secret
        assert cred.refresh_token == ""
        assert dict(cred.extra) == {
            "id": str(access.id),
            "name": access.name,
            "auth_type": "oauth2",
            "oauth_client_id": access.oauth_client_id,
        }
        assert access.oauth_client_id != old_client_id
        assert event["type"] == REFRESHED
        assert event["access_token"] == access.token
        assert event["extra"]["oauth_client_id"] == access.oauth_client_id
        assert "oauth_client_secret" not in event["extra"]


async def test_workato_lost_answer_is_asked_again_and_the_latest_secret_kept(
    redis_url: str,
) -> None:
    """The first answer is lost after Workato rotated: the secret it carried
    is gone for good, but nothing was burnt, so the worker asks again (no
    quarantine) and delivers the secret of the second answer."""
    async with WorkatoServer() as wk, environment(redis_url) as env:
        access = wk.add_profile("token")
        first = access.token
        await workato_profile(env, wk)
        await import_workato(env, {"api_access_profile_id": access.id}, current=first)
        wk.lose_next_answer()
        async with worker_running(env.settings):
            await env.refreshed(1)
        failed, refreshed = await env.settled(2)

        assert wk.shape_errors == []
        assert [e.note for e in wk.exchanges] == ["answer lost", ""]
        for exchange in wk.exchanges:
            assert_workato_request(
                exchange, wk, f"/api/api_access_profiles/{access.id}/refresh_secret"
            )
        assert wk.uses == {wk.api_token: 2}
        lost_secret = access.issued[1]
        assert access.issued == [first, lost_secret, access.token]
        assert (failed["type"], failed["reason"]) == (FAILED, "transport_error")
        assert (refreshed["type"], refreshed["access_token"]) == (REFRESHED, access.token)
        cred = await env.get("wk-1")
        assert (cred.status, cred.access_token, cred.version) == (Status.ACTIVE, access.token, 1)
        assert (cred.failures, cred.last_error, cred.last_error_at_ms) == (0, "", None)


@pytest.mark.parametrize("auth_type", ["token", "oauth2"])
async def test_workato_api_key_v2_reads_the_new_secret_under_data(
    redis_url: str, auth_type: str
) -> None:
    async with WorkatoServer() as wk, environment(redis_url) as env:
        key = wk.add_profile(auth_type)
        first = key.token
        await workato_profile(env, wk, "workato_api_key")
        stored = await env.profiles.get("workato")
        assert (stored["rate_limit_per_s"], stored["answer_root"]) == (10, "data")
        await import_workato(env, {"api_client_id": key.api_client_id, "api_key_id": key.id})
        async with worker_running(env.settings):
            await env.refreshed(1)
            await env.due_now("wk-1")
            await env.refreshed(2)
        events = await env.settled(2)

        assert wk.shape_errors == []
        assert [e.status for e in wk.exchanges] == [200, 200]
        path = f"/api/v2/api_clients/{key.api_client_id}/api_keys/{key.id}/refresh_secret"
        for exchange in wk.exchanges:
            assert_workato_request(exchange, wk, path)
            assert set(exchange.reply) == {"data"}
        assert wk.uses == {wk.api_token: 2}
        assert key.issued[0] == first
        assert wk.dead == set(key.issued[:2])
        cred = await env.get("wk-1")
        assert (cred.access_token, cred.refresh_token, cred.version) == (key.token, "", 2)
        kept = {"id": str(key.id), "name": key.name, "auth_type": auth_type}
        if auth_type == "oauth2":
            kept["oauth_client_id"] = key.oauth_client_id
        assert dict(cred.extra) == kept
        assert [e["access_token"] for e in events] == key.issued[1:]


@pytest.mark.parametrize("by", ["external-id", "customer-id"])
async def test_workato_embedded_api_key_names_the_customer_in_one_encoded_segment(
    redis_url: str, by: str
) -> None:
    async with WorkatoServer() as wk, environment(redis_url) as env:
        customer = wk.add_managed_user("acme/eu 7")
        key = wk.add_profile("token", managed_user=customer)
        await workato_profile(env, wk, "workato_api_key_embedded")
        user = "Eacme/eu 7" if by == "external-id" else customer.id
        params = {"managed_user_id": user, "api_client_id": key.api_client_id, "api_key_id": key.id}
        await import_workato(env, params, current=key.token)
        assert await env.refresh_once("wk-1") == "refreshed"

        assert wk.shape_errors == []
        segment = "Eacme%2Feu%207" if by == "external-id" else customer.id
        assert_workato_request(
            wk.exchanges[0],
            wk,
            f"/api/v2/managed_users/{segment}/api_clients/{key.api_client_id}"
            f"/api_keys/{key.id}/refresh_secret",
        )
        assert wk.exchanges[0].status == 200
        assert (await env.get("wk-1")).access_token == key.token == key.issued[1]


async def test_workato_deprecated_endpoint_is_warned_about_at_profile_creation(
    redis_url: str,
) -> None:
    async with WorkatoServer() as wk, environment(redis_url) as env:
        with capture_logs() as logs:
            await workato_profile(env, wk)
        (warning,) = [e for e in logs if e["event"] == "profile.endpoint_deprecated"]
        assert warning["log_level"] == "warning"
        assert warning["profile_id"] == "workato"
        assert "2025-12-01" in warning["detail"]
        assert "workato_api_key" in warning["detail"]
        assert wk.api_token not in json.dumps(logs)
        await env.profiles.delete("workato")
        with capture_logs() as logs:
            await workato_profile(env, wk, "workato_api_key")
        assert [e for e in logs if e["event"] == "profile.endpoint_deprecated"] == []


async def test_workato_jwt_profile_needs_reauth_once_and_is_not_retried(redis_url: str) -> None:
    async with WorkatoServer() as wk, environment(redis_url) as env:
        access = wk.add_profile("jwt")
        await workato_profile(env, wk)
        await import_workato(env, {"api_access_profile_id": access.id})
        async with worker_running(env.settings):
            await wait_for(lambda: env.events.of(REAUTH), within=10, what="needs_reauth")
            await anyio.sleep(1.2)  # longer than the idle wake-up and any backoff
        events = await env.settled(1)

        assert [e["type"] for e in events] == [REAUTH]
        assert events[0]["reason"] == "jwt_profile_unsupported"
        assert [e.status for e in wk.exchanges] == [400]
        assert wk.shape_errors == []
        cred = await env.get("wk-1")
        assert cred.status is Status.NEEDS_REAUTH
        assert access.rotations == 0
        assert cred.due_at_ms is None


async def workato_refreshed_once(redis_url: str) -> list[Exchange]:
    """One token-profile rotation; the exchanges the stand-in recorded."""
    async with WorkatoServer() as wk, environment(redis_url) as env:
        access = wk.add_profile("token")
        await workato_profile(env, wk)
        await import_workato(env, {"api_access_profile_id": access.id})
        assert await env.refresh_once("wk-1") == "refreshed"
        return wk.exchanges


async def test_bodyless_refresh_request_declares_no_content_type(redis_url: str) -> None:
    (exchange,) = await workato_refreshed_once(redis_url)
    assert exchange.raw == b""
    assert exchange.content_type == ""


async def test_refresh_requests_carry_the_refreshd_user_agent(redis_url: str) -> None:
    (exchange,) = await workato_refreshed_once(redis_url)
    assert exchange.headers.get("user-agent", "").startswith("refreshd/")


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [("wrong-api-token", 401, "unauthorized"), ("unknown-profile", 404, "config_error")],
)
async def test_workato_refusals_need_reauth(
    redis_url: str, case: str, status: int, reason: str
) -> None:
    async with WorkatoServer() as wk, environment(redis_url) as env:
        access = wk.add_profile("token")
        profile_id = 999 if case == "unknown-profile" else access.id
        token = "wk-revoked-api-token" if case == "wrong-api-token" else wk.api_token
        await env.profile(
            id="workato", preset="workato_secret", token_url=wk.token_url, client_secret=token
        )
        await import_workato(env, {"api_access_profile_id": profile_id}, current=access.token)
        assert await env.refresh_once("wk-1") == "needs_reauth"
        (event,) = await env.settled(1)

        assert [e.status for e in wk.exchanges] == [status]
        assert wk.shape_errors == []
        assert wk.exchanges[0].path == f"/api/api_access_profiles/{profile_id}/refresh_secret"
        assert (event["type"], event["reason"]) == (REAUTH, reason)
        cred = await env.get("wk-1")
        assert cred.status is Status.NEEDS_REAUTH
        assert cred.last_error == f"{reason} (HTTP {status})"
        assert cred.access_token == access.token  # nothing was rotated
        assert access.rotations == 0


async def test_workato_credentials_of_the_old_semantics_move_with_preset_update(
    redis_url: str,
) -> None:
    """A profile and a credential stored by an earlier release (bearer = the
    credential's secret, kept as its refresh_token; rotation always): the
    worker sends nothing (the profile no longer loads), and the documented
    steps (README, Providers) bring it back: ``profile update --preset``
    with the developer token, then ``credential resume``."""
    async with WorkatoServer() as wk, environment(redis_url) as env:
        access = wk.add_profile("token")
        legacy: dict[Any, Any] = {
            "id": "workato", "token_url": wk.token_url, "strategy": "secret_rotation",
            "method": "PUT", "auth_method": "bearer", "access_token_field": "secret",
            "rotation": "always", "preset": "workato_secret", "allow_http": "1",
            "allow_private_network": "1", "keep_fields": '["id", "name", "auth_type"]',
        }  # fmt: skip
        await env.store.client.hset(env.store.keys.profile("workato"), mapping=legacy)
        await env.store.client.zadd(env.store.keys.profiles, {"workato": 0})
        old = CredentialInput(
            id="wk-1",
            profile="workato",
            access_token="",
            refresh_token=access.token,  # the old semantics: the secret, sent as the bearer
            expires_at_ms=0,
            params={"api_access_profile_id": str(access.id)},
        )
        await env.store.upsert(old, due_ms=0, replace=False)

        assert await env.refresh_once("wk-1") == "needs_reauth"
        assert wk.exchanges == []  # the secret never went out as a bearer
        (stopped,) = await env.settled(1)
        assert stopped["reason"] == "config_error"

        await env.profiles.update(
            "workato",
            {"preset": "workato_secret", "token_url": wk.token_url, "client_secret": wk.api_token},
        )
        assert await env.store.resume("wk-1") == "needs_reauth"
        assert await env.refresh_once("wk-1") == "refreshed"

        assert wk.shape_errors == []
        assert_workato_request(
            wk.exchanges[0], wk, f"/api/api_access_profiles/{access.id}/refresh_secret"
        )
        cred = await env.get("wk-1")
        assert cred.status is Status.ACTIVE
        assert (cred.access_token, cred.refresh_token) == (access.token, "")
        profile = await env.profiles.load("workato")
        assert profile.rotation is Rotation.NEVER


# -------------------------------------------------- VMware CSP (seed 001)


async def test_csp_exchanges_the_api_token_anonymously_with_the_mfa_passcode(
    redis_url: str,
) -> None:
    async with CspServer() as csp, environment(redis_url) as env:
        api_token = csp.add_token(passcode="246810")
        await env.profile(
            id="csp",
            preset="vmware_csp",
            token_url=csp.token_url,
            secret_params={"passcode": "246810"},
        )
        await env.import_(
            {"id": "csp-1", "profile": "csp", "refresh_token": api_token.value, "expires_in": 0}
        )
        async with worker_running(env.settings):
            await env.refreshed(1)
            await env.due_now("csp-1")
            await env.refreshed(2)
        events = await env.settled(2)

        assert csp.shape_errors == []
        assert [e.status for e in csp.exchanges] == [200, 200]
        for exchange in csp.exchanges:
            assert (exchange.method, exchange.path) == ("POST", CspServer.PATH)
            assert "authorization" not in exchange.headers  # anonymous
            assert exchange.content_type == FORM
            assert exchange.query == {}
            # exactly these: no grant_type, no client_id, no deprecated refresh_token
            assert exchange.body == {"api_token": api_token.value, "passcode": "246810"}
        assert csp.uses == {api_token.value: 2}  # reusable: the same API token both times

        cred = await env.get("csp-1")
        assert cred.refresh_token == api_token.value  # never replaced by the answer's copy
        assert cred.access_token == csp.issued[-1]
        assert (cred.token_type, cred.scope, cred.version) == ("bearer", "openid group_names", 2)
        assert set(cred.extra) == {"id_token"}
        assert_lifetime(cred, 1799)
        assert [e["type"] for e in events] == [REFRESHED, REFRESHED]
        assert [e["access_token"] for e in events] == csp.issued


async def test_csp_deprecated_refresh_token_name_when_the_server_takes_it(
    redis_url: str,
) -> None:
    async with CspServer(accept_deprecated_name=True) as csp, environment(redis_url) as env:
        api_token = csp.add_token()
        await env.profile(
            id="csp", preset="vmware_csp", token_url=csp.token_url, token_param="refresh_token"
        )
        await env.import_(
            {"id": "csp-1", "profile": "csp", "refresh_token": api_token.value, "expires_in": 0}
        )
        assert await env.refresh_once("csp-1") == "refreshed"
        assert csp.shape_errors == []
        assert csp.exchanges[0].body == {"refresh_token": api_token.value}
        assert (await env.get("csp-1")).refresh_token == api_token.value


@pytest.mark.parametrize(("status", "reason"), [(400, "rejected"), (404, "config_error")])
async def test_csp_refusals_need_reauth(redis_url: str, status: int, reason: str) -> None:
    async with CspServer() as csp, environment(redis_url) as env:
        api_token = csp.add_token()
        if status == 400:
            api_token.expired = True  # the seed: "400 ... In case of expired refresh_token"
        else:
            csp.fail_next(404)
        await env.profile(id="csp", preset="vmware_csp", token_url=csp.token_url)
        await env.import_(
            {
                "id": "csp-1",
                "profile": "csp",
                "refresh_token": api_token.value,
                "access_token": "at-0",
                "expires_in": 0,
            }
        )
        assert await env.refresh_once("csp-1") == "needs_reauth"
        (event,) = await env.settled(1)

        assert [e.status for e in csp.exchanges] == [status]
        assert set(csp.exchanges[0].reply) == {
            "cspErrorCode",
            "errorCode",
            "message",
            "moduleCode",
            "requestId",
            "statusCode",
        }
        assert (event["type"], event["reason"]) == (REAUTH, reason)
        cred = await env.get("csp-1")
        assert cred.status is Status.NEEDS_REAUTH
        assert (cred.access_token, cred.refresh_token) == ("at-0", api_token.value)
        assert cred.last_error == f"{reason} (HTTP {status})"


@pytest.mark.parametrize(
    ("status", "retry_after", "reason"),
    [(409, None, "conflict"), (429, 1, "throttled"), (500, None, "server_error")],
)
async def test_csp_transient_answers_retry_then_succeed(
    redis_url: str, status: int, retry_after: int | None, reason: str
) -> None:
    async with CspServer() as csp, environment(redis_url) as env:
        api_token = csp.add_token()
        csp.fail_next(status, retry_after=retry_after)
        await env.profile(id="csp", preset="vmware_csp", token_url=csp.token_url)
        await env.import_(
            {"id": "csp-1", "profile": "csp", "refresh_token": api_token.value, "expires_in": 0}
        )
        async with worker_running(env.settings):
            await env.refreshed(1)
        failed, refreshed = await env.settled(2)

        assert [e.status for e in csp.exchanges] == [status, 200]
        assert (failed["type"], failed["reason"], failed["failures"]) == (FAILED, reason, 1)
        assert refreshed["type"] == REFRESHED
        wait_ms = failed["retry_at"] - failed["ts"]
        gap_s = csp.exchanges[1].at - csp.exchanges[0].at
        if retry_after is not None:  # Retry-After is a floor on the backoff
            assert wait_ms >= retry_after * 1000
            assert gap_s >= retry_after - 0.1
        else:  # backoff_base_s is 0.2 here
            assert wait_ms <= 200
        assert csp.uses == {api_token.value: 2}
        cred = await env.get("csp-1")
        assert (cred.status, cred.version, cred.failures) == (Status.ACTIVE, 1, 0)
        # the success cleared the failure it followed
        assert (cred.last_error, cred.last_error_at_ms) == ("", None)


# ---------------------------------------------- webMethods IS (seed 002)


async def webmethods_credential(
    env: Env, wm: WebMethodsServer, *, scope: str = "", granted: str = "read write"
) -> str:
    """A webMethods profile (``scope`` configured or not) and one credential."""
    grant = wm.issue_grant(granted)
    extra = {"scope": scope} if scope else {}
    await env.profile(
        id="wm",
        preset="webmethods",
        token_url=wm.token_url,
        client_id=wm.client_id,
        client_secret=wm.client_secret,
        **extra,
    )
    summary = await env.import_(
        {
            "id": "wm-1",
            "profile": "wm",
            "access_token": grant.access_token,
            "refresh_token": grant.refresh_token,
            "expires_in": 0,
            "scope": granted,
        }
    )
    assert summary["failed"] == 0
    return grant.refresh_token


async def test_webmethods_basic_only_string_expires_in_rotating_tokens(redis_url: str) -> None:
    async with WebMethodsServer() as wm, environment(redis_url) as env:
        rt0 = await webmethods_credential(env, wm)
        grant = wm.grants[rt0]
        async with worker_running(env.settings):
            await env.refreshed(1)
            assert_lifetime(await env.get("wm-1"), 3600)  # "3600", a string
            await env.due_now("wm-1")
            await env.refreshed(2)
        events = await env.settled(2)

        assert wm.shape_errors == []
        assert [e.status for e in wm.exchanges] == [200, 200]
        for exchange, spent in zip(wm.exchanges, grant.history, strict=False):
            assert (exchange.method, exchange.path) == ("POST", WebMethodsServer.PATH)
            assert exchange.basic() == (wm.client_id, wm.client_secret)
            assert exchange.content_type == FORM
            # no client_id/client_secret in the body, no scope unless configured
            assert exchange.body == {"grant_type": "refresh_token", "refresh_token": spent}
        assert wm.uses == {grant.history[0]: 1, grant.history[1]: 1}

        cred = await env.get("wm-1")
        assert (cred.access_token, cred.refresh_token) == (grant.access_token, grant.refresh_token)
        assert (cred.scope, cred.version, cred.status) == ("read write", 2, Status.ACTIVE)
        assert_lifetime(cred, 3600)
        assert [(e["type"], e["version"]) for e in events] == [(REFRESHED, 1), (REFRESHED, 2)]


async def test_webmethods_narrower_scope_is_sent_and_stored(redis_url: str) -> None:
    async with WebMethodsServer() as wm, environment(redis_url) as env:
        rt0 = await webmethods_credential(env, wm, scope="read")
        assert await env.refresh_once("wm-1") == "refreshed"
        assert wm.shape_errors == []
        assert wm.exchanges[0].body == {
            "grant_type": "refresh_token",
            "refresh_token": rt0,
            "scope": "read",
        }
        assert (await env.get("wm-1")).scope == "read"


async def test_webmethods_scope_wider_than_the_grant_is_never_sent(redis_url: str) -> None:
    async with WebMethodsServer() as wm, environment(redis_url) as env:
        rt0 = await webmethods_credential(env, wm, scope="read write admin")
        assert await env.refresh_once("wm-1") == "needs_reauth"
        (event,) = await env.settled(1)

        assert wm.exchanges == []  # refused before anything left
        assert wm.uses == {}
        assert (event["type"], event["reason"]) == (REAUTH, "scope_wider_than_grant")
        cred = await env.get("wm-1")
        assert cred.status is Status.NEEDS_REAUTH
        assert (cred.refresh_token, cred.version) == (rt0, 0)
        assert rt0 in wm.grants  # still the live grant: nothing spent


async def test_webmethods_original_scope_is_allowed_again_after_a_narrowing_refresh(
    redis_url: str,
) -> None:
    """Seed 002: a refresh may ask for any part of the *original* request's
    scope, even after an answer narrowed it; the grant's scope is kept apart
    from the latest answer's."""
    async with WebMethodsServer() as wm, environment(redis_url) as env:
        rt0 = await webmethods_credential(env, wm, scope="read")
        assert await env.refresh_once("wm-1") == "refreshed"
        narrowed = await env.get("wm-1")
        assert (narrowed.scope, narrowed.granted_scope) == ("read", "read write")

        await env.profiles.update("wm", {"scope": "read write"})
        assert await env.refresh_once("wm-1") == "refreshed"
        (_, second) = await env.settled(2)

        assert wm.shape_errors == []
        assert [e.status for e in wm.exchanges] == [200, 200]
        grant = wm.grants[wm.exchanges[1].reply["refresh_token"]]
        assert grant.history[0] == rt0
        assert wm.exchanges[1].body == {
            "grant_type": "refresh_token",
            "refresh_token": grant.history[1],
            "scope": "read write",
        }
        assert (second["type"], second["scope"]) == (REFRESHED, "read write")
        cred = await env.get("wm-1")
        assert (cred.scope, cred.granted_scope, cred.status) == (
            "read write",
            "read write",
            Status.ACTIVE,
        )


async def test_webmethods_scope_is_refused_unsent_when_the_grant_scope_is_unknown(
    redis_url: str,
) -> None:
    async with WebMethodsServer() as wm, environment(redis_url) as env:
        grant = wm.issue_grant("read write")
        await env.profile(
            id="wm",
            preset="webmethods",
            token_url=wm.token_url,
            client_id=wm.client_id,
            client_secret=wm.client_secret,
            scope="read write admin",
        )
        line = {"id": "wm-1", "profile": "wm", "refresh_token": grant.refresh_token}
        await env.import_(line | {"access_token": grant.access_token, "expires_in": 0})
        assert await env.refresh_once("wm-1") == "needs_reauth"
        (event,) = await env.settled(1)

        assert wm.exchanges == []  # nothing went out: no invalid_scope to kill the grant
        assert (event["type"], event["reason"]) == (REAUTH, "scope_unknown")
        cred = await env.get("wm-1")
        assert (cred.status, cred.refresh_token, cred.granted_scope) == (
            Status.NEEDS_REAUTH,
            grant.refresh_token,
            "",
        )
        assert cred.last_error == "scope_unknown"

        # the documented way out: import the credential again with its scope
        await env.store.delete("wm-1")
        await env.import_(line | {"access_token": "", "expires_in": 0, "scope": "read write"})
        await env.profiles.update("wm", {"scope": "read"})
        assert await env.refresh_once("wm-1") == "refreshed"
        assert wm.exchanges[0].body is not None
        assert wm.exchanges[0].body["scope"] == "read"


async def test_a_get_whose_answer_is_lost_is_not_sent_again_by_the_http_client(
    redis_url: str,
) -> None:
    """aiohttp resends an idempotent method (GET, PUT) by itself when the
    connection breaks after sending; a refresh token must go out once, and
    the unknown-outcome rule decide (here: quarantine)."""
    async with WebMethodsServer(require_post=False) as wm, environment(redis_url) as env:
        grant = wm.issue_grant("read")
        rt0 = grant.refresh_token
        await env.profile(
            id="wm",
            preset="webmethods",
            token_url=wm.token_url,
            client_id=wm.client_id,
            client_secret=wm.client_secret,
            method="GET",
            body_format="query",
        )
        await env.import_(
            {"id": "wm-1", "profile": "wm", "refresh_token": rt0, "expires_in": 0, "scope": "read"}
        )
        wm.lose_next_answer()
        assert await env.refresh_once("wm-1") == "quarantined"

        assert [(e.method, e.note) for e in wm.exchanges] == [("GET", "answer lost")]
        assert wm.exchanges[0].query["refresh_token"] == rt0
        assert wm.uses == {rt0: 1}
        assert (await env.get("wm-1")).status is Status.QUARANTINED


# ------------------------------------------------- SmartThings (seed 003)


async def smartthings_credential(env: Env, st: SmartThingsServer) -> str:
    grant = st.issue_grant("r:devices:* x:devices:*")
    await env.profile(
        id="st",
        preset="smartthings",
        token_url=st.token_url,
        client_id=st.client_id,
        client_secret=st.client_secret,
    )
    summary = await env.import_(
        {
            "id": "st-1",
            "profile": "st",
            "access_token": grant.access_token,
            "refresh_token": grant.refresh_token,
            "expires_in": 0,
            "scope": grant.scope,
        }
    )
    assert summary["failed"] == 0
    return grant.refresh_token


async def test_smartthings_form_basic_and_client_id_in_body_single_use(redis_url: str) -> None:
    async with SmartThingsServer() as st, environment(redis_url) as env:
        rt0 = await smartthings_credential(env, st)
        grant = st.grants[rt0]
        async with worker_running(env.settings):
            await env.refreshed(1)
            await env.due_now("st-1")
            await env.refreshed(2)
        events = await env.settled(2)

        assert st.shape_errors == []
        assert [e.status for e in st.exchanges] == [200, 200]
        for exchange, spent in zip(st.exchanges, grant.history, strict=False):
            assert (exchange.method, exchange.path) == ("POST", SmartThingsServer.PATH)
            assert exchange.content_type == FORM
            assert exchange.headers["accept"] == "application/json"
            assert exchange.basic() == (st.client_id, st.client_secret)
            # client_id in the body too; no client_secret, no redirect_uri
            assert exchange.body == {
                "grant_type": "refresh_token",
                "refresh_token": spent,
                "client_id": st.client_id,
            }
        assert st.uses == {grant.history[0]: 1, grant.history[1]: 1}

        cred = await env.get("st-1")
        assert (cred.access_token, cred.refresh_token) == (grant.access_token, grant.refresh_token)
        assert (cred.token_type, cred.version) == ("bearer", 2)
        assert dict(cred.extra) == {
            "installed_app_id": grant.installed_app_id,
            "access_tier": "0",
            "owner_account_id": st.owner_account_id,
        }
        assert_lifetime(cred, 86399)
        assert [e["type"] for e in events] == [REFRESHED, REFRESHED]
        assert events[1]["extra"] == dict(cred.extra)


async def test_smartthings_expired_refresh_token_needs_reauth_keeping_tokens(
    redis_url: str,
) -> None:
    async with SmartThingsServer() as st, environment(redis_url) as env:
        rt0 = await smartthings_credential(env, st)
        grant = st.grants[rt0]
        grant.expired = True
        assert await env.refresh_once("st-1") == "needs_reauth"
        (event,) = await env.settled(1)

        assert [e.status for e in st.exchanges] == [401]
        assert st.shape_errors == []
        assert st.uses == {rt0: 1}
        # a 401 with an error code the worker has no label for: "rejected"
        assert (event["type"], event["reason"]) == (REAUTH, "rejected")
        assert st.exchanges[0].reply["error"] == "invalid_token"
        cred = await env.get("st-1")
        assert cred.status is Status.NEEDS_REAUTH
        assert (cred.access_token, cred.refresh_token) == (grant.access_token, rt0)
        assert (cred.version, cred.last_error) == (0, "rejected (HTTP 401)")


# ------------------------------------------------------ client_credentials


async def test_client_credentials_reissued_repeatedly_without_refresh_token(
    redis_url: str,
) -> None:
    async with ClientCredentialsServer(lifetime_s=1) as cc, environment(redis_url) as env:
        await env.profile(
            id="cc",
            preset="client_credentials",
            token_url=cc.token_url,
            client_id=cc.client_id,
            client_secret=cc.client_secret,
            scope="read",
        )
        assert (await env.import_({"id": "cc-1", "profile": "cc", "expires_in": 0}))["failed"] == 0
        async with worker_running(env.settings):
            await wait_for(lambda: len(cc.issued) >= 3, within=10, what="3 access tokens")
        events = await env.settled(len(cc.issued))

        assert cc.shape_errors == []
        assert {e.status for e in cc.exchanges} == {200}
        for exchange in cc.exchanges:
            assert exchange.basic() == (cc.client_id, cc.client_secret)
            assert exchange.body == {"grant_type": "client_credentials", "scope": "read"}
        assert [e["type"] for e in events] == [REFRESHED] * len(cc.issued)
        assert [e["access_token"] for e in events] == cc.issued
        assert [e["version"] for e in events] == list(range(1, len(cc.issued) + 1))
        cred = await env.get("cc-1")
        assert (cred.access_token, cred.refresh_token) == (cc.issued[-1], "")
        assert (cred.status, cred.scope) == (Status.ACTIVE, "read")


# ---------------------------------------------------------------- error rules

AADSTS50196 = {
    "error": "invalid_grant",
    "error_description": "AADSTS50196: The server terminated an operation because it "
    "encountered a client request loop.",
    "error_codes": [50196],
}
AADSTS_RULE = {
    "status": 400,
    "error": "invalid_grant",
    "contains": "AADSTS50196",
    "class": "throttled",
}
EXPIRED = {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}


@pytest.mark.parametrize(
    ("rules", "status", "answer", "outcome", "reason"),
    [
        pytest.param([AADSTS_RULE], 400, AADSTS50196, "retry", "throttled", id="profile-rule"),
        pytest.param([], 400, AADSTS50196, "retry", "throttled", id="built-in-AADSTS50196"),
        pytest.param(
            [{"contains": "AADSTS50196", "class": "reauth"}],
            400,
            AADSTS50196,
            "needs_reauth",
            "invalid_grant",
            id="profile-rules-come-first",
        ),
        pytest.param(
            [AADSTS_RULE],
            400,
            EXPIRED,
            "needs_reauth",
            "invalid_grant",
            id="every-condition-must-hold",
        ),
        pytest.param(
            [],
            200,
            {"ok": False, "error": "invalid_refresh_token"},
            "needs_reauth",
            "rejected",
            id="slack-200-ok-false",
        ),
        pytest.param(
            [],
            200,
            {
                "error": "bad_refresh_token",
                "error_description": "The refresh token passed is incorrect.",
            },
            "needs_reauth",
            "bad_refresh_token",
            id="github-200-error",
        ),
    ],
)
async def test_error_rules_and_error_answers(
    redis_url: str,
    rules: list[dict[str, Any]],
    status: int,
    answer: dict[str, Any],
    outcome: str,
    reason: str,
) -> None:
    async with WebMethodsServer() as server, environment(redis_url) as env:
        grant = server.issue_grant("read")
        await env.profile(
            id="p",
            preset="webmethods",
            token_url=server.token_url,
            client_id=server.client_id,
            client_secret=server.client_secret,
            error_rules=rules,
        )
        await env.import_(
            {
                "id": "c-1",
                "profile": "p",
                "access_token": grant.access_token,
                "refresh_token": grant.refresh_token,
                "expires_in": 0,
                "scope": "read",
            }
        )
        rt0 = grant.refresh_token
        server.script(status, answer)
        assert await env.refresh_once("c-1") == outcome
        (event,) = await env.settled(1)
        assert event["reason"] == reason
        cred = await env.get("c-1")
        assert (cred.refresh_token, cred.version) == (rt0, 0)
        if outcome == "needs_reauth":
            assert event["type"] == REAUTH
            assert cred.status is Status.NEEDS_REAUTH
            return
        # a throttle is not a dead grant: the same refresh token works next time
        assert event["type"] == FAILED
        assert cred.status is Status.ACTIVE
        assert await env.refresh_once("c-1") == "refreshed"
        assert server.uses == {rt0: 2}
        assert (await env.get("c-1")).refresh_token == grant.refresh_token != rt0


# ------------------------------------------- the stand-ins are really strict


async def _status(http: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> int:
    return (await http.request(method, url, **kwargs)).status_code


async def test_workato_stand_in_refuses_other_shapes() -> None:
    async with WorkatoServer() as wk, httpx.AsyncClient(trust_env=False) as http:
        access, jwt = wk.add_profile("token"), wk.add_profile("jwt")
        url = wk.token_url.format(api_access_profile_id=access.id)
        dev = {"Authorization": f"Bearer {wk.api_token}"}
        assert await _status(http, "POST", url, headers=dev) == 405
        assert await _status(http, "PUT", url) == 401
        assert await _status(http, "PUT", url, headers=dev, data={"x": "1"}) == 400
        assert await _status(http, "PUT", url, headers=dev, params={"x": "1"}) == 400
        # the old, wrong semantics: the access profile's own secret as the bearer
        secret = {"Authorization": f"Bearer {access.token}"}
        assert await _status(http, "PUT", url, headers=secret) == 401
        assert wk.shape_errors[-1] == "the bearer is an access-profile secret, not the API token"
        assert await _status(http, "PUT", url, headers={"Authorization": "Bearer x"}) == 401
        missing = wk.token_url.format(api_access_profile_id=999)
        assert await _status(http, "PUT", missing, headers=dev) == 404
        first = access.token
        answer = await http.put(url, headers=dev)
        assert answer.json()["secret"] == access.token != first
        assert await _status(http, "PUT", url, headers=dev) == 200  # the bearer is not spent
        assert first in wk.dead
        assert access.rotations == 2
        jwt_url = wk.token_url.format(api_access_profile_id=jwt.id)
        refused = await http.put(jwt_url, headers=dev)
        assert refused.status_code == 400
        assert "JWT" in refused.json()["message"]
        # v2: under data; the API client must own the key
        v2 = wk.api_key_url.format(api_client_id=access.api_client_id, api_key_id=access.id)
        assert (await http.put(v2, headers=dev)).json()["data"]["auth_token"] == access.token
        other = wk.api_key_url.format(api_client_id=99, api_key_id=access.id)
        assert await _status(http, "PUT", other, headers=dev) == 404
        # embedded: the customer by id or E + external id, one encoded segment
        user = wk.add_managed_user("acme/eu")
        key = wk.add_profile("token", managed_user=user)
        ids = {"api_client_id": key.api_client_id, "api_key_id": key.id}
        for good in (user.id, "Eacme%2Feu"):
            assert await _status(http, "PUT", wk.embedded_url.format(managed_user_id=good, **ids),
                                 headers=dev) == 200  # fmt: skip
        unencoded = wk.embedded_url.format(managed_user_id="Eacme/eu", **ids)
        assert await _status(http, "PUT", unencoded, headers=dev) == 404
        own = wk.api_key_url.format(**ids)  # not the workspace's own key
        assert await _status(http, "PUT", own, headers=dev) == 404
        assert wk.uses[wk.api_token] == 9  # every well-formed call but the unencoded one


async def test_csp_stand_in_refuses_other_shapes() -> None:
    async with CspServer() as csp, httpx.AsyncClient(trust_env=False) as http:
        plain, mfa = csp.add_token(), csp.add_token(passcode="1234")
        url = csp.token_url
        assert await _status(http, "GET", url) == 405
        assert await _status(http, "POST", url, json={"api_token": plain.value}) == 415
        assert (
            await _status(
                http,
                "POST",
                url,
                data={"api_token": plain.value},
                headers={"Authorization": "Basic eDp5"},
            )
            == 400
        )
        assert await _status(http, "POST", url, params={"refresh_token": plain.value}) == 400
        assert await _status(http, "POST", url, data={"refresh_token": plain.value}) == 400
        assert (
            await _status(
                http, "POST", url, data={"api_token": plain.value, "grant_type": "refresh_token"}
            )
            == 400
        )
        assert await _status(http, "POST", url, data={"api_token": mfa.value}) == 400
        assert (
            await _status(http, "POST", url, data={"api_token": mfa.value, "passcode": "1234"})
            == 200
        )
        csp.fail_next(429, retry_after=7)
        throttled = await http.post(url, data={"api_token": plain.value})
        assert (throttled.status_code, throttled.headers["retry-after"]) == (429, "7")
        assert throttled.json()["statusCode"] == 429
        for _ in range(2):  # reusable
            ok = await http.post(url, data={"api_token": plain.value})
            assert isinstance(ok.json()["expires_in"], int)
        # only well-formed requests count as uses: the 429 and the two 200s
        assert csp.uses[plain.value] == 3


async def test_webmethods_stand_in_refuses_other_shapes() -> None:
    async with WebMethodsServer() as wm, httpx.AsyncClient(trust_env=False) as http:
        grant = wm.issue_grant("read write")
        auth = (wm.client_id, wm.client_secret)
        rt = grant.refresh_token
        form = {"grant_type": "refresh_token", "refresh_token": rt}
        url = wm.token_url
        assert await _status(http, "GET", url, params=form, auth=auth) == 405
        assert await _status(http, "POST", url, data=form) == 401
        assert (
            await _status(
                http, "POST", url, auth=auth, data=form | {"client_secret": wm.client_secret}
            )
            == 401
        )
        assert (
            await _status(http, "POST", url, auth=auth, data=form | {"scope": "read admin"}) == 400
        )
        ok = await http.post(url, auth=auth, data=form)
        assert ok.json()["expires_in"] == "3600"
        assert await _status(http, "POST", url, auth=auth, data=form) == 400  # rotated
        assert wm.uses[rt] == 3


async def test_smartthings_stand_in_refuses_other_shapes() -> None:
    async with SmartThingsServer() as st, httpx.AsyncClient(trust_env=False) as http:
        grant = st.issue_grant("r:devices:*")
        auth = (st.client_id, st.client_secret)
        rt = grant.refresh_token
        form = {"grant_type": "refresh_token", "refresh_token": rt, "client_id": st.client_id}
        url = st.token_url
        assert await _status(http, "POST", url, auth=auth, json=form) == 401  # as the seed saw
        assert await _status(http, "POST", url, data=form) == 401
        no_id = {k: v for k, v in form.items() if k != "client_id"}
        assert await _status(http, "POST", url, auth=auth, data=no_id) == 401
        assert (
            await _status(
                http, "POST", url, auth=auth, data=form | {"redirect_uri": "https://x.example/cb"}
            )
            == 200
        )
        assert await _status(http, "POST", url, auth=auth, data=form) == 401  # single use
        assert st.uses[rt] == 2


async def test_client_credentials_stand_in_refuses_other_shapes() -> None:
    async with ClientCredentialsServer() as cc, httpx.AsyncClient(trust_env=False) as http:
        auth = (cc.client_id, cc.client_secret)
        url = cc.token_url
        assert (
            await _status(
                http,
                "POST",
                url,
                auth=auth,
                data={"grant_type": "refresh_token", "refresh_token": "x"},
            )
            == 400
        )
        assert await _status(http, "POST", url, data={"grant_type": "client_credentials"}) == 401
        assert (
            await _status(
                http,
                "POST",
                url,
                auth=auth,
                data={"grant_type": "client_credentials", "scope": "admin"},
            )
            == 400
        )
        ok = await http.post(url, auth=auth, data={"grant_type": "client_credentials"})
        assert ok.status_code == 200
        assert "refresh_token" not in ok.json()
