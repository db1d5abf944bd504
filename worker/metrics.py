"""Every Prometheus metric refreshd exports, defined once.

Labels are bounded: ``profile`` (operator-defined, a handful), ``outcome``
and ``reason`` (fixed vocabularies in ``worker.refresher``), HTTP status
classes. Never a credential id. A fresh ``Metrics`` gets its own registry so
tests and several in-process workers do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.refreshes = Counter(
            "refreshd_refreshes_total",
            "Refresh attempts by outcome (refreshed, retry, needs_reauth, quarantined) and reason.",
            ["profile", "outcome", "reason"],
            registry=r,
        )
        self.refresh_duration = Histogram(
            "refreshd_refresh_duration_seconds",
            "Time from spend to provider answer, by profile.",
            ["profile"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.schedule_lag = Histogram(
            "refreshd_schedule_lag_seconds",
            "Refresh start minus due time: how late the scheduler picked work up.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.provider_responses = Counter(
            "refreshd_provider_responses_total",
            "Token endpoint answers by HTTP status class (2xx, 4xx, 5xx, none).",
            ["profile", "status_class"],
            registry=r,
        )
        self.backlog = Gauge(
            "refreshd_backlog",
            "Credentials due now and not yet claimed (ready backlog).",
            registry=r,
        )
        self.backlog_oldest_age = Gauge(
            "refreshd_backlog_oldest_age_seconds",
            "How long the oldest credential in the ready backlog has been due (0 when empty).",
            registry=r,
        )
        self.scheduled = Gauge(
            "refreshd_scheduled_credentials",
            "Credentials with a scheduled refresh.",
            registry=r,
        )
        self.in_flight = Gauge(
            "refreshd_in_flight",
            "Refreshes claimed by this process and not yet committed.",
            registry=r,
        )
        self.claimed = Counter(
            "refreshd_claimed_total", "Credentials claimed by this process.", registry=r
        )
        self.lock_contention = Counter(
            "refreshd_lock_contention_total",
            "Due credentials skipped at claim because another worker held them.",
            registry=r,
        )
        self.lease_lost = Counter(
            "refreshd_lease_lost_total",
            "Claims lost before the spend, or commits that landed after the lease "
            "lapsed (a correctness alarm when it grows).",
            ["stage"],
            registry=r,
        )
        self.expired_before_refresh = Counter(
            "refreshd_expired_before_refresh_total",
            "Refreshes that started after the access token had already expired.",
            registry=r,
        )
        self.commit_failures = Counter(
            "refreshd_commit_failures_total",
            "Commits that could not be written (Redis unavailable, not durable, stale).",
            ["reason"],
            registry=r,
        )
        self.heartbeat = Gauge(
            "refreshd_heartbeat_timestamp_seconds",
            "Unix time of the event loop's last heartbeat.",
            registry=r,
        )
        self.draining = Gauge(
            "refreshd_draining", "1 while the process drains after SIGTERM.", registry=r
        )
        self.redis_up = Gauge(
            "refreshd_redis_up", "1 when the last Redis call succeeded.", registry=r
        )
        # odd provider answers are stored with fallbacks, and counted
        self.answer_warnings = Counter(
            "refreshd_answer_warnings_total",
            "Provider answers stored with a fallback for an odd field, by warning "
            "(a fixed vocabulary: worker/answer_fields.py).",
            ["profile", "warning"],
            registry=r,
        )
        self.redis_unsafe = Gauge(
            "refreshd_redis_unsafe",
            "1 while the last check of the Redis server found this hazard (not_durable, "
            "no_waitaof, eviction, policy_unknown); accepted=true when REFRESHD_UNSAFE_REDIS "
            "names it. Re-checked every few seconds: CONFIG SET can change it at runtime.",
            ["hazard", "accepted"],
            registry=r,
        )
        # commits Redis could not take (worker.refresher, worker.spool)
        self.commits_pending = Gauge(
            "refreshd_commits_pending",
            "Commits held in memory because Redis could not take them; retried until "
            "they land (new tokens a provider issued are among them).",
            registry=r,
        )
        self.commit_retries = Counter(
            "refreshd_commit_retries_total",
            "Attempts to write a pending commit again after Redis was unreachable.",
            registry=r,
        )
        self.spool_writes = Counter(
            "refreshd_spool_writes_total",
            "Pending commits written to the local spool (REFRESHD_SPOOL_DIR), by result "
            "(written, failed).",
            ["result"],
            registry=r,
        )
        self.spool_replays = Counter(
            "refreshd_spool_replays_total",
            "Spooled commits replayed at start, by result (landed, already_landed, "
            "superseded, refused, not_durable, unreadable).",
            ["result"],
            registry=r,
        )
        # cluster-wide rate limits (worker.ratelimit)
        self.rate_limited = Counter(
            "refreshd_rate_limited_total",
            "Claims handed back because the profile's cluster-wide rate limit had no "
            "room within the longest wait, by profile.",
            ["profile"],
            registry=r,
        )
        self.refresh_horizon = Gauge(
            "refreshd_credentials_by_refresh_horizon",
            "Active credentials by time left until their refresh token expires "
            "(lt_1d, lt_7d, lt_30d, later; unknown: the provider did not say).",
            ["horizon"],
            registry=r,
        )
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        ProcessCollector(registry=r)
