"""The consumer's API: read access tokens, ask for fresh ones, hand over grants.

::

    from worker.client import connect

    async with connect() as tokens:            # REFRESHD_* like every command
        token = await tokens.get("acme-42", min_ttl=60)
        headers = {"Authorization": token.authorization}
        async for entry in tokens.events(since=saved):  # the durable event log
            handle(entry.event)                         # Refreshed, Failed, ...
            save(entry.cursor)                          # resume here after a crash

``get(id)`` is served from an in-process cache while Redis's invalidation
messages keep it current (``worker.client.cache``, ``worker.client.tracking``;
``REFRESHD_CLIENT_CACHE``). ``connect_sync()`` gives the same calls without
an event loop. Errors form
one tree under ``ClientError`` (``worker.client.errors``). The refresh
token never reaches a consumer; a refresh a consumer asks for goes through
the workers' claim/spend/commit path, so it is sent once whoever asks.

The typed events (``worker.eventmodel``) and the log's ``Cursor``,
``LogEntry`` (``worker.eventlog``) are re-exported here; the event
``Quarantined`` is ``QuarantinedEvent``, since ``Quarantined`` is the error
``get()`` raises for a quarantined credential.
"""

from __future__ import annotations

from worker.client.cache import CacheStats
from worker.client.core import DEFAULT_TIMEOUT_S, Client, connect
from worker.client.errors import (
    ClientConfigError,
    ClientError,
    CredentialConflict,
    CredentialNotFound,
    CredentialUnreadable,
    CursorError,
    Disabled,
    EventsTrimmed,
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
from worker.client.events import EventStream
from worker.client.listing import CredentialInfo, CredentialList
from worker.client.sync import SyncClient, SyncEventStream, connect_sync
from worker.client.token import AccessToken
from worker.eventlog import Cursor, LogEntry
from worker.eventmodel import Event, Failed, NeedsReauth, Refreshed, UnknownEvent
from worker.eventmodel import Quarantined as QuarantinedEvent

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AccessToken",
    "CacheStats",
    "Client",
    "ClientConfigError",
    "ClientError",
    "CredentialConflict",
    "CredentialInfo",
    "CredentialList",
    "CredentialNotFound",
    "CredentialUnreadable",
    "Cursor",
    "CursorError",
    "Disabled",
    "Event",
    "EventStream",
    "EventsTrimmed",
    "Failed",
    "InvalidCredential",
    "LogEntry",
    "MinTtlUnreachable",
    "NeedsReauth",
    "NeedsReauthorization",
    "NoWorkerRunning",
    "Quarantined",
    "QuarantinedEvent",
    "RefreshFailed",
    "RefreshTimeout",
    "Refreshed",
    "StoreUnreachable",
    "SyncClient",
    "SyncEventStream",
    "TokenUnavailable",
    "UnknownEvent",
    "connect",
    "connect_sync",
]
