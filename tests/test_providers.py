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
from worker.models import Credential, Status
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


async def test_import_reports_bad_lines_by_number_and_imports_the_rest(redis_url: str) -> None:
    async with environment(redis_url) as env:
        await env.profile(
            id="workato",
            preset="workato_secret",
            token_url=WorkatoServer.url_at("http://127.0.0.1:9"),
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
                "refresh_token": "tok-1",
                "expires_in": 60,
                "params": {"api_access_profile_id": "17"},
            },
            {"id": "wk-2", "profile": "workato", "refresh_token": "SECRET-tok-2", "expires_in": 60},
            {
                "id": "wk-3",
                "profile": "workato",
                "refresh_token": "tok-3",
                "expires_in": 60,
                "params": {"api_access_profile_id": 18},
            },
            {"id": "cc-1", "profile": "cc", "expires_in": 0},
            {"id": "st-1", "profile": "st", "access_token": "at", "expires_in": 60},
        )
        assert summary["created"] == 3
        assert summary["errors"] == [
            {"line": 2, "error": "params must set api_access_profile_id (used in the token URL)"},
            {"line": 5, "error": "profile st needs refresh_token"},
        ]
        assert "SECRET" not in json.dumps(summary)
        assert dict((await env.get("wk-1")).params) == {"api_access_profile_id": "17"}
        assert dict((await env.get("wk-3")).params) == {"api_access_profile_id": "18"}
        assert (await env.get("cc-1")).refresh_token == ""
        for missing in ("wk-2", "st-1"):
            with pytest.raises(NotFound):
                await env.get(missing)


# ------------------------------------------------------ Workato (seed 000)


async def test_workato_token_profile_rotates_with_a_bare_bearer_put(redis_url: str) -> None:
    async with WorkatoServer() as wk, environment(redis_url) as env:
        access = wk.add_profile("token")
        first = access.token
        await env.profile(id="workato", preset="workato_secret", token_url=wk.token_url)
        await env.import_(
            {
                "id": "wk-1",
                "profile": "workato",
                "refresh_token": first,
                "expires_in": 0,
                "params": {"api_access_profile_id": access.id},
            }
        )
        async with worker_running(env.settings):
            await env.refreshed(1)
            second = access.token
            await env.due_now("wk-1")
            await env.refreshed(2)
        events = await env.settled(2)

        assert wk.shape_errors == []
        assert [e.status for e in wk.exchanges] == [200, 200]
        for exchange, spent in zip(wk.exchanges, (first, second), strict=True):
            assert exchange.method == "PUT"
            assert exchange.path == f"/api/api_access_profiles/{access.id}/refresh_secret"
            assert exchange.authorization == f"Bearer {spent}"
            assert (exchange.raw, exchange.query) == (b"", {})  # nothing but the bearer
        # each secret went out once, and the worker moved to the new one at once
        assert wk.uses == {first: 1, second: 1}
        assert {first, second} <= wk.dead

        cred = await env.get("wk-1")
        assert cred.status is Status.ACTIVE
        assert cred.version == 2
        assert cred.refresh_token == cred.access_token == access.token
        assert dict(cred.extra) == {"id": str(access.id), "name": access.name, "auth_type": "token"}
        assert cred.due_at_ms is not None
        assert cred.due_at_ms > cred.updated_at_ms + 29 * DAY_MS  # the preset rotates monthly
        assert [(e["type"], e["version"]) for e in events] == [(REFRESHED, 1), (REFRESHED, 2)]
        assert events[0]["access_token"] == second
        assert events[1]["access_token"] == access.token
        assert events[1]["extra"]["auth_type"] == "token"


async def test_workato_oauth2_profile_keeps_the_new_client_id_in_extra(redis_url: str) -> None:
    async with WorkatoServer() as wk, environment(redis_url) as env:
        access = wk.add_profile("oauth2")
        old_secret, old_client_id = access.token, access.oauth_client_id
        await env.profile(id="workato", preset="workato_secret", token_url=wk.token_url)
        await env.import_(
            {
                "id": "wk-1",
                "profile": "workato",
                "refresh_token": old_secret,
                "expires_in": 0,
                "params": {"api_access_profile_id": access.id},
            }
        )
        assert await env.refresh_once("wk-1") == "refreshed"
        (event,) = await env.settled(1)

        assert wk.shape_errors == []
        assert wk.uses == {old_secret: 1}
        assert wk.exchanges[0].authorization == f"Bearer {old_secret}"
        cred = await env.get("wk-1")
        # new secret and new client id replaced together, in one commit
        assert cred.refresh_token == cred.access_token == access.token != old_secret
        assert dict(cred.extra) == {
            "id": str(access.id),
            "name": access.name,
            "auth_type": "oauth2",
            "oauth_client_id": access.oauth_client_id,
        }
        assert access.oauth_client_id != old_client_id
        assert event["type"] == REFRESHED
        assert event["extra"]["oauth_client_id"] == access.oauth_client_id
        assert "oauth_client_secret" not in event["extra"]


