"""What the provider, the network and Redis can do wrong, end to end.

Real Redis, real HTTP on 127.0.0.1, real in-process workers (``harness``).
Every test checks the central promise from the provider's side: a refresh
token whose outcome is unknown is sent again only where the profile allows
it, and tokens the provider issued end up in the store.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import anyio
import pytest
from multidict import CIMultiDict

from tests.faultkit import (
    AnswerRewriter,
    add_grants,
    blackhole_port,
    captured_logs,
    closed_port,
    log_events,
    raw_http_server,
    running,
    seed_profile,
)
from tests.harness import (
    all_current,
    claim_spend_send,
    is_current,
    make_settings,
    seed,
    wait_for,
    worker_running,
)
from tests.redis_server import RedisServer
from worker.app import build_refresher, open_store
from worker.errors import Ambiguous
from worker.fakeprovider import FakeProvider, FakeProviderConfig, Fault, FaultKind
from worker.metrics import Metrics
from worker.models import Claimed, Status
from worker.oauth2 import TokenSet
from worker.profiles import ProfileStore
from worker.store import Store
from worker.transport import TokenRequest, make_http_client, send

pytestmark = pytest.mark.anyio

QUARANTINED = "credential.quarantined"
NEEDS_REAUTH = "credential.needs_reauth"
REFRESHED = "token.refreshed"
FAILED = "token.failed"


def ids_of(events: list[dict[str, Any]]) -> list[str]:
    return sorted(e["credential_id"] for e in events)


# --------------------------------------------------------------- 1. unanswered


async def test_unanswered_request_under_strict_rotation_is_quarantined(redis_url: str) -> None:
    settings = make_settings(redis_url)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 4, profile={"timeout_s": 0.5})
        victim, rt = "cred-00000", grants["cred-00000"].refresh_token
        provider.inject(Fault("process_then_hang", match_refresh_token=rt))
        async with running(settings, store) as (events, _):
            await wait_for(
                lambda: events.of(QUARANTINED) and len(events.of(REFRESHED)) == 3,
                within=10,
                what="quarantine + 3 refreshes",
            )
            await anyio.sleep(0.3)  # would anything send it again?

        cred = await store.get(victim)
        assert cred.status is Status.QUARANTINED
        assert cred.refresh_token == rt  # nothing guessed, nothing invented
        assert cred.due_at_ms is None
        assert "timeout" in cred.last_error
        [event] = events.of(QUARANTINED)
        assert event["credential_id"] == victim
        assert event["reason"] == "timeout"
        assert provider.send_counts[rt] == 1
        assert provider.stats.reuse_events == []
        assert max(provider.send_counts.values()) == 1
        others = {k: g for k, g in grants.items() if k != victim}
        assert await all_current(store, provider, others)
        assert ids_of(events.of(REFRESHED)) == sorted(others)


async def test_unanswered_request_without_rotation_is_retried(redis_url: str) -> None:
    settings = make_settings(redis_url)
    async with (
        FakeProvider(FakeProviderConfig(rotate=False)) as provider,
        open_store(settings) as store,
    ):
        grants = await seed(store, provider, 3, profile={"timeout_s": 0.5, "rotation": "never"})
        victim, rt = "cred-00000", grants["cred-00000"].refresh_token
        provider.inject(Fault("process_then_hang", match_refresh_token=rt))
        async with running(settings, store) as (events, _):
            await wait_for(
                lambda: len(events.of(REFRESHED)) == 3, within=10, what="all three refreshed"
            )

        assert await all_current(store, provider, grants)
        [failed] = events.of(FAILED)
        assert failed["credential_id"] == victim
        assert failed["reason"] == "timeout"
        assert "retry_at" in failed
        assert events.of(QUARANTINED) == []
        assert provider.send_counts[rt] == 2  # the same token, by the rule
        assert provider.stats.reuse_events == []
        assert (await store.get(victim)).failures == 0


async def test_unanswered_request_inside_reuse_grace_is_retried(redis_url: str) -> None:
    settings = make_settings(redis_url)
    config = FakeProviderConfig(reuse_grace_s=30)
    async with FakeProvider(config) as provider, open_store(settings) as store:
        grants = await seed(store, provider, 3, profile={"timeout_s": 0.5, "reuse_grace_s": 30})
        victim, rt = "cred-00000", grants["cred-00000"].refresh_token
        provider.inject(Fault("process_then_hang", match_refresh_token=rt))
        async with running(settings, store) as (events, _):
            await wait_for(
                lambda: len(events.of(REFRESHED)) == 3, within=10, what="all three refreshed"
            )

        # the provider rotated twice for the victim; the store holds the newest
        assert provider.grant_state(grants[victim].grant_id).refreshes == 2
        assert await all_current(store, provider, grants)
        assert provider.send_counts[rt] == 2
        assert provider.stats.reuse_events == []
        assert [e["credential_id"] for e in events.of(FAILED)] == [victim]
        assert events.of(QUARANTINED) == []


async def test_grace_retry_is_not_sent_after_the_window_while_rate_limited(
    redis_url: str,
) -> None:
    settings = make_settings(redis_url, drain_grace_s=0.5)
    config = FakeProviderConfig(reuse_grace_s=2)
    async with FakeProvider(config) as provider, open_store(settings) as store:
        # the retry is allowed at ~0.6 s (0.6 + 0.5 < 2), then queues behind the burst
        profile = {"timeout_s": 0.5, "reuse_grace_s": 2, "rate_limit_per_s": 2}
        grants = await seed(store, provider, 1, profile=profile)
        victim, rt = "cred-00000", grants["cred-00000"].refresh_token
        provider.inject(Fault("process_then_hang", match_refresh_token=rt))
        async with running(settings, store) as (events, _):
            await wait_for(lambda: provider.send_counts.get(rt) == 1, within=5, what="sent")
            # while it hangs, a burst of credentials of the same profile comes due
            await add_grants(store, provider, 5, profile_id="p", prefix="burst")
            await wait_for(
                lambda: provider.send_counts.get(rt, 0) >= 2 or events.of(QUARANTINED),
                within=15,
                what="the retry or a quarantine",
            )
        assert provider.stats.reuse_events == []
        assert not provider.grant_state(grants[victim].grant_id).revoked


# ------------------------------------------------------- 2. connection dropped


@pytest.mark.parametrize("kind", ["process_then_drop", "drop"])
async def test_dropped_connection_is_an_unknown_outcome(redis_url: str, kind: FaultKind) -> None:
    settings = make_settings(redis_url)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 3)
        victim, rt = "cred-00000", grants["cred-00000"].refresh_token
        provider.inject(Fault(kind, match_refresh_token=rt))
        async with running(settings, store) as (events, _):
            await wait_for(
                lambda: events.of(QUARANTINED) and len(events.of(REFRESHED)) == 2,
                within=10,
                what="quarantine + 2 refreshes",
            )
            await anyio.sleep(0.3)

        cred = await store.get(victim)
        assert cred.status is Status.QUARANTINED
        assert cred.last_error in {"transport_error", "timeout"}  # see the test below
        assert cred.refresh_token == rt
        assert ids_of(events.of(QUARANTINED)) == [victim]
        assert provider.send_counts[rt] == 1
        assert provider.stats.reuse_events == []
        others = {k: g for k, g in grants.items() if k != victim}
        assert await all_current(store, provider, others)


async def test_connection_reset_is_not_labelled_a_timeout() -> None:
    async with FakeProvider() as provider, make_http_client() as http:
        grant = provider.issue_grant()
        provider.inject(Fault("process_then_drop"))
        request = TokenRequest(
            "POST",
            provider.url,
            CIMultiDict({"Content-Type": "application/x-www-form-urlencoded"}),
            f"grant_type=refresh_token&refresh_token={grant.refresh_token}".encode(),
            allow_private_network=True,
        )
        started = time.monotonic()
        with pytest.raises(Ambiguous) as caught:
            await send(http, request, timeout_s=5)
        assert time.monotonic() - started < 1  # an immediate reset, not a timeout
        assert caught.value.reason == "transport_error"


async def test_a_cookie_set_in_one_answer_is_never_sent_with_another_request() -> None:
    """One HTTP session serves every tenant: a provider's Set-Cookie on one
    credential's answer must not ride along with the next credential's request."""
    from aiohttp import web

    seen: list[str | None] = []

    async def token(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.json_response({"access_token": "a", "token_type": "Bearer"})
        response.set_cookie("session", "tenant-a-secret")
        return response

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        # a host name: aiohttp's default jar ignores cookies from IP addresses
        url = f"http://localhost:{port}/token"
        request = TokenRequest("POST", url, CIMultiDict(), b"x=1", allow_private_network=True)
        async with make_http_client() as http:
            for _ in range(2):
                answer = await send(http, request, timeout_s=5)
                assert answer.status == 200
                assert "session=" in answer.headers.get("Set-Cookie", "")
    finally:
        await runner.cleanup()
    assert seen == [None, None]


# ------------------------------------------------------------ 3. transient


async def test_transient_answers_are_retried_then_refreshed(redis_url: str) -> None:
    settings = make_settings(redis_url)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 4)
        rts = {cid: g.refresh_token for cid, g in grants.items()}
        provider.inject(
            Fault("status", match_refresh_token=rts["cred-00000"], status=500, body="oops"),
            Fault(
                "status",
                match_refresh_token=rts["cred-00001"],
                status=503,
                body={"error": "temporarily_unavailable"},
            ),
            Fault(
                "status",
                match_refresh_token=rts["cred-00002"],
                status=429,
                headers={"Retry-After": "1"},
                body="Too Many Requests",
            ),
        )
        async with running(settings, store) as (events, _):
            await wait_for(lambda: len(events.of(REFRESHED)) == 4, within=10, what="4 refreshes")

        assert await all_current(store, provider, grants)
        failed = {e["credential_id"]: e for e in events.of(FAILED)}
        assert sorted(failed) == ["cred-00000", "cred-00001", "cred-00002"]
        for event in failed.values():
            assert event["failures"] == 1
            assert event["retry_at"] >= event["ts"] + 50
        throttled = failed["cred-00002"]
        assert throttled["reason"] == "throttled"
        assert throttled["retry_at"] >= throttled["ts"] + 1000  # Retry-After honoured
        refreshed_at = {e["credential_id"]: e["ts"] for e in events.of(REFRESHED)}
        assert refreshed_at["cred-00002"] >= throttled["retry_at"]
        assert failed["cred-00000"]["reason"] == "server_error"
        assert failed["cred-00001"]["reason"] == "temporarily_unavailable"
        for cid in failed:
            cred = await store.get(cid)
            assert cred.failures == 0  # reset on success
            assert cred.version == 1
            assert provider.send_counts[rts[cid]] == 2  # refused, then honoured
        assert events.of(QUARANTINED) == events.of(NEEDS_REAUTH) == []
        assert provider.stats.reuse_events == []


async def test_connection_refused_is_not_sent_and_retried(redis_url: str) -> None:
    settings = make_settings(redis_url)
    port = closed_port()
    provider = FakeProvider(port=port)  # grants exist; nothing listens yet
    async with open_store(settings) as store:
        url = f"http://127.0.0.1:{port}/token"
        grants = await seed_profile(store, provider, 1, profile={"id": "p", "token_url": url})
        async with running(settings, store) as (events, _):
            await wait_for(
                lambda: len(events.of(FAILED)) >= 3, within=10, what="three refused attempts"
            )
            assert {e["reason"] for e in events.of(FAILED)} == {"connect_error"}
            cred = await store.get("cred-00000")
            assert cred.status is Status.ACTIVE
            assert cred.failures >= 3
            async with provider:  # the endpoint comes back
                await wait_for(lambda: events.of(REFRESHED), within=10, what="refresh")
                assert await all_current(store, provider, grants)
                assert provider.send_counts == {grants["cred-00000"].refresh_token: 1}
        assert events.of(QUARANTINED) == []
        assert (await store.get("cred-00000")).failures == 0


async def test_connect_that_never_completes_is_not_sent(redis_url: str) -> None:
    settings = make_settings(redis_url)
    provider = FakeProvider()
    async with open_store(settings) as store:
        with blackhole_port() as port:
            url = f"http://127.0.0.1:{port}/token"
            await seed_profile(
                store, provider, 1, profile={"id": "p", "token_url": url, "timeout_s": 0.5}
            )
            async with running(settings, store) as (events, _):
                await wait_for(
                    lambda: events.of(FAILED) or events.of(QUARANTINED), within=10, what="outcome"
                )
        assert events.of(QUARANTINED) == []
        assert (await store.get("cred-00000")).status is Status.ACTIVE


# ------------------------------------------------------------ 4. permanent


async def test_permanent_refusals_need_reauth(redis_url: str) -> None:
    settings = make_settings(redis_url)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 4)
        rts = {cid: g.refresh_token for cid, g in grants.items()}
        refusals = {
            "cred-00000": (400, {"error": "invalid_grant"}, "invalid_grant"),
            "cred-00001": (401, {"error": "invalid_client"}, "invalid_client"),
            "cred-00002": (200, {"error": "bad_refresh_token"}, "bad_refresh_token"),
        }
        for cid, (status, body, _) in refusals.items():
            provider.inject(Fault("status", match_refresh_token=rts[cid], status=status, body=body))
        async with running(settings, store) as (events, _):
            await wait_for(
                lambda: len(events.of(NEEDS_REAUTH)) == 3 and events.of(REFRESHED),
                within=10,
                what="3 refusals + 1 refresh",
            )
            requests = provider.stats.requests
            await anyio.sleep(1.0)  # nothing more is sent for them
            assert provider.stats.requests == requests

        assert ids_of(events.of(NEEDS_REAUTH)) == sorted(refusals)
        reasons = {e["credential_id"]: e["reason"] for e in events.of(NEEDS_REAUTH)}
        for cid, (status, _, reason) in refusals.items():
            cred = await store.get(cid)
            assert cred.status is Status.NEEDS_REAUTH
            assert reasons[cid] == reason
            assert cred.last_error == f"{reason} (HTTP {status})"
            assert cred.due_at_ms is None
            # the old tokens are kept (the operator may inspect or re-import)
            assert cred.refresh_token == grants[cid].refresh_token
            assert cred.access_token == grants[cid].access_token
            assert provider.send_counts[rts[cid]] == 1
        assert events.of(FAILED) == events.of(QUARANTINED) == []
        assert await is_current(store, provider, "cred-00003", grants["cred-00003"])


# ------------------------------------------------------------ 5. malformed

_BIG = b'{"access_token": "' + b"x" * (1024 * 1024) + b'", "expires_in": 3600}'

#: 2xx answers the provider sent after consuming the token: unusable, so the
#: outcome is unknown and strict rotation quarantines.
GARBAGE_2XX: dict[str, bytes] = {
    "truncated_json": b'{"access_token": "trunc',
    "not_an_object": b'["access_token"]',
    "access_token_missing": b'{"token_type": "Bearer", "expires_in": 3600}',
    "access_token_not_string": b'{"access_token": 123, "expires_in": 3600}',
    "one_megabyte": _BIG,
    "empty": b"",
    "binary": b"\xff\xfe\x00garbage",
}
#: 2xx answers with a usable access token, odd fields and no new refresh
#: token from a provider that always rotates (issue 10): the access token is
#: stored (with warnings), and the old refresh token, probably spent, is
#: never sent again: the credential is quarantined without a request.
ODD_2XX: dict[str, bytes] = {
    "refresh_token_not_string": b'{"access_token": "a", "refresh_token": 5}',
    "token_type_not_string": b'{"access_token": "a", "token_type": ["Bearer"]}',
    "expires_in_abc": b'{"access_token": "a", "expires_in": "abc"}',
    "expires_in_negative": b'{"access_token": "a", "expires_in": -5}',
    "expires_in_bool": b'{"access_token": "a", "expires_in": true}',
}


async def test_malformed_answers_are_classified_and_never_crash(redis_url: str) -> None:
    settings = make_settings(redis_url)
    answers = GARBAGE_2XX | ODD_2XX
    n = len(answers)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, n + 3)
        names = dict(zip(sorted(grants)[:n], answers, strict=True))
        html_victim, *healthy = sorted(grants)[n:]
        for cid, name in names.items():
            rt = grants[cid].refresh_token
            provider.inject(Fault("malformed", match_refresh_token=rt, body=answers[name]))
        provider.inject(
            Fault(
                "status",
                match_refresh_token=grants[html_victim].refresh_token,
                status=403,
                body="<html><body><h1>403 Forbidden</h1>Too many requests</body></html>",
                headers={"Content-Type": "text/html"},
            )
        )
        refreshed = 3 + len(ODD_2XX)
        with captured_logs() as logs:
            async with running(settings, store) as (events, workers):
                await wait_for(
                    lambda: (
                        len(events.of(QUARANTINED)) == n and len(events.of(REFRESHED)) == refreshed
                    ),
                    within=15,
                    what="every answer classified",
                )
                # the worker still works: a credential added now is refreshed
                late = await seed_profile(
                    store, provider, 1, profile={"id": "late", "token_url": provider.url},
                    prefix="late",
                )  # fmt: skip
                await wait_for(
                    lambda: len(events.of(REFRESHED)) == refreshed + 1, within=10, what="late"
                )
                assert not workers[0].worker.stopped

        crashed = [e for e in log_events(logs) if e["event"] == "refresh.crashed"]
        assert crashed == []
        assert ids_of(events.of(QUARANTINED)) == sorted(names)
        for cid, name in names.items():
            cred = await store.get(cid)
            assert cred.status is Status.QUARANTINED, name
            if name in GARBAGE_2XX:
                assert cred.last_error.startswith("invalid_response"), name
            else:  # stored, then stopped before the old refresh token went out again
                assert cred.access_token == "a", name
                assert cred.last_error == "unknown_outcome", name
                assert cred.refresh_token == grants[cid].refresh_token
        reasons = {e["credential_id"]: e["reason"] for e in events.of(QUARANTINED)}
        assert {reasons[c] for c, name in names.items() if name in GARBAGE_2XX} == {
            "invalid_response"
        }
        stored = [e for e in events.of(REFRESHED) if names.get(e["credential_id"]) in ODD_2XX]
        assert len(stored) == len(ODD_2XX)
        assert all(e["access_token"] == "a" and e["warnings"] for e in stored)
        [throttled] = events.of(FAILED)
        assert throttled["credential_id"] == html_victim
        assert throttled["reason"] == "throttled"
        assert await all_current(
            store, provider, {k: grants[k] for k in [html_victim, *healthy]} | late
        )
        assert provider.stats.reuse_events == []
        for cid in names:  # none of them was sent twice
            assert provider.send_counts[grants[cid].refresh_token] == 1
        assert max(provider.send_counts.values()) <= 2
        assert provider.send_counts[grants[html_victim].refresh_token] == 2


_DEEP = b'{"access_token": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
_HUGE = b'{"access_token": "a", "expires_in": 1' + b"0" * 400 + b"}"

CRASHERS: dict[str, Fault | bytes] = {
    # json.loads raises RecursionError, not ValueError (oauth2._json_object)
    "deeply_nested_json": Fault("malformed", body=_DEEP),
    # math.isfinite(10**400) raises OverflowError (oauth2._lifetime_s)
    "expires_in_huge_integer": Fault("malformed", body=_HUGE),
    # httpx.DecodingError is not an httpx.TransportError (transport.send)
    "bad_gzip_body": Fault(
        "status",
        status=200,
        body=b"this is not gzip",
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    ),
    # aiohttp.ClientResponseError is not mapped by httpx-aiohttp (transport.send)
    "bad_status_line": b'{"access_token": "not http at all"}\r\n\r\n',
    "header_too_long": b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n{}",
    "bad_chunk_size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
}


@pytest.mark.parametrize("name", list(CRASHERS))
async def test_unparseable_answers_are_classified_without_crashing(
    redis_url: str, name: str
) -> None:
    settings = make_settings(redis_url)
    fault = CRASHERS[name]
    async with FakeProvider() as provider, open_store(settings) as store:
        if isinstance(fault, Fault):
            grants = await seed(store, provider, 2)
            victim = "cred-00000"
            provider.inject(
                Fault(
                    fault.kind,
                    match_refresh_token=grants[victim].refresh_token,
                    status=fault.status,
                    body=fault.body,
                    headers=fault.headers,
                )
            )
            garbage = None
        else:
            grants = await seed(store, provider, 1)
            victim = "bad-00000"
            garbage = fault
        async with raw_http_server(garbage or b"") as raw_url:
            if garbage is not None:
                await seed_profile(
                    store, provider, 1, profile={"id": "raw", "token_url": raw_url}, prefix="bad"
                )
            with captured_logs() as logs:
                async with running(settings, store) as (events, _):
                    await wait_for(
                        lambda: events.of(QUARANTINED) or "refresh.crashed" in logs.getvalue(),
                        within=10,
                        what="an outcome or a crash",
                    )
                    await wait_for(lambda: events.of(REFRESHED), within=5, what="the others")
        crashed = [e for e in log_events(logs) if e["event"] == "refresh.crashed"]
        assert crashed == [], crashed[0].get("exception", "").splitlines()[-1]
        assert ids_of(events.of(QUARANTINED)) == [victim]
        assert (await store.get(victim)).status is Status.QUARANTINED


def _rewrite_status_ok(doc: dict[str, Any]) -> dict[str, Any]:
    return doc | {"status": "OK"}


def _rewrite_empty_refresh_token(doc: dict[str, Any]) -> dict[str, Any]:
    return doc | {"refresh_token": ""}


def _jwt(exp: float) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part({'exp': exp})}.sig"


def _rewrite_expired_jwt(doc: dict[str, Any]) -> dict[str, Any]:
    # a provider whose clock is a minute behind: the JWT's exp is in the past
    out = {k: v for k, v in doc.items() if k != "expires_in"}
    return out | {"access_token": _jwt(time.time() - 60)}


async def test_successful_answer_with_a_status_field_is_not_a_refusal(redis_url: str) -> None:
    settings = make_settings(redis_url)
    async with (
        FakeProvider() as provider,
        AnswerRewriter(provider.url, _rewrite_status_ok) as rewriter,
        open_store(settings) as store,
    ):
        grants = await seed_profile(
            store, provider, 1, profile={"id": "p", "token_url": rewriter.url}
        )
        async with running(settings, store) as (events, _):
            await wait_for(lambda: events.items, within=10, what="an outcome")
        assert provider.grant_state(grants["cred-00000"].grant_id).refreshes == 1
        assert events.of(NEEDS_REAUTH) == []
        assert await all_current(store, provider, grants)


async def test_empty_refresh_token_is_never_taken_as_keep_the_old_one(redis_url: str) -> None:
    settings = make_settings(redis_url)
    async with (
        FakeProvider(FakeProviderConfig(lifetime_s=2)) as provider,
        AnswerRewriter(provider.url, _rewrite_empty_refresh_token) as rewriter,
        open_store(settings) as store,
    ):
        grants = await seed_profile(
            store, provider, 1, profile={"id": "p", "token_url": rewriter.url}
        )
        async with running(settings, store) as (events, _):
            await wait_for(
                lambda: provider.stats.reuse_events or events.of(QUARANTINED),
                within=10,
                what="a reuse or a quarantine",
            )
        assert provider.stats.reuse_events == []
        assert not provider.grant_state(grants["cred-00000"].grant_id).revoked


async def test_expired_jwt_does_not_cause_a_refresh_loop(redis_url: str) -> None:
    settings = make_settings(redis_url)
    async with (
        FakeProvider() as provider,
        AnswerRewriter(provider.url, _rewrite_expired_jwt) as rewriter,
        open_store(settings) as store,
    ):
        grants = await seed_profile(
            store, provider, 1, profile={"id": "p", "token_url": rewriter.url}
        )
        async with running(settings, store):
            await anyio.sleep(1.0)
        refreshes = provider.grant_state(grants["cred-00000"].grant_id).refreshes
        assert refreshes <= 2, f"{refreshes} refreshes in 1 s"


# --------------------------------------------------------------- 6. no secrets


async def test_no_token_or_secret_in_logs(redis_url: str) -> None:
    settings = make_settings(redis_url)
    config = FakeProviderConfig(client_secret="cs-Zq8Ux1VkP0mW7nT4", lifetime_s=2)
    async with FakeProvider(config) as provider, open_store(settings) as store:
        grants = await seed(store, provider, 8, profile={"timeout_s": 1})
        rt = {cid: g.refresh_token for cid, g in grants.items()}
        provider.inject(
            Fault(
                "status",
                match_refresh_token=rt["cred-00000"],
                status=400,
                body={
                    "error": "invalid_grant",
                    "error_description": f"bad token {rt['cred-00000']}",
                    "refresh_token": rt["cred-00000"],
                },
            ),
            Fault(
                "status",
                match_refresh_token=rt["cred-00001"],
                status=500,
                body=f"internal error for refresh token {rt['cred-00001']}",
            ),
            Fault("process_then_hang", match_refresh_token=rt["cred-00002"]),
            Fault(
                "malformed",
                match_refresh_token=rt["cred-00003"],
                body=f'{{"access_token": "{rt["cred-00003"]}", "expires_in": "x"}}',
            ),
            Fault(
                "status",
                match_refresh_token=rt["cred-00004"],
                status=429,
                headers={"Retry-After": "1"},
                body=f"slow down {rt['cred-00004']}",
            ),
            Fault("process_then_drop", match_refresh_token=rt["cred-00005"]),
        )
        with captured_logs() as logs:
            async with running(settings, store) as (events, _):
                # successes twice over (2 s lifetimes) plus every failure kind
                await wait_for(
                    lambda: (
                        len(events.of(REFRESHED)) >= 8
                        and len(events.of(QUARANTINED)) == 3
                        and events.of(NEEDS_REAUTH)
                    ),
                    within=15,
                    what="a mix of outcomes",
                )
        text = logs.getvalue()
        kinds = {e["event"] for e in log_events(logs)}
        assert {"token.refresh.succeeded", "token.refresh.retry"} <= kinds
        assert {"token.refresh.needs_reauth", "token.refresh.quarantined"} <= kinds

        secrets = {config.client_secret}
        for cid, grant in grants.items():
            secrets |= {grant.refresh_token, grant.access_token}
            state = provider.grant_state(grant.grant_id)
            secrets |= {state.refresh_token, state.access_token}
            cred = await store.get(cid)
            secrets |= {cred.refresh_token, cred.access_token}
        for event in events.of(REFRESHED):
            secrets.add(event["access_token"])
        secrets |= set(provider.send_counts)
        leaked = sorted(s for s in secrets if s in text)
        assert leaked == []
        basic = base64.b64encode(f"{config.client_id}:{config.client_secret}".encode()).decode()
        assert basic not in text


# ----------------------------------------------------------------- 7. Redis


async def test_redis_paused_while_refreshes_are_in_flight(fresh_redis: RedisServer) -> None:
    settings = make_settings(fresh_redis.url)
    config = FakeProviderConfig(latency_s=1.0)
    async with FakeProvider(config) as provider, open_store(settings) as store:
        grants = await seed(store, provider, 6)
        async with worker_running(settings):
            await wait_for(lambda: provider.stats.requests >= 6, within=10, what="in flight")
            fresh_redis.pause()  # the answers arrive while Redis is frozen
            try:
                await wait_for(lambda: provider.stats.refreshed >= 6, within=5, what="answers")
                await anyio.sleep(1.5)
            finally:
                fresh_redis.resume()
            await wait_for(
                lambda: all_current(store, provider, grants), within=15, what="tokens landed"
            )
        assert provider.stats.reuse_events == []
        assert max(provider.send_counts.values()) == 1
        for cid in grants:
            assert (await store.get(cid)).version == 1


async def test_redis_killed_and_restarted_during_a_run(fresh_redis: RedisServer) -> None:
    settings = make_settings(fresh_redis.url)
    config = FakeProviderConfig(latency_s=1.0, lifetime_s=3)
    async with FakeProvider(config) as provider, open_store(settings) as store:
        grants = await seed(store, provider, 6)
        async with worker_running(settings):
            await wait_for(lambda: provider.stats.requests >= 6, within=10, what="in flight")
            fresh_redis.kill()  # answers arrive with nowhere to go
            await wait_for(lambda: provider.stats.refreshed >= 6, within=5, what="answers")
            await anyio.sleep(0.5)
            # appendonly: everything fsynced survives
            await anyio.to_thread.run_sync(fresh_redis.start)

            def refreshed_twice() -> bool:
                return all(provider.grant_state(g.grant_id).refreshes >= 2 for g in grants.values())

            await wait_for(refreshed_twice, within=20, what="later refreshes too")
            await wait_for(
                lambda: all_current(store, provider, grants), within=10, what="tokens landed"
            )
        assert provider.stats.reuse_events == []
        assert max(provider.send_counts.values()) == 1
        for cid in grants:
            assert (await store.get(cid)).status is Status.ACTIVE


async def test_drain_hands_back_claims_waiting_for_a_rate_limit_slot(redis_url: str) -> None:
    # a 30 s lease: waits of up to 10 s (a third of it) queue for the slot
    settings = make_settings(redis_url, drain_grace_s=2.0, lease_s=30.0)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 6, profile={"rate_limit_per_s": 0.2})
        async with worker_running(settings) as [w]:
            await wait_for(lambda: provider.stats.refreshed == 1, within=5, what="one refresh")
            stopping = time.monotonic()
            w.worker.stop()
            await wait_for(lambda: w.worker.stopped, within=10, what="stopped")
            took = time.monotonic() - stopping
        waiting = [cid for cid, g in grants.items() if g.refresh_token not in provider.send_counts]
        assert len(waiting) == 5
        locks = [key async for key in store.client.scan_iter(match="*lock:*")]
        assert locks == [], f"{len(locks)} locks left; the drain took {took:.1f}s"
        now_ms = int(time.time() * 1000)
        for cid in waiting:
            due = (await store.get(cid)).due_at_ms
            assert due is not None
            assert due <= now_ms  # handed back: due now, not leased


async def test_a_request_out_at_the_drain_deadline_finishes_and_lands(redis_url: str) -> None:
    """Cutting off a request that is out would leave an open intent that later
    reads as an unknown outcome - a quarantine, under strict rotation, for a
    request that was answered. Past the drain deadline it still runs to its
    answer (bounded by the profile's timeout) and the new tokens land."""
    settings = make_settings(redis_url, drain_grace_s=0.2)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 1, profile={"timeout_s": 5})
        rt = grants["cred-00000"].refresh_token
        provider.inject(Fault("delay", match_refresh_token=rt, delay_s=1.5))
        async with worker_running(settings) as [w]:
            await wait_for(lambda: provider.send_counts.get(rt) == 1, within=5, what="sent")
            w.worker.stop()  # the drain deadline passes while the answer is on its way
            await wait_for(lambda: w.worker.stopped, within=10, what="stopped")
        cred = await store.get("cred-00000")
        assert cred.version == 1
        assert cred.in_flight is False
        assert cred.status is Status.ACTIVE
        assert await all_current(store, provider, grants)
        assert provider.stats.reuse_events == []


