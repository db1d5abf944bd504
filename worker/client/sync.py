"""The client for scripts: the async client on a private event loop thread."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from functools import partial
from types import TracebackType
from typing import Any, Self

from anyio.from_thread import BlockingPortal, start_blocking_portal

from worker.client.cache import CacheStats
from worker.client.core import DEFAULT_TIMEOUT_S, Client, connect
from worker.client.events import AckMode, EventStream, Since
from worker.client.listing import CredentialList
from worker.client.token import AccessToken
from worker.eventlog import Cursor, LogEntry
from worker.models import Status
from worker.settings import Settings

__all__ = ["SyncClient", "SyncEventStream", "connect_sync"]


class SyncClient:
    """Blocking twins of ``Client.get``, ``put`` and ``delete``, for code
    without an event loop (scripts, WSGI apps). The async client runs on an
    event loop in a private thread, started here and stopped by
    ``close()`` (or the ``with`` block); calls from several threads are
    safe. Same arguments, results and errors as the async client."""

    def __init__(self, settings: Settings | None = None, **options: Any) -> None:
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal("asyncio")
        self._portal = self._portal_cm.__enter__()
        try:
            self._client_cm = self._portal.wrap_async_context_manager(connect(settings, **options))
            self._client: Client = self._client_cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(*sys.exc_info())
            raise
        self._closed = False

    def get(
        self,
        credential_id: str,
        *,
        min_ttl: float | None = 0.0,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> AccessToken:
        """See ``Client.get``."""
        call = partial(self._client.get, credential_id, min_ttl=min_ttl, timeout=timeout)
        return self._portal.call(call)

    def cache_stats(self) -> CacheStats | None:
        """See ``Client.cache_stats`` (read on the client's event loop)."""
        return self._portal.call(self._client.cache_stats)

    def put(self, credential: Mapping[str, Any]) -> bool:
        """See ``Client.put``."""
        return bool(self._portal.call(self._client.put, credential))

    def delete(self, credential_id: str) -> None:
        """See ``Client.delete``."""
        self._portal.call(self._client.delete, credential_id)

    def list(
        self,
        *,
        status: Status | str | None = None,
        profile: str | None = None,
        after: str | None = None,
        limit: int = 1000,
    ) -> CredentialList:
        """See ``Client.list``."""
        call = partial(self._client.list, status=status, profile=profile, after=after, limit=limit)
        return self._portal.call(call)

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
    ) -> SyncEventStream:
        """See ``Client.events``: ``for entry in client.events(...)``."""
        stream = self._client.events(since, group=group, consumer=consumer, ack=ack,
                                     count=count, block=block, claim_idle=claim_idle,
                                     follow=follow)  # fmt: skip
        return SyncEventStream(self._portal, stream)

    def close(self) -> None:
        """Close the connections and stop the loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._client_cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect_sync(settings: Settings | None = None, **options: Any) -> SyncClient:
    """``connect()`` for code without an event loop: ``with connect_sync() as c:``."""
    return SyncClient(settings, **options)


class SyncEventStream:
    """``EventStream`` for a plain ``for`` loop (and ``with``)."""

    def __init__(self, portal: BlockingPortal, stream: EventStream) -> None:
        self._portal = portal
        self._stream = stream

    @property
    def cursor(self) -> Cursor | None:
        """See ``EventStream.cursor``."""
        return self._stream.cursor

    def __iter__(self) -> Iterator[LogEntry]:
        return self

    def __next__(self) -> LogEntry:
        entry = self._portal.call(self._next)
        if entry is None:
            raise StopIteration
        return entry

    async def _next(self) -> LogEntry | None:
        # StopAsyncIteration does not cross a future: end of stream as None
        try:
            return await self._stream.__anext__()
        except StopAsyncIteration:
            return None

    def ack(self, *entries: LogEntry) -> int:
        """See ``EventStream.ack``."""
        return int(self._portal.call(partial(self._stream.ack, *entries)))

    def close(self) -> None:
        """See ``EventStream.aclose``."""
        self._portal.call(self._stream.aclose)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