async def test_workato_jwt_profile_needs_reauth_once_and_is_not_retried(redis_url: str) -> None:
    async with WorkatoServer() as wk, environment(redis_url) as env:
        access = wk.add_profile("jwt")
        await env.profile(id="workato", preset="workato_secret", token_url=wk.token_url)
        await env.import_(
            {
                "id": "wk-1",
                "profile": "workato",
                "refresh_token": access.token,
                "expires_in": 0,
                "params": {"api_access_profile_id": access.id},
            }
        )
        async with worker_running(env.settings):
            await wait_for(lambda: env.events.of(REAUTH), within=10, what="needs_reauth")
            await anyio.sleep(1.2)  # longer than the idle wake-up and any backoff
        events = await env.settled(1)

        assert [e["type"] for e in events] == [REAUTH]
        assert [e.status for e in wk.exchanges] == [400]
        assert wk.shape_errors == []
        cred = await env.get("wk-1")
        assert cred.status is Status.NEEDS_REAUTH
        assert cred.refresh_token == access.token  # nothing was rotated
        assert cred.due_at_ms is None


async def test_workato_jwt_profile_reason_is_jwt_profile_unsupported(redis_url: str) -> None:
    async with WorkatoServer() as wk, environment(redis_url) as env:
        access = wk.add_profile("jwt")
        await env.profile(id="workato", preset="workato_secret", token_url=wk.token_url)
        await env.import_(
            {
                "id": "wk-1",
                "profile": "workato",
                "refresh_token": access.token,
                "expires_in": 0,
                "params": {"api_access_profile_id": access.id},
            }
        )
        assert await env.refresh_once("wk-1") == "needs_reauth"
        (event,) = await env.settled(1)
        assert wk.exchanges[0].status == 400
        assert event["reason"] == "jwt_profile_unsupported"


async def workato_refreshed_once(redis_url: str) -> list[Exchange]:
    """One token-profile rotation; the exchanges the stand-in recorded."""
    async with WorkatoServer() as wk, environment(redis_url) as env:
        access = wk.add_profile("token")
        await env.profile(id="workato", preset="workato_secret", token_url=wk.token_url)
        await env.import_(
            {
                "id": "wk-1",
                "profile": "workato",
                "refresh_token": access.token,
                "expires_in": 0,
                "params": {"api_access_profile_id": access.id},
            }
        )
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
    [("stale-token", 401, "unauthorized"), ("unknown-profile", 404, "config_error")],
)
async def test_workato_refusals_need_reauth(
    redis_url: str, case: str, status: int, reason: str
) -> None:
    async with WorkatoServer() as wk, environment(redis_url) as env:
        access = wk.add_profile("token")
        token = "wk-rotated-elsewhere" if case == "stale-token" else access.token
        profile_id = 999 if case == "unknown-profile" else access.id
        await env.profile(id="workato", preset="workato_secret", token_url=wk.token_url)
        await env.import_(
            {
                "id": "wk-1",
                "profile": "workato",
                "refresh_token": token,
                "expires_in": 0,
                "params": {"api_access_profile_id": profile_id},
            }
        )
        assert await env.refresh_once("wk-1") == "needs_reauth"
        (event,) = await env.settled(1)

        assert [e.status for e in wk.exchanges] == [status]
        assert wk.exchanges[0].path == f"/api/api_access_profiles/{profile_id}/refresh_secret"
        assert (event["type"], event["reason"]) == (REAUTH, reason)
        cred = await env.get("wk-1")
        assert cred.status is Status.NEEDS_REAUTH
        assert cred.last_error == f"{reason} (HTTP {status})"
        assert cred.refresh_token == token


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
    [(409, None, "server_error"), (429, 1, "throttled"), (500, None, "server_error")],
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
        old = {"Authorization": f"Bearer {access.token}"}
        assert await _status(http, "POST", url, headers=old) == 405
        assert await _status(http, "PUT", url) == 401
        assert await _status(http, "PUT", url, headers=old, data={"x": "1"}) == 400
        missing = wk.token_url.format(api_access_profile_id=999)
        assert await _status(http, "PUT", missing, headers=old) == 404
        assert await _status(http, "PUT", url, headers=old) == 200
        assert await _status(http, "PUT", url, headers=old) == 401  # the old token died at once
        jwt_url = wk.token_url.format(api_access_profile_id=jwt.id)
        bearer = {"Authorization": f"Bearer {jwt.token}"}
        answer = await http.put(jwt_url, headers=bearer)
        assert answer.status_code == 400
        assert "JWT" in answer.json()["message"]


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
