"""The async client: read tokens, ask for a fresh one, hand over new grants.

A consumer needs three things from refreshd, and none of its internals:

- ``get(id)``: the current access token (never the refresh token), one
  script call (``worker/scripts/token.lua``), or none at all when the
  in-process cache holds it (``worker.client.cache``, kept current by
  Redis's invalidations through ``worker.client.tracking``);
- ``get(id, min_ttl=s)``: a token valid for at least ``s`` seconds. When
  the stored one expires sooner, the client makes the credential due now
  (only ever earlier), wakes the workers, and waits for the commit. It
  never refreshes by itself: the claim/spend/commit path of the workers is
  the only one that sends a refresh token, so any number of callers in any
  number of processes cause one provider request;
- ``put(credential)`` / ``delete(id)``: what an application does after a
  user's consent (or its withdrawal), validated as ``credential import``
  validates a line;
- ``events(since=...)``: the durable event log, typed, from a cursor or
  shared in a consumer group (``worker.client.events``).

Nothing here imports the refresher, the runner or the HTTP transport.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from worker.client.cache import CacheStats, TokenCache
from worker.client.errors import (
    ClientConfigError,
    ClientError,
    CredentialConflict,
    CredentialNotFound,
    CredentialUnreadable,
    Disabled,
    InvalidCredential,
    MinTtlUnreachable,
    NeedsReauthorization,
    NoWorkerRunning,
    Quarantined,
    RefreshFailed,
    RefreshTimeout,
    StoreUnreachable,
    TokenUnavailable,
)
from worker.client.events import AckMode, EventStream, Since
from worker.client.listing import CredentialInfo, CredentialList
from worker.client.token import AccessToken, RecordView, parse_view
from worker.client.tracking import LinkDown, TrackingLink
from worker.client.waiting import EventWatch
from worker.cluster import CLUSTER_SCHEMES
from worker.codec import SecretCodec
from worker.embedded import ensure_embedded
from worker.errors import ConfigError, Conflict, NotFound, SecretUnreadable, StoreUnavailable
from worker.eventlog import EventLog
from worker.keyring import codec_from_settings
from worker.keys import Keyspace
from worker.listing import CredentialFilter, list_credentials
from worker.logs import get_logger
from worker.models import CredentialInput, Status
from worker.profiles import ProfileStore
from worker.redisio import connect as connect_redis
from worker.redisio import guard, load_script, pack_evalsha
from worker.scheduling import Schedule
from worker.serverchecks import check_hazards, find_hazards, inspect_server
from worker.settings import Settings
from worker.store import RECORD_FORMAT, Store

__all__ = ["DEFAULT_TIMEOUT_S", "Client", "connect"]

log = get_logger("refreshd.client")

#: how long ``get(id, min_ttl=...)`` waits for a refresh unless told otherwise
DEFAULT_TIMEOUT_S = 10.0


@asynccontextmanager
async def connect(
    settings: Settings | None = None,
    *,
    codec: SecretCodec | None = None,
    pool_size: int = 32,
    poll_interval: float = 0.5,
) -> AsyncIterator[Client]:
    """A client configured like every ``refreshd`` command: ``REFRESHD_*``
    from the environment unless ``settings`` is given (the Redis URL, the
    key prefix and partitions; with no URL, the local embedded server).
    One per process is enough: calls share its connection pool and its
    events subscription. ``poll_interval`` bounds how long a waiting call
    goes without re-reading the record (the safety net under pub/sub).
    ``REFRESHD_CLIENT_CACHE`` sizes the token cache (0: off; always off on
    a Redis Cluster)."""
    try:
        settings = settings or Settings.from_env()
        codec = codec or codec_from_settings(settings)
        url = settings.redis_url
        if not url:  # the embedded server, as for every refreshd command
            server = await anyio.to_thread.run_sync(ensure_embedded, settings.data_dir)
            log.debug("redis.embedded", data_dir=str(settings.data_dir), started=server.started)
            url = server.url
    except ConfigError as exc:
        raise ClientConfigError(str(exc)) from exc
    except StoreUnavailable as exc:
        raise StoreUnreachable(str(exc)) from exc
    keys = Keyspace(settings.prefix, settings.partitions)
    async with connect_redis(url, max_connections=pool_size) as redis:
        watch = EventWatch(redis, keys)
        link = None
        if settings.client_cache and not url.lower().startswith(CLUSTER_SCHEMES):
            link = TrackingLink(redis, TokenCache(settings.client_cache))
        client = Client(redis, keys, codec, settings, watch,
                        poll_interval=poll_interval, link=link)  # fmt: skip
        await client._check_layout()
        async with anyio.create_task_group() as tg:
            await tg.start(watch.run)
            if link is not None:
                await tg.start(link.run)
            try:
                yield client
            finally:
                tg.cancel_scope.cancel()


class Client:
    """Use through ``connect()``. Every method is safe to call from many
    tasks at once; errors are the ``worker.client.errors`` tree."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keyspace,
        codec: SecretCodec,
        settings: Settings,
        watch: EventWatch,
        *,
        poll_interval: float = 0.5,
        link: TrackingLink | None = None,
    ) -> None:
        self._redis = redis
        self._link = link
        self._cache = link.cache if link is not None else None
        self._keys = keys
        self._codec = codec
        self._settings = settings
        self._watch = watch
        self._poll_s = poll_interval
        self._token_script = load_script(redis, "token")
        self._store = Store(redis, keys, codec)  # put/delete go through its scripts
        self._write_checked = False
        self._log = EventLog(redis, keys)

    # ------------------------------------------------------------ reading

    async def get(
        self,
        credential_id: str,
        *,
        min_ttl: float | None = 0.0,
        timeout: float = DEFAULT_TIMEOUT_S,  # noqa: ASYNC109 - a deadline for the whole call
    ) -> AccessToken:
        """The credential's access token, valid for more than ``min_ttl``
        seconds (0: not yet expired; None: whatever is stored, no wait).

        When the stored token expires sooner, ask for a refresh and wait up
        to ``timeout`` seconds for its commit, then return the new token.
        Errors (all ``ClientError``):

        - ``CredentialNotFound``;
        - ``NeedsReauthorization``, ``Quarantined``, ``Disabled``: the
          credential is stopped, whatever ``min_ttl`` says;
        - ``RefreshFailed``: the refresh failed, or the credential is in
          backoff and its next attempt comes after ``timeout``. The client
          never moves a backoff earlier (that would hammer a provider that
          said "later"). ``exc.current`` is the stored token if it has not
          expired: a caller that prefers a short-lived token to none uses it;
        - ``MinTtlUnreachable``: the provider's tokens live shorter than
          ``min_ttl`` (``exc.current`` as above);
        - ``RefreshTimeout`` (``NoWorkerRunning`` when no worker heard the
          request): nothing committed in time. The request stays: the
          credential is due now, and a worker refreshes it when it can.
        """
        cached = self._cached(credential_id)
        if cached is not None:
            token = _usable(cached)
            if min_ttl is None or cached.valid_for(min_ttl):
                return token
        view = await self._read_through(credential_id)
        token = _usable(view)
        if min_ttl is None or view.valid_for(min_ttl):
            return token
        _check_reachable(view, min_ttl)
        return await self._refreshed(credential_id, view, min_ttl, timeout)

    async def _refreshed(
        self, credential_id: str, view: RecordView, min_ttl: float, timeout_s: float
    ) -> AccessToken:
        deadline = anyio.current_time() + timeout_s
        seen, failures = view.token.version, view.failures
        heard, taken = 0, False
        within = min(timeout_s, 1.0)
        async with self._watch.watching(credential_id, within=within) as waiter:
            while True:
                # each pass re-reads and, while the version is unchanged,
                # renews the request (a wake-up lost by a worker that was
                # reconnecting is sent again)
                view = await self._view(credential_id, seen=seen)
                left = deadline - anyio.current_time()
                if view.action == "moved":
                    token = _usable(view)
                    if view.valid_for(min_ttl):
                        return token
                    _check_reachable(view, min_ttl)
                    # a put with another short-lived token: ask again, at once
                    seen, failures = view.token.version, view.failures
                else:
                    _usable(view)
                    if view.failures > failures:
                        raise _failed(view, "the refresh failed")
                    if view.action == "backoff":
                        retry_in = (view.due_ms or 0) / 1000 - time.time()
                        if retry_in > left:
                            raise _failed(view, f"in backoff; next attempt in {retry_in:.1f}s")
                    elif view.action == "in_flight":
                        taken = True
                    elif view.action == "asked":
                        heard = view.receivers
                if left <= 0:
                    raise _timed_out(credential_id, timeout_s, heard=heard, taken=taken)
                if view.action != "moved":
                    await waiter.wait(min(self._poll_s, left))

    def cache_stats(self) -> CacheStats | None:
        """The token cache's counters (hits, misses, invalidations, ...);
        None when the cache is off (``REFRESHD_CLIENT_CACHE=0``, a Redis
        Cluster, or a Redis user that may not run CLIENT TRACKING)."""
        if self._cache is None or self._link is None or not self._link.enabled:
            return None
        return self._cache.stats(serving=self._link.can_serve())

    def _cached(self, credential_id: str) -> RecordView | None:
        """The cached view, only while an invalidation channel protects it."""
        cache, link = self._cache, self._link
        if cache is None or link is None:
            return None
        if not link.can_serve():
            cache.bypassed += 1
            return None
        return cache.lookup(self._keys.partition_of(credential_id).cred(credential_id))

    async def _read_through(self, credential_id: str) -> RecordView:
        """A plain read that fills the cache: through the tracking
        connection (token.lua's "cache" mode, which leaves the due set
        alone), stored unless invalidated meanwhile. When the link is down
        (or the script must be loaded again), the ordinary read."""
        cache, link = self._cache, self._link
        if cache is None or link is None or not link.up:
            return await self._view(credential_id)
        part = self._keys.partition_of(credential_id)
        key = part.cred(credential_id)
        command = pack_evalsha(self._token_script.sha, [key, part.due, part.lock(credential_id)],
                               [credential_id, "", self._keys.wake, "cache"])  # fmt: skip
        ticket = cache.begin(key)
        try:
            try:
                reply = await link.read(command)
            except NoScriptError:  # a new or restarted server: load it, once
                await guard(self._redis.script_load(self._token_script.script))
                reply = await link.read(command)
            view = self._parsed(credential_id, reply)
            cache.finish(ticket, view)
            return view
        except (LinkDown, ResponseError, StoreUnavailable):  # the ordinary read says why
            return await self._view(credential_id)
        finally:
            cache.abandon(ticket)  # nothing once finished

    def _saw(self, credential_id: str, version: int) -> None:
        """An event of ``version`` was handed to the application: a cached
        older token (or one being read) must not be returned after it."""
        assert self._cache is not None
        self._cache.saw(self._keys.partition_of(credential_id).cred(credential_id), version)

    def _forget(self, credential_id: str) -> None:
        """This client wrote the credential: its next read goes to Redis."""
        if self._cache is not None:
            self._cache.invalidate(self._keys.partition_of(credential_id).cred(credential_id))

    async def _view(self, credential_id: str, *, seen: int | None = None) -> RecordView:
        part = self._keys.partition_of(credential_id)
        try:
            # one pooled connection on one server; on a cluster, to the
            # partition's primary, redirections followed
            reply = await self._store.run_script(
                self._token_script,
                keys=[part.cred(credential_id), part.due, part.lock(credential_id)],
                args=[credential_id, "" if seen is None else seen, self._keys.wake],
            )
        except (StoreUnavailable, ResponseError) as exc:
            raise _translated(exc) from exc
        view = self._parsed(credential_id, reply)
        if self._cache is not None:  # never a cached token older than one returned already
            self._cache.saw(part.cred(credential_id), view.token.version)
        return view

    def _parsed(self, credential_id: str, reply: Any) -> RecordView:
        if not reply:
            raise CredentialNotFound(credential_id)
        try:
            return parse_view(credential_id, reply, self._store)
        except SecretUnreadable as exc:
            raise CredentialUnreadable(credential_id, exc.reason, exc.detail) from None

    # ------------------------------------------------------------ events

    def events(
        self,
        since: Since = None,
        *,
        group: str | None = None,
        consumer: str | None = None,
        ack: AckMode = "auto",
        count: int = 100,
        block: float = 2.0,
        claim_idle: float = 30.0,
        follow: bool = True,
    ) -> EventStream:
        """The durable event log: ``async for entry in client.events(...)``,
        ``entry.event`` a typed event (``Refreshed``, ``Failed``, ...).

        Plain reads start after ``since``: a cursor (string or ``Cursor``)
        a previous run stored from ``entry.cursor``, ``"start"`` (everything
        retained) or ``"now"``/None (what is committed from the first
        iteration on). With ``group`` and ``consumer``, the group shares the
        events out and each is acknowledged after the loop body that got it
        ran (``ack="auto"``) or by ``stream.ack(entry)`` (``"manual"``); a
        crashed member's unacknowledged events are delivered again (its own
        first when it restarts under the same name, else to another member
        after ``claim_idle`` seconds); ``since`` then only says where a new
        group starts. ``follow=False`` ends when the log is caught up;
        otherwise each read waits up to ``block`` seconds for new events.

        Errors: ``EventsTrimmed`` (events lost to retention before they
        were read; ``resume``), ``CursorError``, ``StoreUnreachable``, and
        ``ClientConfigError`` when the log is off (``REFRESHD_EVENT_LOG``)
        or the Redis user may not read it."""
        if not self._settings.event_log:
            raise ClientConfigError(
                "the event log is off (REFRESHD_EVENT_LOG=false): there is nothing to read"
            )
        return EventStream(self._log, since=since, group=group, consumer=consumer, ack=ack,
                           count=count, block_s=block, claim_idle_s=claim_idle,
                           follow=follow, codec=self._codec,
                           seen=self._saw if self._cache is not None else None)  # fmt: skip

    # ------------------------------------------------------------ writing

    async def put(self, credential: Mapping[str, Any]) -> bool:
        """Create or replace a credential from an import line's fields
        (``id``, ``profile``, ``access_token``, ``refresh_token``,
        ``expires_in`` or ``expires_at``, optional ``scope``,
        ``token_type``, ``params``), checked exactly as ``refreshd credential
        import`` checks a line. Replacing a ``needs_reauth`` or
        ``quarantined`` credential re-authorizes it: status active, failures
        cleared, scheduled, workers woken. Returns True when it was new.

        Refused: bad input (``InvalidCredential``), a refresh in flight
        right now or a refresh token refreshd already spent
        (``CredentialConflict``), an unsafe Redis (``ClientConfigError``)."""
        now_ms = int(time.time() * 1000)
        try:
            data = dict(credential) if isinstance(credential, Mapping) else credential
            cred = CredentialInput.from_json(data, now_ms=now_ms)
        except ConfigError as exc:
            raise InvalidCredential(str(exc)) from exc
        await self._before_write()
        self._forget(cred.id)
        try:
            created = await self._upsert(cred, now_ms)
        except NotFound as exc:
            raise InvalidCredential(f"unknown profile {cred.profile!r}") from exc
        except ConfigError as exc:
            raise InvalidCredential(str(exc)) from exc
        except Conflict as exc:
            raise CredentialConflict(str(exc)) from exc
        except (StoreUnavailable, ResponseError) as exc:
            raise _translated(exc) from exc
        finally:
            self._forget(cred.id)  # read-your-writes, before Redis's invalidation arrives
        return created

    async def _upsert(self, cred: CredentialInput, now_ms: int) -> bool:
        """The import's per-line steps: the profile's checks, the first due
        time, the write, the orphan check, the wake-up."""
        profiles = ProfileStore(self._store)
        profile = await profiles.load(cred.profile)
        cred.check_against(profile)
        due = self._schedule().next_due_ms(
            now_ms=now_ms, expires_at_ms=cred.expires_at_ms, profile_lead_s=profile.refresh_lead_s
        )
        created = await self._store.upsert(cred, due_ms=due, replace=True)
        if not await profiles.exists(cred.profile):  # deleted meanwhile: undo, as import does
            await self._store.delete(cred.id, force=True)
            raise NotFound(f"unknown profile {cred.profile!r}")
        await guard(self._redis.publish(self._keys.wake, cred.id))
        return created

    async def delete(self, credential_id: str) -> None:
        """Remove a credential (a user withdrew consent). Refused with
        ``CredentialConflict`` while a refresh is in flight: its answer
        would be lost with the record; retry in a moment."""
        await self._before_write()
        self._forget(credential_id)
        try:
            await self._store.delete(credential_id)
        except NotFound as exc:
            raise CredentialNotFound(credential_id) from exc
        except Conflict as exc:
            raise CredentialConflict(str(exc)) from exc
        except (StoreUnavailable, ResponseError) as exc:
            raise _translated(exc) from exc
        finally:
            self._forget(credential_id)

    async def list(
        self,
        *,
        status: Status | str | None = None,
        profile: str | None = None,
        after: str | None = None,
        limit: int = 1000,
    ) -> CredentialList:
        """Credentials matching ``status`` and ``profile`` (None: any), sorted
        by id, one page of at most ``limit`` after the cursor ``after``; no
        tokens (``worker.client.listing``). Reads every credential key once:
        for managing grants, not for a hot path."""
        try:
            where = CredentialFilter(
                status=None if status is None else Status(status), profile=profile
            )
        except ValueError:
            raise ClientConfigError(f"no such status: {status!r}") from None
        try:
            page = await list_credentials(self._store, where, after=after, limit=limit)
        except ConfigError as exc:
            raise ClientConfigError(str(exc)) from exc
        except (StoreUnavailable, ResponseError) as exc:
            raise _translated(exc) from exc
        return CredentialList(
            rows=tuple(CredentialInfo.of(c) for c in page.rows),
            total=page.total,
            next_cursor=page.next_cursor,
        )

    # ------------------------------------------------------------ checks

    async def _check_layout(self) -> None:
        """Read-only: a client that only reads may run as a Redis user that
        cannot write, so the layout is recorded by the first write, not here."""
        try:
            stored, record = await guard(
                self._redis.hmget(self._keys.layout, ["partitions", "record"])
            )
        except (StoreUnavailable, ResponseError) as exc:
            raise _translated(exc) from exc
        if stored is not None and int(stored) != self._keys.partitions:
            raise ClientConfigError(
                f"this Redis holds data written with {stored} partitions; "
                f"set REFRESHD_PARTITIONS={stored}"
            )
        if record is not None and record != RECORD_FORMAT:
            raise ClientConfigError(
                f"this Redis holds credentials in another record format ({record}) than this "
                f"client reads ({RECORD_FORMAT})"
            )

    async def _before_write(self) -> None:
        """The check every writing command makes (README "What the defaults
        guarantee"): a Redis that could lose the write, or evict it, is
        refused unless the hazard is accepted by name; then the layout."""
        if self._write_checked:
            return
        s = self._settings
        try:
            facts = await inspect_server(self._redis)
            check_hazards(find_hazards(facts, s.durability), s.unsafe_redis, s.durability)
            await self._store.check_layout()
        except (ConfigError, Conflict) as exc:
            raise ClientConfigError(str(exc)) from exc
        except (StoreUnavailable, ResponseError) as exc:
            raise _translated(exc) from exc
        self._write_checked = True

    def _schedule(self) -> Schedule:
        s = self._settings
        return Schedule(
            lead_min_s=s.lead_min_s,
            lead_fraction=s.lead_fraction,
            lead_max_s=s.lead_max_s,
            backoff_base_s=s.backoff_base_s,
            backoff_max_s=s.backoff_max_s,
        )


