"""The fake provider is the referee for refreshd's central promise (a refresh token is never
sent twice), so it is tested over real HTTP on loopback, the way the suite and demo use it."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote_plus

import anyio
import httpx
import pytest

from worker.fakeprovider import FakeProvider, FakeProviderConfig, Fault, FaultKind, IssuedGrant

pytestmark = pytest.mark.anyio

SECRET = "s3cr+t :%/x"  # needs form-encoding inside Basic credentials (RFC 6749 §2.3.1)


def basic(client_id: str = "demo-client", secret: str = SECRET, *, encode: bool = True) -> str:
    if encode:
        client_id, secret = quote_plus(client_id), quote_plus(secret)
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def http_client(timeout: float) -> httpx.AsyncClient:
    """Plain HTTP on loopback: not loading the CA bundle saves ~0.1 s per client."""
    return httpx.AsyncClient(timeout=timeout, verify=False)  # noqa: S501


@asynccontextmanager
async def running(
    client_timeout: float = 5.0, **overrides: Any
) -> AsyncIterator[tuple[FakeProvider, httpx.AsyncClient]]:
    config = FakeProviderConfig(**{"client_secret": SECRET, **overrides})
    async with (
        FakeProvider(config) as provider,
        http_client(client_timeout) as client,
    ):
        yield provider, client


async def refresh(
    client: httpx.AsyncClient,
    provider: FakeProvider,
    rt: str,
    *,
    auth: str | None = None,
    **extra: str,
) -> httpx.Response:
    """POST a refresh; `auth` defaults to correct Basic credentials, "" sends none."""
    headers = {"Authorization": auth or basic()} if auth != "" else {}
    data = {"grant_type": "refresh_token", "refresh_token": rt, **extra}
    return await client.post(provider.url, data=data, headers=headers)


def assert_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status
    assert response.json()["error"] == error


async def test_refresh_rotates_and_returns_a_complete_answer() -> None:
    async with running() as (p, c):
        g = p.issue_grant()
        r = await refresh(c, p, g.refresh_token)
        assert r.status_code == 200
        assert r.headers["cache-control"] == "no-store"
        body = r.json()
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 3600
        assert body["scope"] == "read write"
        assert len(body["access_token"]) == 64
        assert body["access_token"] != g.access_token
        assert body["refresh_token"] != g.refresh_token
        state = p.grant_state(g.grant_id)
        assert (state.access_token, state.refresh_token) == (
            body["access_token"],
            body["refresh_token"],
        )
        r2 = await refresh(c, p, body["refresh_token"])
        assert r2.status_code == 200
        assert p.stats.refreshed == 2
        assert p.stats.reuse_events == []
        assert max(p.send_counts.values()) == 1


async def test_reuse_revokes_the_whole_grant() -> None:
    async with running() as (p, c):
        g = p.issue_grant()
        new_rt = (await refresh(c, p, g.refresh_token)).json()["refresh_token"]
        r = await refresh(c, p, g.refresh_token)
        assert r.json() == {
            "error": "invalid_grant",
            "error_description": "refresh token already used",
        }
        assert r.status_code == 400
        assert [e.grant_id for e in p.stats.reuse_events] == [g.grant_id]
        assert p.stats.revoked_grants == 1
        assert p.grant_state(g.grant_id).revoked
        assert_error(await refresh(c, p, new_rt), 400, "invalid_grant")
        assert p.send_counts[g.refresh_token] == 2


async def test_reuse_without_revocation_keeps_the_new_token_valid() -> None:
    async with running(revoke_on_reuse=False) as (p, c):
        g = p.issue_grant()
        new_rt = (await refresh(c, p, g.refresh_token)).json()["refresh_token"]
        assert_error(await refresh(c, p, g.refresh_token), 400, "invalid_grant")
        assert len(p.stats.reuse_events) == 1
        assert (await refresh(c, p, new_rt)).status_code == 200


async def test_grace_window_accepts_the_previous_token_without_reuse() -> None:
    async with running(reuse_grace_s=0.5) as (p, c):
        g = p.issue_grant()
        rt1 = (await refresh(c, p, g.refresh_token)).json()["refresh_token"]
        seen = {g.refresh_token, rt1}
        for _ in range(2):
            r = await refresh(c, p, g.refresh_token)
            assert r.status_code == 200
            seen.add(r.json()["refresh_token"])
        assert len(seen) == 4
        assert (await refresh(c, p, rt1)).status_code == 200  # superseded just now: in grace
        assert p.stats.reuse_events == []
        await anyio.sleep(0.55)
        assert_error(await refresh(c, p, g.refresh_token), 400, "invalid_grant")
        assert len(p.stats.reuse_events) == 1
        assert p.grant_state(g.grant_id).revoked


async def test_unknown_token_and_grant_type_and_revoked_grant() -> None:
    async with running() as (p, c):
        g = p.issue_grant()
        assert_error(await refresh(c, p, "nope"), 400, "invalid_grant")
        r = await c.post(p.url, data={"grant_type": "password"}, headers={"Authorization": basic()})
        assert_error(r, 400, "unsupported_grant_type")
        p.revoke_grant(g.grant_id)
        assert_error(await refresh(c, p, g.refresh_token), 400, "invalid_grant")
        assert p.stats.reuse_events == []
        assert (await c.get(p.url)).status_code == 405
        assert (await c.post(p.url.replace("/token", "/other"))).status_code == 404


@pytest.mark.parametrize(
    ("method", "style", "status"),
    [
        ("client_secret_basic", "basic", 200),
        ("client_secret_basic", "post", 401),
        ("client_secret_basic", "none", 401),
        ("client_secret_post", "post", 200),
        ("client_secret_post", "basic", 401),
        ("none", "none", 200),
        ("none", "post", 401),
        ("none", "basic", 401),
        ("any", "basic", 200),
        ("any", "post", 200),
        ("any", "none", 200),
        ("any", "unencoded_basic", 401),  # '+' decodes to a space: strict like real servers
        ("any", "wrong_secret", 401),
        ("any", "anonymous", 401),
        ("any", "basic_and_post", 401),
    ],
)
async def test_client_authentication(method: str, style: str, status: int) -> None:
    async with running(auth_method=method) as (p, c):
        rt = p.issue_grant().refresh_token
        extra: dict[str, str] = {}
        auth = ""
        if style in ("basic", "basic_and_post"):
            auth = basic()
        elif style == "unencoded_basic":
            auth = basic(encode=False)
        if style in ("post", "none", "wrong_secret"):
            extra["client_id"] = "demo-client"
        if style in ("post", "basic_and_post"):
            extra["client_secret"] = SECRET
        if style == "wrong_secret":
            extra["client_secret"] = "wrong"
        r = await refresh(c, p, rt, auth=auth, **extra)
        assert r.status_code == status, r.text
        if status == 401:
            assert r.json()["error"] == "invalid_client"
            assert ("www-authenticate" in r.headers) == bool(auth)
            assert p.stats.refreshed == 0


async def test_scope_must_be_a_subset_and_a_failure_does_not_rotate() -> None:
    async with running() as (p, c):
        g = p.issue_grant("read write admin")
        assert_error(
            await refresh(c, p, g.refresh_token, scope="read delete"), 400, "invalid_scope"
        )
        assert p.grant_state(g.grant_id).refresh_token == g.refresh_token
        r = await refresh(c, p, g.refresh_token, scope="write read")
        assert r.json()["scope"] == "write read"
        r = await refresh(c, p, r.json()["refresh_token"])
        assert r.json()["scope"] == "read write admin"  # narrowing affects one token only


async def test_json_body_and_its_switch() -> None:
    body = {"grant_type": "refresh_token", "client_id": "demo-client", "client_secret": SECRET}
    async with running(auth_method="client_secret_post") as (p, c):
        g = p.issue_grant()
        r = await c.post(p.url, json={**body, "refresh_token": g.refresh_token})
        assert r.status_code == 200
    async with running(auth_method="client_secret_post", accept_json_body=False) as (p, c):
        g = p.issue_grant()
        r = await c.post(p.url, json={**body, "refresh_token": g.refresh_token})
        assert_error(r, 400, "invalid_request")
        r = await c.post(p.url, json={**body, "refresh_token": 1})
        assert_error(r, 400, "invalid_request")


async def test_response_shape_options() -> None:
    async with running(expires_in_as_string=True, access_token_bytes=800) as (p, c):
        body = (await refresh(c, p, p.issue_grant().refresh_token)).json()
        assert body["expires_in"] == "3600"
        assert len(body["access_token"]) == 800
    async with running(omit_expires_in=True, return_refresh_token=False) as (p, c):
        g = p.issue_grant()
        for _ in range(2):  # no refresh token returned, so the old one must stay valid
            body = (await refresh(c, p, g.refresh_token)).json()
            assert "expires_in" not in body
            assert "refresh_token" not in body
    async with running(rotate=False) as (p, c):
        g = p.issue_grant()
        assert (await refresh(c, p, g.refresh_token)).json()["refresh_token"] == g.refresh_token
        assert (await refresh(c, p, g.refresh_token)).status_code == 200
        assert p.send_counts[g.refresh_token] == 2


@pytest.mark.parametrize(
    ("fault", "status", "text"),
    [
        (Fault("status", status=503), 503, ""),
        (Fault("status", status=429, headers={"Retry-After": "2"}), 429, ""),
        (Fault("status", status=400, body={"error": "invalid_grant"}), 400, '{"error"'),
        (Fault("status", status=200, body={"error": "bad_refresh_token"}), 200, "bad_refresh"),
        (
            Fault("status", status=403, body="<html>denied</html>", headers={"X": "y"}),
            403,
            "<html>",
        ),
    ],
)
async def test_status_fault_leaves_the_grant_untouched(
    fault: Fault, status: int, text: str
) -> None:
    async with running() as (p, c):
        g = p.issue_grant()
        p.inject(fault)
        r = await refresh(c, p, g.refresh_token)
        assert r.status_code == status
        assert text in r.text
        if fault.headers.get("Retry-After"):
            assert r.headers["retry-after"] == "2"
        if isinstance(fault.body, str):
            assert r.headers["content-type"].startswith("text/plain")
        assert p.grant_state(g.grant_id).refresh_token == g.refresh_token
        assert p.stats.faults == 1
        assert (await refresh(c, p, g.refresh_token)).status_code == 200  # fault consumed


async def fault_outcome(
    kind: FaultKind,
) -> tuple[type[Exception] | httpx.Response, IssuedGrant, str]:
    """Send one refresh under a fault; report what the client saw and the grant's RT."""
    async with running(client_timeout=0.3) as (p, c):
        g = p.issue_grant()
        p.inject(Fault(kind))
        try:
            seen: type[Exception] | httpx.Response = await refresh(c, p, g.refresh_token)
        except httpx.TransportError as exc:
            seen = type(exc)
        assert p.send_counts == {g.refresh_token: 1}
        return seen, g, p.grant_state(g.grant_id).refresh_token


