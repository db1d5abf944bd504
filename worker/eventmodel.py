"""Typed events: the JSON of ``worker.events`` as frozen dataclasses.

A consumer written against these classes keeps working when refreshd adds a
field (unknown fields are ignored) or a new event type (it arrives as
``UnknownEvent`` with the raw body, never as an exception). Only an event
that is not a JSON object at all raises ``EventFormatError``. The schema
number is checked: an event of a newer, incompatible schema is also an
``UnknownEvent``, so a consumer never misreads it. The refresh token is never
part of an event; the access token and secret extras stay out of ``repr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from worker.errors import RefreshdError
from worker.events import SCHEMA, EventType

__all__ = [
    "Event",
    "EventFormatError",
    "Failed",
    "NeedsReauth",
    "Quarantined",
    "Refreshed",
    "UnknownEvent",
    "parse_event",
]


class EventFormatError(RefreshdError):
    """The bytes are not an event at all (not a JSON object)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """What every event says: which credential, which version of it, when."""

    type: str
    credential_id: str
    profile: str
    version: int
    ts_ms: int
    schema: int = SCHEMA
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Refreshed(Event):
    """New tokens were stored (``token.refreshed``): ``version`` is the
    stored version that holds ``access_token``. ``secrets`` says how the
    event carried its secrets (``REFRESHD_EVENT_SECRETS``): ``""`` in
    clear; ``"encrypted"`` (``access_token`` and secret extras are still
    ciphertext: ``worker.client`` opens them when it has the key ring);
    ``"omitted"`` (``access_token`` is ``""``: read the credential)."""

    access_token: str = field(repr=False)
    token_type: str = ""
    expires_at_ms: int | None = None
    scope: str = ""
    extra: Mapping[str, str] = field(default_factory=dict, repr=False)
    secrets: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed(Event):
    """A refresh failed and will be retried at ``retry_at_ms`` (``token.failed``)."""

    reason: str = ""
    failures: int | None = None
    retry_at_ms: int | None = None
    #: what exactly failed, where refreshd can say it safely (``tls_error``)
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class NeedsReauth(Failed):
    """The provider refused the grant: a user must consent again
    (``credential.needs_reauth``). No more refreshes until then."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Quarantined(Failed):
    """refreshd stopped refreshing this credential (``credential.quarantined``),
    for example after a possible refresh token reuse."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UnknownEvent(Event):
    """A type or schema this version does not know, or a body missing a
    field its type needs: kept whole in ``body`` (not in ``repr``)."""

    body: Mapping[str, Any] = field(default_factory=dict, repr=False)


_FAILURES: dict[str, type[Failed]] = {
    EventType.FAILED.value: Failed,
    EventType.NEEDS_REAUTH.value: NeedsReauth,
    EventType.QUARANTINED.value: Quarantined,
}


def parse_event(raw: str | bytes | Mapping[str, Any]) -> Event:
    """The typed event for one JSON message (pub/sub payload or the
    ``json`` field of a log entry)."""
    if isinstance(raw, Mapping):
        body: Any = raw
    else:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise EventFormatError(f"an event is a JSON object; this is not JSON: {exc}") from None
    if not isinstance(body, Mapping):
        raise EventFormatError(f"an event is a JSON object, not {type(body).__name__}")
    try:
        return _typed(body)
    except (KeyError, TypeError, ValueError):
        return _unknown(body)


def _typed(body: Mapping[str, Any]) -> Event:
    kind = body["type"]
    if _int(body["schema"]) != SCHEMA or not isinstance(kind, str):
        return _unknown(body)
    common: dict[str, Any] = {
        "type": kind,
        "credential_id": _str(body["credential_id"]),
        "profile": _str(body["profile"]),
        "version": _int(body["version"]),
        "ts_ms": _int(body["ts"]),
        "schema": SCHEMA,
        "warnings": tuple(_str(w) for w in body.get("warnings", ())),
    }
    if kind == EventType.REFRESHED.value:
        extra = body.get("extra") or {}
        if not isinstance(extra, Mapping):
            raise TypeError("extra")
        omitted = body.get("secrets") == "omitted"  # REFRESHD_EVENT_SECRETS
        return Refreshed(
            **common,
            access_token=_str(
                (body.get("access_token") or "") if omitted else body["access_token"]
            ),
            token_type=_str(body.get("token_type") or ""),
            expires_at_ms=_opt_int(body.get("expires_at")),
            scope=_str(body.get("scope") or ""),
            extra={_str(k): _str(v) for k, v in extra.items()},
            secrets=_str(body.get("secrets") or ""),
        )
    failure = _FAILURES.get(kind)
    if failure is None:
        return _unknown(body)
    return failure(
        **common,
        reason=_str(body.get("reason") or ""),
        failures=_opt_int(body.get("failures")),
        retry_at_ms=_opt_int(body.get("retry_at")),
        detail=_str(body.get("detail") or ""),
    )


def _unknown(body: Mapping[str, Any]) -> UnknownEvent:
    """Best effort on the common fields; never raises."""

    def get(name: str, kind: type, default: Any) -> Any:
        value = body.get(name)
        return value if isinstance(value, kind) and not isinstance(value, bool) else default

    return UnknownEvent(
        type=get("type", str, ""),
        credential_id=get("credential_id", str, ""),
        profile=get("profile", str, ""),
        version=get("version", int, 0),
        ts_ms=get("ts", int, 0),
        schema=get("schema", int, 0),
        body=dict(body),
    )


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    return value


def _opt_int(value: Any) -> int | None:
    return None if value is None else _int(value)