_STOPPED: dict[Status, tuple[type[TokenUnavailable], str]] = {
    Status.NEEDS_REAUTH: (NeedsReauthorization, "needs re-authorization"),
    Status.QUARANTINED: (Quarantined, "is quarantined"),
    Status.DISABLED: (Disabled, "is disabled"),
}


def _usable(view: RecordView) -> AccessToken:
    """The token of an active credential; a stopped one raises, carrying
    the token while it has not expired."""
    if view.token.status is Status.ACTIVE:
        return view.token
    error, what = _STOPPED[view.token.status]
    reason = f" ({view.reason})" if view.reason else ""
    raise error(view.token.credential_id, f"{what}{reason}", reason=view.reason,
                current=view.still_valid())  # fmt: skip


def _check_reachable(view: RecordView, min_ttl: float) -> None:
    """A token refreshd obtained tells how long the provider's tokens live:
    when that is under ``min_ttl``, a refresh cannot help, and asking for
    one on every call would cost a provider request per call."""
    if not view.refreshed_at_ms:
        return
    lifetime = (view.token.expires_at_ms - view.refreshed_at_ms) / 1000
    if lifetime <= min_ttl:
        raise MinTtlUnreachable(
            view.token.credential_id,
            f"its provider's tokens live {lifetime:.0f}s, not more than min_ttl={min_ttl:g}s",
            current=view.still_valid(),
        )


def _failed(view: RecordView, what: str) -> RefreshFailed:
    reason = f" ({view.reason})" if view.reason else ""
    return RefreshFailed(
        view.token.credential_id,
        f"{what}{reason}",
        reason=view.reason,
        current=view.still_valid(),
        retry_at_ms=view.due_ms or 0,
    )


def _translated(exc: Exception) -> ClientError:
    """Redis errors, once, at the client's boundary: down (retry later), or
    a refusal, which for these calls means a setup problem (a Redis user
    whose ACL lacks what the call needs, a server without ZADD LT)."""
    if isinstance(exc, ResponseError):
        return ClientConfigError(f"Redis refused the call: {exc}")
    return StoreUnreachable(str(exc))


def _timed_out(credential_id: str, timeout: float, *, heard: int, taken: bool) -> RefreshTimeout:
    if not heard and not taken:
        return NoWorkerRunning(
            credential_id,
            f"no refresh within {timeout:g}s, and no refreshd worker is running (none heard "
            "the request on the wake channel): start `refreshd run`",
        )
    return RefreshTimeout(credential_id, f"no refresh committed within {timeout:g}s")