@pytest.mark.parametrize(
    ("kind", "error", "rotated"),
    [
        ("hang", httpx.ReadTimeout, False),
        ("process_then_hang", httpx.ReadTimeout, True),
        ("drop", httpx.TransportError, False),
        ("process_then_drop", httpx.TransportError, True),
    ],
)
async def test_faults_without_an_answer(
    kind: FaultKind, error: type[Exception], rotated: bool, caplog: pytest.LogCaptureFixture
) -> None:
    seen, g, current_rt = await fault_outcome(kind)
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert isinstance(seen, type)
    assert issubclass(seen, error)
    assert (current_rt != g.refresh_token) is rotated


async def test_malformed_fault_rotates_but_the_body_is_not_json() -> None:
    seen, g, current_rt = await fault_outcome("malformed")
    assert isinstance(seen, httpx.Response)
    assert seen.status_code == 200
    with pytest.raises(ValueError, match=r"Unterminated|Expecting"):
        seen.json()
    assert current_rt != g.refresh_token


async def test_delay_fault_and_matching_by_refresh_token() -> None:
    async with running() as (p, c):
        a, b = p.issue_grant(), p.issue_grant()
        p.inject(Fault("delay", match_refresh_token=b.refresh_token, delay_s=0.2))
        start = time.monotonic()
        assert (await refresh(c, p, a.refresh_token)).status_code == 200
        assert time.monotonic() - start < 0.2
        assert len(p.faults) == 1
        start = time.monotonic()
        assert (await refresh(c, p, b.refresh_token)).status_code == 200
        assert time.monotonic() - start >= 0.2
        assert not p.faults


