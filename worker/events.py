"""The event schema consumers rely on: one JSON object per refresh outcome.

Published on ``<prefix>events`` and appended to the partition's event log
(``worker.eventlog``) by the commit script itself, so a stored token and its
event never disagree. Its JSON Schema is docs/events.schema.json; typed
classes for consumers are in ``worker.eventmodel``. Bump ``SCHEMA`` on any incompatible
change; adding a field is compatible (``warnings`` was added so, within
schema 1). The refresh token is never published.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import orjson

__all__ = ["SCHEMA", "EventType", "build_event"]

SCHEMA = 1


class EventType(StrEnum):
    REFRESHED = "token.refreshed"
    FAILED = "token.failed"
    NEEDS_REAUTH = "credential.needs_reauth"
    QUARANTINED = "credential.quarantined"


def build_event(
    kind: EventType,
    *,
    credential_id: str,
    profile: str,
    version: int,
    ts_ms: int,
    access_token: str | None = None,
    token_type: str = "",
    expires_at_ms: int | None = None,
    scope: str = "",
    reason: str = "",
    retry_at_ms: int | None = None,
    failures: int | None = None,
    extra: dict[str, str] | None = None,
    warnings: Sequence[str] = (),
    detail: str = "",
) -> str:
    """One event as compact JSON. ``warnings`` (any type, only when there
    are some): the fallbacks applied to an odd provider answer, from the
    fixed vocabulary of ``worker.answer_fields``. Keep ``schema`` and
    ``type`` the first two keys: commit.lua reads them by position for the
    log entry's ``v`` and ``type`` fields instead of decoding the event."""
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "type": kind.value,
        "credential_id": credential_id,
        "profile": profile,
        "version": version,
        "ts": ts_ms,
    }
    if kind is EventType.REFRESHED:
        body |= {
            "access_token": access_token,
            "token_type": token_type,
            "expires_at": expires_at_ms,
            "scope": scope,
        }
        if extra:
            body["extra"] = extra
    else:
        body["reason"] = reason
        if failures is not None:
            body["failures"] = failures
        if retry_at_ms is not None:
            body["retry_at"] = retry_at_ms
        if detail:  # refreshd's own words (a certificate problem), never provider text
            body["detail"] = detail
    if warnings:
        body["warnings"] = list(warnings)
    return orjson.dumps(body).decode()  # compact; non-ASCII as UTF-8, not \u escapes
