"""When to refresh and when to retry: worker/scheduling.py, pure functions
driven by a seeded random source, so every run draws the same numbers."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from worker.scheduling import Schedule, parse_retry_after

NOW_MS = 1_700_000_000_000
DEFAULT = Schedule()  # lead: min 60 s, 20 %, cap 1800 s; jitter 10 %; backoff 1 s .. 300 s


def draws(seed: int = 7) -> random.Random:
    return random.Random(seed)


# ---------------------------------------------------------------- lead


@pytest.mark.parametrize(
    ("lifetime_s", "lead_s", "rule"),
    [
        (200, 60, "the fixed minimum wins over 20 % of a short lifetime"),
        (3600, 720, "20 % of the lifetime once that exceeds the minimum"),
        (86_400, 1800, "capped at lead_max_s"),
        (100, 50, "never more than half the lifetime, even below the minimum"),
        (30, 15, "a 30 s token is refreshed after 15 s, not on arrival"),
        (0, 0, "an expired token has no lead left"),
    ],
)
def test_default_lead(lifetime_s: float, lead_s: float, rule: str) -> None:
    assert DEFAULT.lead_s(lifetime_s) == pytest.approx(lead_s), rule


def test_profile_lead_replaces_the_default_rule() -> None:
    assert DEFAULT.lead_s(3600, profile_lead_s=300) == 300
    # larger than the default cap is the profile's call
    assert DEFAULT.lead_s(86_400, profile_lead_s=7200) == 7200


def test_profile_lead_longer_than_the_lifetime_still_leaves_a_tenth() -> None:
    assert DEFAULT.lead_s(100, profile_lead_s=500) == pytest.approx(90)


def test_lead_settings_are_honoured() -> None:
    schedule = Schedule(lead_min_s=10, lead_fraction=0.5, lead_max_s=100)
    assert schedule.lead_s(15) == pytest.approx(7.5)  # half the lifetime
    assert schedule.lead_s(60) == pytest.approx(30)  # fraction
    assert schedule.lead_s(1000) == pytest.approx(100)  # cap


# ------------------------------------------------------------- next due


def test_jitter_only_moves_the_refresh_earlier() -> None:
    expires = NOW_MS + 3_600_000
    lead_ms = 720_000
    rng = draws()
    dues = [DEFAULT.next_due_ms(now_ms=NOW_MS, expires_at_ms=expires, rng=rng) for _ in range(500)]
    latest = expires - lead_ms
    earliest = expires - int(lead_ms * 1.1)
    assert all(earliest <= due <= latest for due in dues)
    # the jitter is real: the draws cover most of the 72 s window
    assert max(dues) - min(dues) > 0.8 * lead_ms * 0.1


def test_tokens_issued_together_come_due_at_different_times() -> None:
    expires = NOW_MS + 3_600_000
    rng = draws(3)
    dues = {DEFAULT.next_due_ms(now_ms=NOW_MS, expires_at_ms=expires, rng=rng) for _ in range(100)}
    assert len(dues) > 95


def test_the_same_seed_gives_the_same_schedule() -> None:
    expires = NOW_MS + 3_600_000
    first = DEFAULT.next_due_ms(now_ms=NOW_MS, expires_at_ms=expires, rng=draws(11))
    again = DEFAULT.next_due_ms(now_ms=NOW_MS, expires_at_ms=expires, rng=draws(11))
    assert first == again


def test_profile_lead_is_used_for_the_due_time() -> None:
    expires = NOW_MS + 3_600_000
    due = DEFAULT.next_due_ms(now_ms=NOW_MS, expires_at_ms=expires, profile_lead_s=600, rng=draws())
    assert expires - 660_000 <= due <= expires - 600_000


@pytest.mark.parametrize("expired_ago_ms", [0, 1, 60_000, 10**9])
def test_an_expired_token_is_due_now(expired_ago_ms: int) -> None:
    due = DEFAULT.next_due_ms(now_ms=NOW_MS, expires_at_ms=NOW_MS - expired_ago_ms, rng=draws())
    assert due == NOW_MS


def test_a_short_lived_token_is_never_due_in_the_past() -> None:
    rng = draws()
    for lifetime_ms in (1, 500, 2_000, 30_000):
        due = DEFAULT.next_due_ms(now_ms=NOW_MS, expires_at_ms=NOW_MS + lifetime_ms, rng=rng)
        assert NOW_MS <= due < NOW_MS + lifetime_ms


# ------------------------------------------------------------- backoff


def retry_delays(
    schedule: Schedule,
    *,
    failures: int,
    expires_at_ms: int = NOW_MS - 1,  # already expired: no clamp
    retry_after_s: float | None = None,
    n: int = 300,
) -> list[int]:
    rng = draws(failures)
    return [
        schedule.retry_due_ms(
            now_ms=NOW_MS,
            failures=failures,
            expires_at_ms=expires_at_ms,
            retry_after_s=retry_after_s,
            rng=rng,
        )
        - NOW_MS
        for _ in range(n)
    ]


@pytest.mark.parametrize("failures", range(1, 13))
def test_backoff_is_full_jitter_within_a_growing_capped_bound(failures: int) -> None:
    bound_ms = min(300.0, 2.0 ** (failures - 1)) * 1000
    delays = retry_delays(DEFAULT, failures=failures)
    assert all(50 <= d <= bound_ms for d in delays)
    # full jitter: the draws reach both ends of [0, bound]
    assert max(delays) > 0.9 * bound_ms
    assert min(delays) < max(0.1 * bound_ms, 50)


def test_backoff_bound_doubles_until_the_cap() -> None:
    tops = [max(retry_delays(DEFAULT, failures=f)) for f in range(1, 12)]
    assert tops[:8] == sorted(tops[:8])  # 1, 2, 4 ... 128 s
    assert all(t <= 300_000 for t in tops)
    assert tops[-1] > 250_000  # 2**10 s capped at 300 s


def test_zero_failures_backs_off_like_the_first() -> None:
    assert all(50 <= d <= 1000 for d in retry_delays(DEFAULT, failures=0))


def test_backoff_settings_are_honoured() -> None:
    schedule = Schedule(backoff_base_s=0.2, backoff_max_s=1.0)
    assert all(d <= 200 for d in retry_delays(schedule, failures=1))
    assert all(d <= 1000 for d in retry_delays(schedule, failures=8))


def test_backoff_never_lands_past_the_expiry_of_a_valid_token() -> None:
    expires = NOW_MS + 10_000
    delays = retry_delays(DEFAULT, failures=12, expires_at_ms=expires)
    assert all(NOW_MS + d <= expires - 1000 for d in delays)
    assert max(delays) == 9000  # most draws exceed the time left and are clamped


def test_retry_after_is_a_floor() -> None:
    delays = retry_delays(DEFAULT, failures=1, retry_after_s=5)
    assert set(delays) == {5000}


def test_retry_after_never_lands_past_the_expiry_of_a_valid_token() -> None:
    """Issue 10: a Retry-After of a day scheduled the retry a day past the
    token's expiry; the README promises never past expiry."""
    expires = NOW_MS + 10_000
    for retry_after_s in (60.0, 86_400.0):
        delays = retry_delays(
            DEFAULT, failures=3, expires_at_ms=expires, retry_after_s=retry_after_s
        )
        assert set(delays) == {expires - 1000 - NOW_MS}