async def test_close_ends_hanging_and_sleeping_handlers_promptly() -> None:
    errors: list[type[Exception]] = []
    async with http_client(10) as c:
        p = FakeProvider(FakeProviderConfig(client_secret=SECRET, latency_s=30))
        await p.start()
        g = p.issue_grant()
        p.inject(Fault("hang", match_refresh_token="hang-me"))

        async def call(rt: str) -> None:
            with pytest.raises(httpx.TransportError) as caught:
                await refresh(c, p, rt)
            errors.append(caught.type)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "hang-me")
            tg.start_soon(call, g.refresh_token)
            while p.stats.requests < 2:  # noqa: ASYNC110 - the counter lives in the server
                await anyio.sleep(0.01)
            start = time.monotonic()
            await p.aclose()
        assert time.monotonic() - start < 0.5
    assert len(errors) == 2
    assert p.stats.refreshed == 0
    assert p.grant_state(g.grant_id).refresh_token == g.refresh_token


async def test_strict_request_parsing() -> None:
    async with running() as (p, c):
        rt = p.issue_grant().refresh_token
        auth = {"Authorization": basic()}
        body = f"grant_type=refresh_token&refresh_token={rt}&refresh_token={rt}"
        form = {**auth, "Content-Type": "application/x-www-form-urlencoded"}
        assert_error(await c.post(p.url, content=body, headers=form), 400, "invalid_request")
        plain = {**auth, "Content-Type": "text/plain"}
        assert_error(await c.post(p.url, content=body, headers=plain), 400, "invalid_request")
        assert p.send_counts == {rt: 1}  # the duplicate-laden form still presented it
        assert p.stats.refreshed == 0


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="auth_method"):
        FakeProviderConfig(auth_method="private_key_jwt")
    with pytest.raises(ValueError, match="fault kind"):
        Fault("explode")  # type: ignore[arg-type]
