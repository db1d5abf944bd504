"""The consumer's API: read access tokens, ask for fresh ones, hand over grants.

::

    from worker.client import connect

    async with connect() as tokens:            # REFRESHD_* like every command
        token = await tokens.get("acme-42", min_ttl=60)
        headers = {"Authorization": token.authorization}

``connect_sync()`` gives the same calls without an event loop. Errors form
one tree under ``ClientError`` (``worker.client.errors``). The refresh
token never reaches a consumer; a refresh a consumer asks for goes through
the workers' claim/spend/commit path, so it is sent once whoever asks.
"""

from __future__ import annotations

from worker.client.core import DEFAULT_TIMEOUT_S, Client, connect
from worker.client.errors import (
    ClientConfigError,
    ClientError,
    CredentialConflict,
    CredentialNotFound,
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
from worker.client.listing import CredentialInfo, CredentialList
from worker.client.sync import SyncClient, connect_sync
from worker.client.token import AccessToken

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AccessToken",
    "Client",
    "ClientConfigError",
    "ClientError",
    "CredentialConflict",
    "CredentialInfo",
    "CredentialList",
    "CredentialNotFound",
    "Disabled",
    "InvalidCredential",
    "MinTtlUnreachable",
    "NeedsReauthorization",
    "NoWorkerRunning",
    "Quarantined",
    "RefreshFailed",
    "RefreshTimeout",
    "StoreUnreachable",
    "SyncClient",
    "TokenUnavailable",
    "connect",
    "connect_sync",
]
