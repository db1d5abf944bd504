"""Listing credentials from the client: the operator CLI's honest listing, no secrets.

A consumer that manages many grants (a dashboard of integrations, a job
that re-authorizes the broken ones) needs what ``refreshd credential list``
gives an operator: every credential matching a status or profile, in a
stable order, with a total and a cursor for the next page
(``worker.listing`` does the work server-side). Rows carry what a consumer
may see about a credential, never a token: use ``get`` for the access token.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from worker.models import Credential, Status

__all__ = ["CredentialInfo", "CredentialList"]


@dataclass(frozen=True, slots=True)
class CredentialInfo:
    """One credential's state without its tokens."""

    credential_id: str
    profile: str
    status: Status
    version: int
    expires_at_ms: int
    scope: str
    failures: int
    last_error: str
    due_at_ms: int | None
    refreshed_at_ms: int | None

    @property
    def expires_at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.expires_at_ms / 1000, tz=dt.UTC)

    @classmethod
    def of(cls, cred: Credential) -> CredentialInfo:
        return cls(
            credential_id=cred.id,
            profile=cred.profile,
            status=cred.status,
            version=cred.version,
            expires_at_ms=cred.expires_at_ms,
            scope=cred.scope,
            failures=cred.failures,
            last_error=cred.last_error,
            due_at_ms=cred.due_at_ms,
            refreshed_at_ms=cred.refreshed_at_ms,
        )


@dataclass(frozen=True, slots=True)
class CredentialList:
    """One page. Pass ``next_cursor`` as ``after`` for the next one; it is
    None on the last page. ``total`` counts matches over all pages."""

    rows: tuple[CredentialInfo, ...]
    total: int
    next_cursor: str | None

    @property
    def truncated(self) -> bool:
        return self.next_cursor is not None
