"""Issue 13, credential lifecycle and pacing: keep-alive, refresh-token
expiry, give-up, the cluster-wide GCRA limiter, TLS trust and per-host caps.
Real Redis and real HTTP servers on 127.0.0.1; short intervals, no mocks."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import httpx
import pytest

from tests.harness import make_settings, seed, wait_for, worker_running
from worker.answers import read_answer
from worker.app import open_store
from worker.clusterrate import ClusterRate
from worker.errors import ConfigError
from worker.fakeprovider import FakeProvider, Fault
from worker.models import Status
from worker.profile import Profile
from worker.ratelimit import ProfileLimits, RateLimited
from worker.scheduling import Schedule
from worker.settings import Settings
from worker.transport import HttpAnswer

pytestmark = pytest.mark.anyio

NOW_MS = 1_700_000_000_000
DAY_MS = 86_400_000


def _profile(**overrides: Any) -> Profile:
    base: dict[str, Any] = {
        "id": "p",
        "token_url": "https://auth.example.com/token",
        "client_id": "c",
        "client_secret": "s",
    }
    return Profile.from_mapping(base | overrides)


# ------------------------------------------------------------- keep-alive


def test_keep_alive_brings_a_long_lived_token_forward() -> None:
    """A 30-day access token under a 7-day keep-alive is refreshed within 7 days."""
    due = Schedule(jitter_fraction=0).next_due_ms(
        now_ms=NOW_MS, expires_at_ms=NOW_MS + 30 * DAY_MS, max_interval_s=7 * 86400
    )
    assert due == NOW_MS + 7 * DAY_MS
    plain = Schedule(jitter_fraction=0).next_due_ms(
        now_ms=NOW_MS, expires_at_ms=NOW_MS + 30 * DAY_MS
    )
    assert plain > NOW_MS + 29 * DAY_MS


def test_keep_alive_never_delays_an_expiry_based_refresh() -> None:
    due = Schedule(jitter_fraction=0).next_due_ms(
        now_ms=NOW_MS, expires_at_ms=NOW_MS + 3_600_000, max_interval_s=7 * 86400
    )
    assert due == NOW_MS + 3_600_000 - 720_000


def test_profile_refuses_a_keep_alive_under_a_minute() -> None:
    with pytest.raises(ConfigError, match="max_refresh_interval_s"):
        _profile(max_refresh_interval_s=5)


# ------------------------------------------------- refresh-token expiry


def test_refresh_token_expiry_pulls_the_refresh_before_it() -> None:
    """An access token valid 400 days whose refresh token dies in 10 days:
    refreshed before the refresh token expires, not 400 days later."""
    rt_exp = NOW_MS + 10 * DAY_MS
    due = Schedule(jitter_fraction=0).next_due_ms(
        now_ms=NOW_MS, expires_at_ms=NOW_MS + 400 * DAY_MS, refresh_expires_at_ms=rt_exp
    )
    assert NOW_MS < due < rt_exp
    assert rt_exp - due == 1_800_000  # the usual lead, capped at 30 min


def test_an_absolute_refresh_expiry_already_in_its_lead_does_not_loop() -> None:
    """Spotify's refresh token dies 6 months after consent whatever we do:
    once its lead has begun, refreshing more often cannot help."""
    due = Schedule(jitter_fraction=0).next_due_ms(
        now_ms=NOW_MS, expires_at_ms=NOW_MS + 3_600_000, refresh_expires_at_ms=NOW_MS + 60_000
    )
    assert due == NOW_MS + 3_600_000 - 720_000


def _answer(body: dict[str, Any]) -> HttpAnswer:
    headers = httpx.Headers({"content-type": "application/json"})
    return HttpAnswer(200, headers, json.dumps(body).encode(), False)


@pytest.mark.parametrize(
    "name", ["refresh_token_expires_in", "refresh_expires_in", "x_refresh_token_expires_in"]
)
def test_common_refresh_expiry_fields_are_read_by_default(name: str) -> None:
    body = {"access_token": "a", "refresh_token": "r2", "expires_in": 3600, name: 15_552_000}
    tokens = read_answer(_answer(body), _profile(), now_ms=NOW_MS, old_secret="r1", old_scope="")
    assert tokens.refresh_expires_at_ms == NOW_MS + 15_552_000_000
    assert tokens.warnings == ()


def test_keycloak_offline_zero_means_no_refresh_expiry() -> None:
    body = {"access_token": "a", "refresh_token": "r2", "expires_in": 300, "refresh_expires_in": 0}
    tokens = read_answer(_answer(body), _profile(), now_ms=NOW_MS, old_secret="r1", old_scope="")
    assert tokens.refresh_expires_at_ms is None
    assert tokens.warnings == ()


def test_the_profile_field_wins_over_the_common_names() -> None:
    body = {"access_token": "a", "expires_in": 300, "refresh_expires_in": 100, "rt_ttl": 7200}
    p = _profile(refresh_expires_in_field="rt_ttl")
    tokens = read_answer(_answer(body), p, now_ms=NOW_MS, old_secret="r1", old_scope="")
    assert tokens.refresh_expires_at_ms == NOW_MS + 7_200_000


# ------------------------------------------------------------ GCRA limiter


async def test_gcra_allows_the_burst_then_spaces_requests(redis_url: str) -> None:
    async with open_store(make_settings(redis_url)) as store:
        rate = ClusterRate(store.client, store.keys)
        answers = [await rate.ask("p", 10.0, 3) for _ in range(4)]
        assert answers[:3] == [0, 0, 0]
        assert 50 <= answers[3] <= 100  # one emission interval (100 ms), less elapsed time
        await anyio.sleep(answers[3] / 1000 + 0.01)
        assert await rate.ask("p", 10.0, 3) == 0
        assert await rate.ask("other", 10.0, 3) == 0  # one limiter per profile
        assert store.keys.rate_limit("p").endswith("{p}")


async def test_two_processes_limiters_share_one_rate(redis_url: str) -> None:
    """Two ProfileLimits (as two worker processes) over one Redis: together
    they stay within rate + burst, where each alone would allow that much."""
    profile = _profile(rate_limit_per_s=20, rate_limit_burst=2)
    stamps: list[float] = []
    async with (
        open_store(make_settings(redis_url)) as one,
        open_store(make_settings(redis_url)) as two,
    ):
        limits = [ProfileLimits(ClusterRate(s.client, s.keys), max_wait_s=10) for s in (one, two)]

        async def take(limit: ProfileLimits) -> None:
            release = await limit.acquire(profile)
            stamps.append(time.monotonic())
            release()

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for n in range(22):
                tg.start_soon(take, limits[n % 2])
    took = time.monotonic() - started
    assert took >= (22 - 2) / 20 * 0.9  # one shared 20/s, not 2 x 20/s
    stamps.sort()
    for i, first in enumerate(stamps):
        assert sum(1 for s in stamps[i:] if s - first < 0.5) <= 2 + 20 * 0.5 + 1


async def test_a_wait_past_the_bound_raises_rate_limited(redis_url: str) -> None:
    profile = _profile(rate_limit_per_s=1, rate_limit_burst=1)
    async with open_store(make_settings(redis_url)) as store:
        limits = ProfileLimits(ClusterRate(store.client, store.keys), max_wait_s=0.2)
        (await limits.acquire(profile))()
        with pytest.raises(RateLimited) as raised:
            await limits.acquire(profile)
        assert 800 <= raised.value.retry_after_ms <= 1000


def test_unlimited_profiles_skip_the_limiter() -> None:
    assert ProfileLimits.unlimited(_profile())
    assert not ProfileLimits.unlimited(_profile(rate_limit_per_s=5))
    assert _profile(rate_limit_per_s=5).effective_burst == 5
    assert _profile(rate_limit_per_s=0.2).effective_burst == 1
    assert _profile(rate_limit_per_s=5, rate_limit_burst=2).effective_burst == 2


# ---------------------------------------------------------------- give-up


async def test_failures_past_give_up_after_end_as_needs_reauth(redis_url: str) -> None:
    settings = make_settings(redis_url, backoff_base_s=0.1, backoff_max_s=0.2)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 1, profile={"give_up_after_s": 1.5})
        provider.inject(*[Fault("status", status=503)] * 100)
        started = time.monotonic()
        async with worker_running(settings):

            async def stopped() -> bool:
                return (await store.get("cred-00000")).status is Status.NEEDS_REAUTH

            await wait_for(stopped, within=10, what="the credential to give up")
        cred = await store.get("cred-00000")
        assert time.monotonic() - started >= 1.5
        assert cred.last_error.startswith("gave_up")
        assert cred.failures >= 3
        assert cred.refresh_token == grants["cred-00000"].refresh_token  # nothing was lost


async def test_a_success_ends_the_failure_streak(redis_url: str) -> None:
    settings = make_settings(redis_url, backoff_base_s=0.1, backoff_max_s=0.2)
    async with FakeProvider() as provider, open_store(settings) as store:
        await seed(store, provider, 1, profile={"give_up_after_s": 1000})
        provider.inject(*[Fault("status", status=503)] * 2)
        async with worker_running(settings):
            await wait_for(lambda: provider.stats.refreshed >= 1, within=10, what="a refresh")
        raw = await store.raw_fields("cred-00000")
        assert raw.get("failures", "0") in {"0", ""}
        assert not raw.get("failing_since")


def test_give_up_after_is_checked() -> None:
    assert _profile().give_up_after_s == 4 * 86400
    with pytest.raises(ConfigError, match="give_up_after_s"):
        _profile(give_up_after_s=-1)


def test_settings_refuse_a_missing_ca_file(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="REFRESHD_CA_FILE"):
        Settings(ca_file=str(tmp_path / "nope.pem"))


async def test_a_claim_without_room_soon_goes_back_due_when_there_is(redis_url: str) -> None:
    """A 5 s wait under a 5 s lease (bound: a third of it) is not waited
    for: the claim goes back, due when the shared limiter has room, and the
    lock is released at once (no claim sits out its lease)."""
    settings = make_settings(redis_url)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(store, provider, 3, profile={"rate_limit_per_s": 0.2})
        async with worker_running(settings) as [w]:
            await wait_for(lambda: provider.stats.refreshed == 1, within=5, what="one refresh")
            await wait_for(
                lambda: w.metrics.rate_limited.labels("p")._value.get() >= 2,
                within=5,
                what="two claims handed back",
            )
            now_ms = int(time.time() * 1000)
            waiting = [c for c, g in grants.items() if g.refresh_token not in provider.send_counts]
            assert len(waiting) == 2
            for cid in waiting:
                due = (await store.get(cid)).due_at_ms
                assert due is not None
                assert now_ms + 1000 < due <= now_ms + 5500
            assert [k async for k in store.client.scan_iter(match="*lock:*")] == []


# ------------------------------------------------------- refresh horizon


async def test_refresh_expiry_is_stored_scheduled_and_counted(redis_url: str) -> None:
    """A GitHub-style answer: the refresh token's expiry lands in the record,
    the next refresh comes before it (not at the access token's expiry), and
    the horizon gauge counts the credential in its bucket."""
    from worker.fakeprovider import FakeProviderConfig
    from worker.horizon import Horizon
    from worker.metrics import Metrics

    settings = make_settings(redis_url)
    config = FakeProviderConfig(lifetime_s=30 * 86400, refresh_token_expires_in=3 * 86400)
    async with FakeProvider(config) as provider, open_store(settings) as store:
        await seed(store, provider, 2)
        async with worker_running(settings):
            await wait_for(lambda: provider.stats.refreshed == 2, within=10, what="refreshed")

            async def indexed() -> bool:
                return await store.client.zcard(store.keys.refresh_horizon) == 2

            await wait_for(indexed, within=5, what="the horizon index")
        cred = await store.get("cred-00000")
        now_ms = int(time.time() * 1000)
        assert cred.refresh_expires_at_ms is not None
        assert abs(cred.refresh_expires_at_ms - (now_ms + 3 * DAY_MS)) < 60_000
        assert cred.due_at_ms is not None
        assert cred.due_at_ms < cred.refresh_expires_at_ms < cred.expires_at_ms
        metrics = Metrics()
        await store.delete("cred-00001")
        counts = await Horizon(store, metrics).update()
        assert counts == {"lt_1d": 0, "lt_7d": 1, "lt_30d": 0, "later": 0, "unknown": 0}
        gauge = metrics.refresh_horizon.labels("lt_7d")._value.get()
        assert gauge == 1  # the deleted credential left the index
        assert await store.client.zcard(store.keys.refresh_horizon) == 1


async def test_keep_alive_schedules_the_next_refresh_within_the_interval(redis_url: str) -> None:
    from worker.fakeprovider import FakeProviderConfig

    settings = make_settings(redis_url)
    config = FakeProviderConfig(lifetime_s=30 * 86400)
    async with FakeProvider(config) as provider, open_store(settings) as store:
        await seed(store, provider, 1, profile={"max_refresh_interval_s": 120})
        async with worker_running(settings):
            await wait_for(lambda: provider.stats.refreshed == 1, within=10, what="refreshed")
        cred = await store.get("cred-00000")
        now_ms = int(time.time() * 1000)
        assert cred.due_at_ms is not None
        assert now_ms < cred.due_at_ms <= now_ms + 120_000
        assert cred.expires_at_ms > now_ms + 29 * DAY_MS


# ------------------------------------------------------ per-host connections


class ConcurrencyProvider(FakeProvider):
    """The fake provider, counting requests in progress at once."""

    def __init__(self) -> None:
        from worker.fakeprovider import FakeProviderConfig

        super().__init__(FakeProviderConfig(latency_s=0.2))
        self.now = 0
        self.most = 0

    async def _handle(self, request: Any) -> Any:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            return await super()._handle(request)
        finally:
            self.now -= 1


@pytest.mark.parametrize(("cap", "most"), [(2, 2), (0, 8)])
async def test_max_connections_per_host_caps_one_provider(cap: int, most: int) -> None:
    from multidict import CIMultiDict

    from worker.transport import TokenRequest, make_http_client, send

    async with ConcurrencyProvider() as provider, make_http_client(max_per_host=cap) as http:
        request = TokenRequest(
            "POST", provider.url, CIMultiDict(), b"grant_type=x", allow_private_network=True
        )
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(lambda: send(http, request, timeout_s=5))
    assert provider.most == most


def test_settings_default_per_host_cap() -> None:
    assert Settings().max_connections_per_host == 100
    with pytest.raises(ConfigError, match="REFRESHD_MAX_CONNECTIONS_PER_HOST"):
        Settings(max_connections_per_host=-1)
