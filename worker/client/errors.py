"""What the client raises: one tree under ``ClientError``, which is itself a
``worker.errors.RefreshdError``.

::

    ClientError
    ├── ClientConfigError        bad REFRESHD_* setting, or a Redis refused for writes
    │   └── CursorError          events(): a cursor that is not one (also an eventlog.CursorError)
    ├── StoreUnreachable         Redis did not answer (retry later)
    ├── EventsTrimmed            events(): events after the cursor were trimmed before they
    │                            were read (also an eventlog.EventsTrimmed; ``resume``)
    ├── CredentialNotFound       no such credential
    ├── CredentialUnreadable     a stored (or published) secret does not decrypt with this
    │                            client's key ring: altered, moved, or under a key not in it
    ├── InvalidCredential        put(): the import validation refused it
    ├── CredentialConflict       put()/delete(): a refresh is in flight, or the
    │                            refresh token was already spent (the message says which)
    ├── TokenUnavailable         the credential cannot give a usable token now;
    │   │                        ``current`` is its token while still valid, else None
    │   ├── NeedsReauthorization the provider refused the grant: a person must consent again
    │   ├── Quarantined          an answer was lost; resending could revoke the grant
    │   ├── Disabled             switched off by an operator
    │   ├── RefreshFailed        the last refresh failed (provider down, throttled);
    │   │                        the worker retries at ``retry_at_ms``
    │   └── MinTtlUnreachable    the provider's tokens live shorter than min_ttl
    └── RefreshTimeout           no refresh committed within ``timeout``
        └── NoWorkerRunning      ... and no refreshd worker heard the request

Redis and settings errors are translated once, where the client calls them
(``raise ... from exc``); nothing else escapes but cancellation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker import eventlog
from worker.errors import RefreshdError

if TYPE_CHECKING:
    from worker.client.token import AccessToken
    from worker.eventlog import LogEntry

__all__ = [
    "ClientConfigError",
    "ClientError",
    "CredentialConflict",
    "CredentialNotFound",
    "CredentialUnreadable",
    "CursorError",
    "Disabled",
    "EventsTrimmed",
    "InvalidCredential",
    "MinTtlUnreachable",
    "NeedsReauthorization",
    "NoWorkerRunning",
    "Quarantined",
    "RefreshFailed",
    "RefreshTimeout",
    "StoreUnreachable",
    "TokenUnavailable",
]


class ClientError(RefreshdError):
    """Root of everything ``worker.client`` raises on purpose."""


class ClientConfigError(ClientError):
    """A setting is malformed, or the Redis server could break refreshd's
    promise and is refused for writes (``REFRESHD_UNSAFE_REDIS``)."""


class CursorError(ClientConfigError, eventlog.CursorError):
    """``events(since=...)`` got a string that is not a cursor, or a cursor
    of an installation with another partition count."""


class EventsTrimmed(ClientError, eventlog.EventsTrimmed):
    """Events after the consumer's position were trimmed from the log
    (older than retention) before it read them: they are lost to this
    consumer. ``partitions`` says where; ``resume`` (plain reads) is the
    cursor that goes on from the oldest event kept, once the gap is accepted."""


class StoreUnreachable(ClientError):
    """Redis did not answer; nothing was changed that the caller must undo."""


class CredentialNotFound(ClientError):
    """The credential does not exist (never imported, or deleted)."""

    def __init__(self, credential_id: str) -> None:
        super().__init__(f"no credential {credential_id!r}")
        self.credential_id = credential_id


class CredentialUnreadable(ClientError):
    """A secret of the credential (or of an event about it) does not
    decrypt with this client's key ring (``REFRESHD_ENCRYPTION_KEYS``):
    ``reason`` is ``unknown_key`` (its key id is not in the ring, or the
    client has none) or ``undecryptable`` (altered, or copied from another
    record). ``entry`` is the event-log entry when ``events()`` raised it:
    iterating again goes on after it."""

    def __init__(
        self, credential_id: str, reason: str, detail: str, *, entry: LogEntry | None = None
    ) -> None:
        super().__init__(f"credential {credential_id}: {detail}")
        self.credential_id = credential_id
        self.reason = reason
        self.entry = entry


class InvalidCredential(ClientError):
    """``put()`` input refused by the same validation as ``credential import``;
    the message names the field, never its value."""


class CredentialConflict(ClientError):
    """``put()`` or ``delete()`` clashes with stored state: a refresh is in
    flight right now (retry in a moment), or the refresh token is one a
    rotation already spent (import the current tokens or re-authorize)."""


class TokenUnavailable(ClientError):
    """The credential cannot give a token that meets the request.

    ``current`` is the stored access token while it has not expired (an
    application that prefers a short-lived token to none may use it), else
    None; ``reason`` is refreshd's short failure label (``invalid_grant``,
    ``throttled``, ``unknown_outcome``, ...) or ""."""

    def __init__(
        self, credential_id: str, message: str, *, reason: str = "",
        current: AccessToken | None = None,
    ) -> None:  # fmt: skip
        super().__init__(f"credential {credential_id}: {message}")
        self.credential_id = credential_id
        self.reason = reason
        self.current = current


class NeedsReauthorization(TokenUnavailable):
    """The provider refused the grant (``needs_reauth``): a person must go
    through the consent flow again, then ``put()`` the new tokens."""


class Quarantined(TokenUnavailable):
    """A refresh's answer was lost and resending the refresh token could
    revoke the grant, so refreshd stopped rather than guess. Re-authorize
    (``put()``), or resume it once you know the token was not used."""


class Disabled(TokenUnavailable):
    """The credential was switched off (status ``disabled``)."""


class RefreshFailed(TokenUnavailable):
    """The last refresh attempt failed (provider down, throttled, timed out)
    and the credential is in backoff: the worker retries at ``retry_at_ms``
    (epoch ms, 0 when unknown). The client never moves a backoff earlier."""

    def __init__(
        self, credential_id: str, message: str, *, reason: str = "",
        current: AccessToken | None = None, retry_at_ms: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(credential_id, message, reason=reason, current=current)
        self.retry_at_ms = retry_at_ms


class MinTtlUnreachable(TokenUnavailable):
    """The provider's tokens live shorter than ``min_ttl``: a refresh cannot
    give what was asked, so the client does not ask for one (it would cost
    a provider request on every call)."""


class RefreshTimeout(ClientError):
    """No refresh committed within the caller's ``timeout``; the request
    stays in place (the credential is due now) and a worker will do it."""

    def __init__(self, credential_id: str, message: str) -> None:
        super().__init__(f"credential {credential_id}: {message}")
        self.credential_id = credential_id


class NoWorkerRunning(RefreshTimeout):
    """The wait timed out and no refreshd worker was listening for the
    request (nobody subscribed to the wake channel, and no worker took the
    credential): start ``refreshd run``."""
