"""One refresh, start to finish: rule check, spend, request, commit.

Outcomes (metric label ``outcome``): ``refreshed``; ``retry`` (backoff,
the grant was not used or may be retried); ``needs_reauth`` (the provider
refused: stop and tell consumers); ``quarantined`` (a request may have been
answered with tokens we never saw, and sending the same refresh token again
could revoke the grant: stop and tell consumers, never guess); ``skipped``
(the claim was lost before anything was sent).

Two failures stop retrying on their own: a certificate the token host's
TLS does not pass (``tls_error``) once the streak of failures it ends
reaches ``TLS_ATTEMPTS`` (a configuration problem: retrying forever helps
nobody), and any streak
of retryable failures older than the profile's ``give_up_after_s``
(reason ``gave_up``), counted from the streak's first failure
(``failing_since``).

The unknown-outcome rule: a refresh token whose request went unanswered
may be sent again only when the profile says the provider does not rotate,
or inside its reuse grace window counted from the first unanswered send.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import anyio

from worker.answers import TokenSet, read_answer
from worker.clusterrate import ClusterRate
from worker.errors import (
    Ambiguous,
    ConfigError,
    NotFound,
    NotSent,
    Permanent,
    RefreshFailure,
    SecretUnreadable,
    StoreUnavailable,
    Transient,
)
from worker.events import EventSecrets, EventType, build_event
from worker.horizon import record_refresh_expiry
from worker.landing import plan_landing
from worker.logs import debug_enabled, fingerprint, get_logger
from worker.metrics import Metrics
from worker.models import Claimed, Profile, Rotation
from worker.profiles import ProfileCache
from worker.ratelimit import ProfileLimits, RateLimited
from worker.scheduling import Schedule
from worker.spool import PendingCommit, Spool, SpoolError
from worker.store import CommitResult, Outcome, Store
from worker.strategies import build_request
from worker.tlstrust import trust_context
from worker.transport import TokenRequest, send

__all__ = ["TLS_ATTEMPTS", "RefreshTiming", "Refresher", "blind_retry_allowed"]

#: consecutive ``tls_error`` failures before the credential stops (needs_reauth)
TLS_ATTEMPTS = 3

log = get_logger("refreshd.refresh")


_CLASS = {n: f"{n}xx" for n in range(10)}  # status // 100 -> label


def _now_ms() -> int:
    return int(time.time() * 1000)


def blind_retry_allowed(profile: Profile, *, first_send_ms: int, now_ms: int) -> bool:
    """May a refresh token whose earlier request went unanswered be sent
    again? Only if the provider does not rotate, or if a new request can
    finish inside the reuse grace window of the first send."""
    if profile.rotation is Rotation.NEVER:
        return True
    grace_ms = profile.reuse_grace_s * 1000
    return grace_ms > 0 and now_ms + profile.timeout_s * 1000 < first_send_ms + grace_ms


def _gave_up(c: Claimed, profile: Profile, now_ms: int) -> bool:
    """Has this streak of retryable failures outlived ``give_up_after_s``?"""
    since = c.failing_since_ms
    limit_ms = profile.give_up_after_s * 1000
    return limit_ms > 0 and c.failures > 0 and since is not None and now_ms - since >= limit_ms


@dataclass(frozen=True, slots=True)
class RefreshTiming:
    lease_ms: int
    margin_ms: int
    #: longest wait between two attempts of a commit Redis could not take
    commit_retry_max_delay_s: float = 2.0
    #: at most one ``commit.retry_round`` summary per this many seconds
    commit_round_log_s: float = 30.0
    #: longest wait for a rate-limit slot before the claim goes back
    rate_wait_max_s: float = 10.0


class Refresher:
    def __init__(
        self,
        *,
        store: Store,
        profiles: ProfileCache,
        http: aiohttp.ClientSession,
        schedule: Schedule,
        metrics: Metrics,
        timing: RefreshTiming,
        on_scheduled: Callable[[int], None] | None = None,
        spool: Spool | None = None,
        ca_file: str = "",
        event_secrets: EventSecrets | None = None,
    ) -> None:
        self.store = store
        self.profiles = profiles
        self.http = http
        self.schedule = schedule
        self.metrics = metrics
        self.timing = timing
        self.on_scheduled = on_scheduled
        self.limits = ProfileLimits(
            ClusterRate(store.client, store.keys), max_wait_s=timing.rate_wait_max_s
        )
        #: REFRESHD_CA_FILE: added to each profile's own CA (``worker.tlstrust``)
        self.ca_file = ca_file
        #: REFRESHD_EVENT_SECRETS: how events carry the new access token
        self.event_secrets = event_secrets or EventSecrets()
        self.draining = False
        self._waiting: set[anyio.CancelScope] = set()
        #: called with each refresh's schedule lag in seconds (demo, benchmarks)
        self.on_lag: Callable[[float], None] | None = None
        self._in_flight = 0
        metrics.in_flight.set_function(lambda: self._in_flight)  # read at scrape time
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        #: where commits Redis could not take are kept across a stop (None: memory only)
        self.spool = spool
        self._pending: dict[object, PendingCommit] = {}
        self._giving_up = False
        self._nudge: anyio.Event | None = None  # wakes the retries (created when needed)
        self._last_round_log = 0.0
        metrics.commits_pending.set_function(lambda: len(self._pending))

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: labels() was a few percent
        of the CPU per refresh, and the label sets are few."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    async def refresh(self, c: Claimed, shield: anyio.CancelScope | None = None) -> str:
        """Refresh one claimed credential; returns the outcome label.
        ``shield``: a cancel scope around this call (the worker keeps one
        per consumer) that the refresh raises from its spend to its commit,
        instead of entering a new shielded scope every time (~8 us)."""
        self._in_flight += 1
        try:
            return await self._refresh(c, shield)
        finally:
            self._in_flight -= 1

    async def _refresh(self, c: Claimed, shield: anyio.CancelScope | None = None) -> str:
        now_ms = _now_ms()
        lag_s = max(now_ms - c.due_ms, 0) / 1000
        self.metrics.schedule_lag.observe(lag_s)
        if self.on_lag is not None:
            self.on_lag(lag_s)
        if 0 < c.expires_at_ms < now_ms:
            self.metrics.expired_before_refresh.inc()
        if c.unreadable is not None:
            return await self._stop_unreadable(c, c.unreadable)
        try:
            profile = await self.profiles.get(c.profile)
        except SecretUnreadable as exc:  # the profile's client secret
            return await self._stop_unreadable(c, exc)
        except NotFound:
            failure = Permanent("profile_missing", f"profile {c.profile!r} does not exist")
            return await self._finish_failure(c, None, failure, "needs_reauth", spent=False)
        except ConfigError as exc:
            # stored by an earlier release, refused by today's rules (a
            # private token host, say): the operator must fix the profile
            broken = Permanent("config_error", str(exc))
            return await self._finish_failure(c, None, broken, "needs_reauth", spent=False)
        if c.ambiguous_at_ms is not None and not blind_retry_allowed(
            profile, first_send_ms=c.ambiguous_at_ms, now_ms=now_ms
        ):
            unknown = Ambiguous("unknown_outcome", "an earlier request was never answered")
            return await self._finish_failure(c, profile, unknown, "quarantined", spent=False)
        try:
            request = build_request(
                profile, secret=c.refresh_token, granted_scope=c.original_scope, params=c.params
            )
        except Permanent as refused:
            return await self._finish_failure(c, profile, refused, "needs_reauth", spent=False)
        except ConfigError as exc:
            broken = Permanent("config_error", str(exc))
            return await self._finish_failure(c, profile, broken, "needs_reauth", spent=False)
        if self.limits.unlimited(profile) and not self.draining:
            return await self._spend_and_send(c, profile, request, shield)
        try:
            release = await self._wait_for_slot(profile)
        except RateLimited as limited:  # no room soon: due again when there is
            self._child(self.metrics.rate_limited, c.profile).inc()
            later = _now_ms() + limited.retry_after_ms
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await self.store.commit(c, "release", next_due=later, fields={}, event="")
            if self.on_scheduled is not None:
                self.on_scheduled(later)
            return "released"
        if release is None:  # draining: nothing was spent, hand the claim back
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await self.store.commit(c, "release", next_due="now", fields={}, event="")
            return "released"
        try:
            return await self._spend_and_send(c, profile, request, shield)
        finally:
            release()

    async def _stop_unreadable(self, c: Claimed, exc: SecretUnreadable) -> str:
        """A secret this refresh needs does not decrypt with our key ring:
        send nothing (there is nothing right to send) and stop the
        credential, with the reason, until an operator fixes the ring or
        the record and resumes it. The detail names the record, field and
        key id, never a value."""
        log.error("secret.unreadable", credential_id=c.id, reason=exc.reason, detail=exc.detail)
        stopped = Permanent(exc.reason, exc.detail)
        return await self._finish_failure(c, None, stopped, "quarantined", spent=False)

    async def _wait_for_slot(self, profile: Profile) -> Callable[[], None] | None:
        """The profile's pacing slot, or None if draining began meanwhile."""
        if self.draining:
            return None
        with anyio.CancelScope() as scope:
            self._waiting.add(scope)
            try:
                return await self.limits.acquire(profile)
            finally:
                self._waiting.discard(scope)
        return None

    @property
    def pending_commits(self) -> int:
        """Commits waiting for Redis (the claim loop lets them land first)."""
        return len(self._pending)

    def give_up_pending(self) -> None:
        """The worker is stopping for good: commits still waiting for Redis
        stop retrying (their spool entries are replayed at the next start)."""
        self._giving_up = True
        self.nudge_pending()

    def nudge_pending(self) -> None:
        """Redis answers again: pending commits try now rather than at the
        end of their backoff (the claim loop waits for them)."""
        if self._nudge is not None:
            self._nudge.set()
            self._nudge = None

    def keep_unconfirmed(self, commit_args: list[Sequence[Any]]) -> None:
        """The batcher stops with commits it could not confirm (their
        connection died before the acknowledgement, and Redis has not come
        back): the server may have lost them, so they go to the spool like
        any other pending commit. Runs while the worker shuts down, hence
        synchronously; the next start replays them (one that did land is
        recognised as landed)."""
        for args in commit_args:
            pending = PendingCommit.from_commit_args(args, self.store)
            if pending is None:
                continue
            path = None
            if self.spool is not None:
                try:
                    path = self.spool.write(pending)
                    self.metrics.spool_writes.labels("written").inc()
                except SpoolError as exc:
                    self.metrics.spool_writes.labels("failed").inc()
                    log.error("spool.write_failed", credential_id=pending.credential_id,  # noqa: TRY400
                              error=str(exc))  # fmt: skip
            fp = fingerprint(pending.refresh_token) if pending.refresh_token else None
            (log.warning if path else log.critical)(
                "commit.spooled" if path else "commit.abandoned",
                credential_id=pending.credential_id,
                outcome=pending.outcome,
                refresh_token_fp=fp,
                unconfirmed=True,
            )

    def begin_drain(self) -> None:
        """Refreshes still waiting for a rate-limit slot give their claims back."""
        self.draining = True
        for scope in list(self._waiting):
            scope.cancel()

    async def _spend_and_send(
        self,
        c: Claimed,
        profile: Profile,
        request: TokenRequest,
        shield: anyio.CancelScope | None,
    ) -> str:
        """From the spend on, a refresh runs to its end even through a
        shutdown's drain deadline: its request is bounded by the profile's
        timeout, and cutting it off would leave an open intent that later
        reads as an unknown outcome (quarantine, under strict rotation) for
        a request that may well have been answered. This one shield also
        covers the batched spend and commit calls (``ScriptBatcher.call``).
        A cancellation that arrived meanwhile takes effect when it drops."""
        if shield is None or shield.shield:
            with anyio.CancelScope(shield=True):
                outcome = await self._spend_send_commit(c, profile, request)
            return outcome  # noqa: RET504 (returned inside the scope, mypy sees a path without)
        shield.shield = True
        try:
            return await self._spend_send_commit(c, profile, request)
        finally:
            shield.shield = False

    async def _spend_send_commit(self, c: Claimed, profile: Profile, request: TokenRequest) -> str:
        timeout_ms = int(profile.timeout_s * 1000)
        grace_ms = -1 if profile.rotation is Rotation.NEVER else int(profile.reuse_grace_s * 1000)
        try:
            spend = await self.store.spend(
                c,
                timeout_ms=timeout_ms,
                margin_ms=self.timing.margin_ms,
                rt_hash=fingerprint(c.refresh_token),
                grace_ms=grace_ms,
            )
        except StoreUnavailable:
            # The spend may have been recorded without our hearing it (a
            # failover: the replica has it, the acknowledgement died with the
            # primary). Nothing was sent, so clearing our own intent is safe,
            # and worth retrying while Redis comes back, until the intent's
            # deadline: one left open past it reads as an unknown outcome and
            # quarantines a credential whose refresh token was never sent.
            await self._release_unsent(c, timeout_ms / 1000)
            raise
        if spend.reason == "grace_over":
            unknown = Ambiguous("unknown_outcome", "an earlier request was never answered")
            return await self._finish_failure(c, profile, unknown, "quarantined", spent=False)
        if not spend.ok:
            self.metrics.lease_lost.labels("spend").inc()
            self.metrics.refreshes.labels(c.profile, "skipped", spend.reason).inc()
            log.warning("refresh.skipped", credential_id=c.id, reason=spend.reason)
            return "skipped"

        started = time.monotonic()
        try:
            tokens = await self._exchange(c, profile, request)
        except RefreshFailure as failure:
            if failure.status is None:
                self.metrics.provider_responses.labels(c.profile, "none").inc()
            self.metrics.refresh_duration.labels(c.profile).observe(time.monotonic() - started)
            outcome = self._failure_outcome(profile, failure, c, spend.server_now_ms)
            return await self._finish_failure(
                c, profile, failure, outcome, spent=True, first_send_ms=spend.server_now_ms
            )
        self._child(self.metrics.refresh_duration, c.profile).observe(time.monotonic() - started)
        return await self._finish_success(c, profile, tokens)

    async def _release_unsent(self, c: Claimed, within_s: float) -> None:
        """Clear our spend intent for a request never sent, retrying (shielded)
        for up to ``within_s`` while Redis is unreachable."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(max(within_s, 2.0)):
            while True:
                try:
                    await self.store.commit(c, "release", next_due="now", fields={}, event="")
                except StoreUnavailable:
                    await anyio.sleep(0.25)
                else:
                    return

    async def _exchange(self, c: Claimed, profile: Profile, request: TokenRequest) -> TokenSet:
        try:
            ssl = None  # the common case: the system store, no lookup
            if profile.ca_pem or self.ca_file:
                ssl = trust_context(self.ca_file, profile.ca_pem)
            answer = await send(self.http, request, timeout_s=profile.timeout_s, ssl=ssl)
            status_class = _CLASS[answer.status // 100]
            self._child(self.metrics.provider_responses, c.profile, status_class).inc()
            return read_answer(
                answer, profile, now_ms=_now_ms(), old_secret=c.refresh_token, old_scope=c.scope
            )
        except RefreshFailure:
            raise
        except Exception as exc:
            # The request may have been sent: an answer nobody foresaw (or a
            # bug) must not leave the spend intent open. It is an unknown
            # outcome, and the rotation rule decides what happens next.
            # no traceback: its text can quote the answer, which may hold tokens
            log.error("refresh.unexpected_error", credential_id=c.id, error=type(exc).__name__)  # noqa: TRY400
            raise Ambiguous("internal_error", type(exc).__name__) from exc

    def _failure_outcome(
        self, profile: Profile, failure: RefreshFailure, c: Claimed, sent_ms: int
    ) -> Outcome:
        if failure.reason == "tls_error" and c.failures + 1 >= TLS_ATTEMPTS:
            return "needs_reauth"  # the certificate will not fix itself
        if isinstance(failure, NotSent | Transient):
            return "retry"
        if isinstance(failure, Permanent):
            return "needs_reauth"
        first_send = c.ambiguous_at_ms or sent_ms
        if blind_retry_allowed(profile, first_send_ms=first_send, now_ms=_now_ms()):
            return "retry"
        return "quarantined"

    async def _finish_success(self, c: Claimed, profile: Profile, tokens: TokenSet) -> str:
        now_ms = _now_ms()
        landing = plan_landing(c, profile, tokens, self.schedule, now_ms, self.event_secrets)
        if tokens.warnings:
            for warning in tokens.warnings:
                self._child(self.metrics.answer_warnings, c.profile, warning).inc()
            log.warning("token.answer.fallback", credential_id=c.id, warnings=list(tokens.warnings))
        next_due, fields, event = landing.next_due_ms, landing.fields, landing.event
        result = await self._commit(
            c, "refreshed", next_due, fields, event, tokens, reason=landing.reason
        )
        if result is not None and result.ok:
            if tokens.refresh_expires_at_ms:
                await self._index_refresh_expiry(c.id, tokens.refresh_expires_at_ms)
            label = landing.reason or "ok"
            self._child(self.metrics.refreshes, c.profile, "refreshed", label).inc()
            if debug_enabled():  # a sha256 per refresh otherwise
                log.debug(
                    "token.refresh.succeeded",
                    credential_id=c.id,
                    rotated=tokens.rotated,
                    refresh_token_fp=fingerprint(tokens.refresh_token),
                )
            if self.on_scheduled is not None:
                self.on_scheduled(next_due)
            return "refreshed"
        return "commit_failed"

    async def _index_refresh_expiry(self, credential_id: str, expires_at_ms: int) -> None:
        """For the horizon gauge only: a failure here loses nothing."""
        try:
            await record_refresh_expiry(self.store, credential_id, expires_at_ms)
        except StoreUnavailable:
            log.info("horizon.index_skipped", credential_id=credential_id)

    async def _finish_failure(
        self,
        c: Claimed,
        profile: Profile | None,
        failure: RefreshFailure,
        outcome: Outcome,
        *,
        spent: bool,
        first_send_ms: int | None = None,
    ) -> str:
        now_ms = _now_ms()
        failures = c.failures + 1
        if outcome == "retry" and profile is not None and _gave_up(c, profile, now_ms):
            failure = Permanent("gave_up", f"failing since {c.failing_since_ms} ({failure.reason})")
            outcome = "needs_reauth"
        fields: dict[str, str | int] = {
            "last_error": failure.reason
            + (f" (HTTP {failure.status})" if failure.status is not None else "")
            + (f": {failure.detail}" if failure.reason == "tls_error" else "")
        }
        if c.failures == 0 or c.failing_since_ms is None:
            fields["failing_since"] = now_ms  # the first failure of a streak
        next_due: int | Literal[""] = ""
        kind = {
            "retry": EventType.FAILED,
            "needs_reauth": EventType.NEEDS_REAUTH,
            "quarantined": EventType.QUARANTINED,
        }[outcome]
        if outcome == "retry":
            next_due = self.schedule.retry_due_ms(
                now_ms=now_ms,
                failures=failures,
                expires_at_ms=c.expires_at_ms,
                retry_after_s=failure.retry_after_s,
            )
            if isinstance(failure, Ambiguous) and profile is not None and spent:
                # The same refresh token goes out again: remember when it was
                # first sent, so the grace window is counted from there.
                first = c.ambiguous_at_ms or first_send_ms or now_ms
                fields |= {"ambiguous_token": c.token, "ambiguous_at": first}
                if profile.rotation is not Rotation.NEVER:
                    latest = first + int(profile.reuse_grace_s * 1000)
                    latest -= int(profile.timeout_s * 1000) + 1000
                    next_due = max(min(next_due, latest), now_ms + 50)
        event = build_event(
            kind,
            credential_id=c.id,
            profile=c.profile,
            version=int(c.version),
            ts_ms=now_ms,
            reason=failure.reason,
            failures=failures,
            retry_at_ms=next_due or None,
            detail=failure.detail if failure.reason == "tls_error" else "",
        )
        with anyio.CancelScope(shield=not spent):  # spent: the caller's shield holds
            result = await self._commit(
                c, outcome, next_due, fields, event, None, reason=failure.reason
            )
        if result is not None and result.ok:
            self.metrics.refreshes.labels(c.profile, outcome, failure.reason).inc()
            level = log.warning if outcome == "retry" else log.error
            level(
                f"token.refresh.{outcome}",
                credential_id=c.id,
                reason=failure.reason,
                status=failure.status,
                failures=failures,
                # the certificate problem (never secret); other details may quote answers
                **({"detail": failure.detail} if failure.reason == "tls_error" else {}),
            )
            if outcome == "retry" and next_due and self.on_scheduled is not None:
                self.on_scheduled(next_due)
        return outcome

    async def _commit(
        self,
        c: Claimed,
        outcome: Outcome,
        next_due: int | Literal[""],
        fields: dict[str, str | int],
        event: str,
        tokens: TokenSet | None,
        *,
        reason: str,
    ) -> CommitResult | None:
        """Write the outcome, retrying while Redis is unreachable. Callers
        hold a cancel shield: once the provider has answered, its tokens must
        land even if the process is being shut down (the open spend intent
        keeps every other worker away meanwhile). The first attempt runs
        with nothing armed around it (a timer and a scope on every commit
        were a few percent of the CPU per refresh): only a retry needs them."""

        def attempt(wait_durable: bool = False) -> Awaitable[CommitResult]:
            return self.store.commit(
                c,
                outcome,
                next_due=next_due,
                fields=fields,
                event=event,
                reason=reason,
                wait_durable=wait_durable,
            )

        try:
            result = await attempt()
        except StoreUnavailable:
            self.metrics.commit_failures.labels("unavailable").inc()
            pending = PendingCommit.of(c, outcome, next_due, fields, event, reason)
            retried = await self._commit_retrying(attempt, pending)
            if retried is None:
                return None
            result = retried
        if not result.ok:
            self.metrics.commit_failures.labels(result.reason).inc()
            log.error("commit.rejected", credential_id=c.id, reason=result.reason)
        elif result.lease_lost:
            self.metrics.lease_lost.labels("commit").inc()
            log.warning("commit.after_lease", credential_id=c.id)
        if result.ok and not result.durable:
            self.metrics.commit_failures.labels("not_durable").inc()
            log.warning("commit.not_durable", credential_id=c.id)
        return result

    async def _commit_retrying(
        self, attempt: Callable[[bool], Awaitable[CommitResult]], pending: PendingCommit
    ) -> CommitResult | None:
        """The first commit found Redis away. Its outcome (for a refresh,
        tokens the provider issued and nobody else knows) now lives only
        here: write it to the spool, so a stop or a crash does not lose it,
        then try again with capped backoff for as long as the process lives
        (the caller's shield holds, and the open spend intent keeps every
        other worker away). Only a stopping worker gives up, at the end of
        its drain; the spool entry is replayed at the next start. Returns
        None when it gave up."""
        key = object()
        self._pending[key] = pending
        spooled: Path | None = None
        try:
            spooled = await self._spool_write(pending)
            log.warning(
                "commit.retrying",
                credential_id=pending.credential_id,
                outcome=pending.outcome,
                spooled=spooled is not None,
            )
            delay = 0.05
            while not self._giving_up:
                if self._nudge is None:
                    self._nudge = anyio.Event()
                nudge = self._nudge
                with anyio.move_on_after(delay):
                    await nudge.wait()
                if self._giving_up:
                    break
                delay = min(delay * 2, self.timing.commit_retry_max_delay_s)
                self.metrics.commit_retries.inc()
                try:
                    # durable before the spool entry goes
                    result = await attempt(True)
                    if not result.ok and await pending.landed(self.store):
                        result = CommitResult(True, durable=result.durable)  # its reply was lost
                except StoreUnavailable:
                    self.metrics.commit_failures.labels("unavailable").inc()
                    self._log_retry_round()
                    continue
                await self._spool_settle(spooled, pending, result)
                log.info(
                    "commit.recovered",
                    credential_id=pending.credential_id,
                    ok=result.ok,
                    pending_s=round(time.time() - pending.received_ms / 1000, 1),
                )
                return result
        finally:
            del self._pending[key]
        fp = fingerprint(pending.refresh_token) if pending.refresh_token else None
        if spooled is not None:
            log.warning(
                "commit.spooled",
                credential_id=pending.credential_id,
                outcome=pending.outcome,
                refresh_token_fp=fp,
            )
        else:
            log.critical(
                "commit.abandoned",
                credential_id=pending.credential_id,
                outcome=pending.outcome,
                refresh_token_fp=fp,
            )
        return None

    def _log_retry_round(self) -> None:
        """One summary line per round of retries, not one per attempt."""
        now = time.monotonic()
        if now - self._last_round_log < self.timing.commit_round_log_s:
            return
        self._last_round_log = now
        oldest_ms = min((p.received_ms for p in self._pending.values()), default=_now_ms())
        log.warning(
            "commit.retry_round",
            pending=len(self._pending),
            oldest_s=round((_now_ms() - oldest_ms) / 1000, 1),
            spool=self.spool is not None,
        )

    async def _spool_write(self, pending: PendingCommit) -> Path | None:
        if self.spool is None:
            return None
        try:
            path = await anyio.to_thread.run_sync(self.spool.write, pending)
        except SpoolError as exc:
            self.metrics.spool_writes.labels("failed").inc()
            # an expected condition (disk full, read-only): one line, no traceback
            log.error("spool.write_failed", credential_id=pending.credential_id, error=str(exc))  # noqa: TRY400
            return None
        self.metrics.spool_writes.labels("written").inc()
        return path

    async def _spool_settle(
        self, path: Path | None, pending: PendingCommit, result: CommitResult
    ) -> None:
        """A retried commit got its answer: its spool entry goes once the
        commit is durable; new tokens the store refused are set aside, not
        deleted (they may still be the only valid ones)."""
        if path is None or self.spool is None or (result.ok and not result.durable):
            return  # not durable yet: the next start's replay settles it
        try:
            if result.ok or pending.outcome != "refreshed" or result.reason != "stale":
                await anyio.to_thread.run_sync(self.spool.remove, path)
            else:
                kept = await anyio.to_thread.run_sync(self.spool.set_aside, path)
                log.error("spool.commit_refused", credential_id=pending.credential_id,
                          kept=str(kept))  # fmt: skip
        except OSError as exc:
            log.error("spool.settle_failed", path=str(path), error=type(exc).__name__)  # noqa: TRY400