# --------------------------------------------- late commits racing a recovery


async def _send_and_hold(
    store: Store, provider: FakeProvider, cred_id: str, *, lease_ms: int
) -> tuple[Claimed, TokenSet]:
    """A worker claims, spends and gets new tokens, then stalls (a network
    partition from Redis, a long GC pause): its commit has not landed when
    its lease and spend deadline run out."""
    del provider  # answers through the profile's endpoint
    claimed, tokens = await claim_spend_send(store, cred_id, token="A", lease_ms=lease_ms)
    profile = await ProfileStore(store).load("p")
    # the lease (renewed by the spend if need be) and the spend deadline are over
    hold_ms = max(lease_ms, int(profile.timeout_s * 1000) + 2 * 500)
    await anyio.sleep((hold_ms + 300) / 1000)
    return claimed, tokens


async def _late_commit(store: Store, claimed: Claimed, tokens: TokenSet) -> bool:
    result = await store.commit(
        claimed,
        "refreshed",
        next_due=int(time.time() * 1000) + 3_600_000,
        fields={
            "access_token": tokens.access_token,
            "refresh_token": tokens.refresh_token,
            "token_type": tokens.token_type,
            "scope": tokens.scope,
            "expires_at": tokens.expires_at_ms,
        },
        event="",
    )
    return result.ok


