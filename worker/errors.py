"""The one exception tree of refreshd.

::

    RefreshdError
    ├── ConfigError              bad setting, profile or import line: fix the input
    ├── NotFound                 no such credential or profile
    ├── Conflict                 the operation clashes with stored state
    ├── StoreUnavailable         Redis cannot be reached (retry later)
    ├── SecretUnreadable         a stored secret does not decrypt (tampered,
    │                            moved, or under a key not in the ring)
    └── RefreshFailure           a refresh attempt failed; the subclass says how
        ├── NotSent              nothing reached the provider: safe to retry
        ├── Transient            the provider answered "try later" (5xx, 429)
        ├── Ambiguous            sent, outcome unknown: the rotation rule decides
        └── Permanent            the provider refused the grant: needs re-auth

Foreign errors (httpx, aiohttp, redis) are translated once, at the I/O
boundary, with ``raise ... from exc``. Whether a failure may be retried is
decided by its type, never by string matching further up.
"""

from __future__ import annotations

__all__ = [
    "Ambiguous",
    "ConfigError",
    "Conflict",
    "NotFound",
    "NotSent",
    "Permanent",
    "RefreshFailure",
    "RefreshdError",
    "SecretUnreadable",
    "StoreUnavailable",
    "Transient",
]


class RefreshdError(Exception):
    """Root of every error refreshd raises on purpose."""


class ConfigError(RefreshdError):
    """Input that can never work as given (setting, profile field, import line)."""


class NotFound(RefreshdError):
    """The named credential or profile does not exist."""


class Conflict(RefreshdError):
    """The request contradicts stored state (e.g. deleting a profile in use)."""


class StoreUnavailable(RefreshdError):
    """Redis did not answer; the operation may be retried later."""


class SecretUnreadable(RefreshdError):
    """A stored secret cannot be read with this process's key ring.
    ``reason`` is ``unknown_key`` (its key id is not in the ring, or there
    is no ring) or ``undecryptable`` (altered, moved to another record or
    field, or not of the format). The message names the record, field and
    key id, never a key or a value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RefreshFailure(RefreshdError):
    """A refresh attempt failed. ``reason`` is a short, bounded label used in
    metrics and events (never a provider's free text, never a secret)."""

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.status = status
        self.retry_after_s = retry_after_s


class NotSent(RefreshFailure):
    """The request never left (connect refused, DNS, pool timeout)."""


class Transient(RefreshFailure):
    """The provider answered and did not use the grant; retry with backoff."""


class Ambiguous(RefreshFailure):
    """The request may have reached the provider and rotated the refresh
    token, but no usable answer came back."""


class Permanent(RefreshFailure):
    """The provider refused the grant or the client; retrying cannot help."""
