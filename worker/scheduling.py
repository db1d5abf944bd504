"""When to refresh next: lead before expiry, jitter, backoff after failures.

Pure functions of their inputs (the random source is injectable), so the
rules are unit-tested without clocks or Redis.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

__all__ = ["EXPIRY_MARGIN_MS", "Schedule", "parse_retry_after"]

#: a retry of a still valid token lands at least this long before its expiry
EXPIRY_MARGIN_MS = 1000


@dataclass(frozen=True, slots=True)
class Schedule:
    lead_min_s: float = 60.0
    lead_fraction: float = 0.2
    lead_max_s: float = 1800.0
    jitter_fraction: float = 0.1
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0

    def lead_s(self, lifetime_s: float, profile_lead_s: float = 0.0) -> float:
        """How long before expiry to refresh. The default is the larger of a
        fixed minimum and a fraction of the lifetime, capped, and never more
        than half the lifetime (a 30 s token would otherwise be refreshed
        the moment it arrives, forever)."""
        if profile_lead_s > 0:
            return min(profile_lead_s, lifetime_s * 0.9)
        lead = min(max(self.lead_min_s, self.lead_fraction * lifetime_s), self.lead_max_s)
        return min(lead, lifetime_s / 2)

    def next_due_ms(
        self,
        *,
        now_ms: int,
        expires_at_ms: int,
        profile_lead_s: float = 0.0,
        rng: random.Random | None = None,
        max_interval_s: float = 0.0,
        refresh_expires_at_ms: int | None = None,
    ) -> int:
        """Due time for a token expiring at ``expires_at_ms``. Jitter only
        moves the refresh earlier, so tokens issued together spread out
        without any of them getting closer to expiry.

        Two more bounds apply when given. Keep-alive: never later than
        ``max_interval_s`` from now, for providers that revoke refresh
        tokens left unused (Google after 6 months, Xero 30 days, Intuit 100
        days). Refresh-token expiry: before ``refresh_expires_at_ms`` by the
        usual lead computed on the refresh token's lifetime, so that a
        rotating provider's new refresh token arrives while the old one
        still works. Once that point has passed (an absolute expiry that
        refreshing does not move, as Spotify's), it no longer pulls the
        refresh earlier: that would refresh in a loop."""
        lifetime_s = max((expires_at_ms - now_ms) / 1000, 0.0)
        lead = self.lead_s(lifetime_s, profile_lead_s)
        jitter = (rng or random).uniform(0, self.jitter_fraction * lead)
        due = max(now_ms, int(expires_at_ms - (lead + jitter) * 1000))
        if max_interval_s > 0:
            due = min(due, now_ms + int(max_interval_s * 1000))
        if refresh_expires_at_ms is not None:
            rt_life_s = (refresh_expires_at_ms - now_ms) / 1000
            # the lead without lead_s's half-lifetime cap: a refresh token
            # close to its end pulls at most one refresh, not a converging series
            rt_lead = min(max(self.lead_min_s, self.lead_fraction * rt_life_s), self.lead_max_s)
            rt_due = int(refresh_expires_at_ms - rt_lead * 1000)
            if rt_due > now_ms:
                due = min(due, rt_due)
        return due

    def retry_due_ms(
        self,
        *,
        now_ms: int,
        failures: int,
        expires_at_ms: int,
        retry_after_s: float | None = None,
        rng: random.Random | None = None,
    ) -> int:
        """Exponential backoff with full jitter after ``failures`` failures
        (1 = first). ``Retry-After`` is a floor, except that while the
        access token is still valid no retry lands past its expiry (less
        ``EXPIRY_MARGIN_MS``): a retry before expiry can still keep the
        integration up, and an early one risks no more than one more
        refusal, whereas waiting past expiry is a certain outage. Once the
        token has expired, Retry-After is honoured in full."""
        exponent = min(max(failures - 1, 0), 30)  # days of failures must not overflow
        bound = min(self.backoff_max_s, self.backoff_base_s * 2**exponent)
        delay = (rng or random).uniform(0, bound)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        latest = expires_at_ms - EXPIRY_MARGIN_MS
        if latest > now_ms:
            delay = min(delay, (latest - now_ms) / 1000)
        return now_ms + max(int(delay * 1000), 50)


def parse_retry_after(value: str | None, *, now_s: float) -> float | None:
    """RFC 9110 §10.2.3: delta-seconds or an HTTP-date. Garbage yields None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), 86400.0)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(when.timestamp() - now_s, 0.0), 86400.0)