async def test_stale_quarantine_does_not_override_a_late_commit(redis_url: str) -> None:
    settings = make_settings(redis_url)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 1, profile={"timeout_s": 0.5})
        cid = "cred-00000"
        a, tokens = await _send_and_hold(store, provider, cid, lease_ms=1000)
        # worker B claims and recovers A's spend intent as an unknown outcome
        part = store.keys.partition_of(cid)
        _, _, [b] = await store.claim(part, limit=1, lease_ms=5000, token="B", ids=[cid])
        assert b.recovered
        # A's commit lands now: the design accepts it (these are the only valid tokens)
        assert await _late_commit(store, a, tokens)
        assert await is_current(store, provider, cid, grants[cid])
        # B applies the unknown-outcome rule to its now stale snapshot
        async with make_http_client() as http:
            await build_refresher(settings, store, http, Metrics()).refresh(b)
        cred = await store.get(cid)
        assert cred.status is Status.ACTIVE, "fresh tokens stored, yet quarantined"


async def test_late_commit_does_not_lose_the_tokens_of_a_grace_retry(redis_url: str) -> None:
    settings = make_settings(redis_url)
    config = FakeProviderConfig(reuse_grace_s=30)
    async with FakeProvider(config) as provider, open_store(settings) as store:
        grants = await seed(store, provider, 1, profile={"timeout_s": 1, "reuse_grace_s": 30})
        cid, rt0 = "cred-00000", grants["cred-00000"].refresh_token
        a, tokens = await _send_and_hold(store, provider, cid, lease_ms=1000)
        part = store.keys.partition_of(cid)
        _, _, [b] = await store.claim(part, limit=1, lease_ms=5000, token="B", ids=[cid])
        assert b.recovered
        # B retries with the same token inside the grace window (allowed) ...
        provider.inject(Fault("delay", match_refresh_token=rt0, delay_s=0.5))
        outcome: list[str] = []
        async with make_http_client() as http, anyio.create_task_group() as tg:
            refresher = build_refresher(settings, store, http, Metrics())

            async def retry() -> None:
                outcome.append(await refresher.refresh(b))

            tg.start_soon(retry)
            await wait_for(lambda: provider.send_counts[rt0] == 2, within=5, what="B's send")
            # ... and A's late commit lands while B's request is out
            assert await _late_commit(store, a, tokens)
        assert provider.stats.reuse_events == []
        assert provider.grant_state(grants[cid].grant_id).refreshes == 2
        assert await is_current(store, provider, cid, grants[cid]), "newest tokens lost"
        assert outcome == ["refreshed"]