def test_retry_after_below_the_expiry_is_still_a_floor() -> None:
    delays = retry_delays(DEFAULT, failures=1, expires_at_ms=NOW_MS + 3_600_000, retry_after_s=30)
    assert set(delays) == {30_000}


def test_retry_after_is_honoured_in_full_once_the_token_has_expired() -> None:
    delays = retry_delays(DEFAULT, failures=3, expires_at_ms=NOW_MS - 1, retry_after_s=86_400)
    assert set(delays) == {86_400_000}


def test_a_retry_is_never_scheduled_sooner_than_50_ms() -> None:
    delays = retry_delays(DEFAULT, failures=1, expires_at_ms=NOW_MS + 1001)
    assert set(delays) == {50}


def test_backoff_survives_a_long_outage() -> None:
    # ~2 days of 5xx at a mean 150 s delay: the failure counter is never reset
    delays = retry_delays(DEFAULT, failures=1100, n=10)
    assert all(50 <= d <= 300_000 for d in delays)


# ---------------------------------------------------------- Retry-After

NOW_S = 1_700_000_000.0


def http_date(at_s: float) -> str:
    return format_datetime(datetime.fromtimestamp(at_s, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("120", 120.0), (" 7 ", 7.0), ("0", 0.0), ("999999999", 86_400.0)],
)
def test_retry_after_delta_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now_s=NOW_S) == seconds


def test_retry_after_http_date_is_counted_from_now() -> None:
    assert parse_retry_after(http_date(NOW_S + 90), now_s=NOW_S) == pytest.approx(90.0)


def test_retry_after_date_in_the_past_means_now() -> None:
    assert parse_retry_after(http_date(NOW_S - 3600), now_s=NOW_S) == 0.0


def test_retry_after_far_future_date_is_capped_at_a_day() -> None:
    assert parse_retry_after(http_date(NOW_S + 10 * 86_400), now_s=NOW_S) == 86_400.0


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "-5", "1.5", "12abc", "Wed, 32 Oct 2015 07:28:00 GMT"],
)
def test_retry_after_garbage_is_ignored(value: str | None) -> None:
    assert parse_retry_after(value, now_s=NOW_S) is None


@pytest.mark.parametrize(
    "value",
    ["Wed, 21 Oct 2015 07:28:00 -0000", "Wed, 21 Oct 2015 07:28:00"],
    ids=["unknown-zone", "no-zone"],
)
def test_retry_after_date_without_a_timezone_is_ignored(value: str) -> None:
    assert parse_retry_after(value, now_s=NOW_S) is None


def test_retry_after_with_a_superscript_digit_is_ignored() -> None:
    assert parse_retry_after("\u00b2", now_s=NOW_S) is None
