"""Secondary fields of a 2xx token answer: read, or replaced by a fallback and a warning.

A provider that handed over a readable token has used the grant: its answer
is stored even when a secondary field is odd, because refusing it would
throw the new tokens away (for a rotating provider, the grant with them).
Each fallback adds one warning from the fixed vocabulary ``WARNINGS`` (a
metric label value and an entry of the event's ``warnings`` list, never
provider text):

============================  =================================================
``expires_in_invalid``        not a number, not finite, or under 1 s: the next
                              source applies (``expires_at_field``, the JWT
                              ``exp``, else the profile's default lifetime)
``expires_in_clamped``        over 400 days: 400 days
``expires_at_invalid``        ``expires_at_field`` unreadable: as above
``refresh_expires_in_invalid`` unreadable: the refresh token's expiry unknown
``refresh_expires_in_clamped`` over 400 days: 400 days
``token_type_invalid``        null, not a string, empty or over 64 characters:
                              ``Bearer``
``scope_invalid``             null, not a string (or list of strings), or over
                              16 KiB: the grant's scope is kept
``refresh_token_invalid``     a refresh token that is not a non-empty string
``refresh_token_missing``     a rotating provider sent a usable access token
                              and no readable new refresh token
``access_token_missing``      a new refresh token and no usable access token
``token_oversized``           a token over 16 KiB, stored all the same
``client_id_missing``         a new client secret without its client id
``kept_field_invalid``        a ``keep_fields`` value that cannot be stored
                              (nested too deeply): left out
============================  =================================================
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "MAX_LIFETIME_S",
    "MAX_SCOPE_BYTES",
    "MAX_TOKEN_BYTES",
    "MAX_TOKEN_TYPE_CHARS",
    "MIN_LIFETIME_S",
    "REFRESH_EXPIRY_FIELDS",
    "WARNINGS",
    "Warnings",
    "lifetime_s",
    "number",
    "read_scope",
    "read_token_type",
    "utf8_len",
    "warn",
]

#: lifetimes an answer (or an import line) may state, in seconds
MIN_LIFETIME_S = 1.0
MAX_LIFETIME_S = 400 * 86400.0
#: an import line's tokens and secrets; provider answers are capped at 64 KiB
#: whole, and a larger token in one is stored with a warning, never dropped
MAX_TOKEN_BYTES = 16 * 1024
MAX_SCOPE_BYTES = 16 * 1024
MAX_TOKEN_TYPE_CHARS = 64

WARNINGS = frozenset(
    {
        "expires_in_invalid",
        "expires_in_clamped",
        "expires_at_invalid",
        "refresh_expires_in_invalid",
        "refresh_expires_in_clamped",
        "token_type_invalid",
        "scope_invalid",
        "refresh_token_invalid",
        "refresh_token_missing",
        "access_token_missing",
        "token_oversized",
        "client_id_missing",
        "kept_field_invalid",
    }
)

Warnings = list[str]


#: where providers put the refresh token's lifetime (seconds), read when the
#: profile names no ``refresh_expires_in_field``: GitHub Apps, Keycloak,
#: Intuit; the first one present wins
REFRESH_EXPIRY_FIELDS = (
    "refresh_token_expires_in",
    "refresh_expires_in",
    "x_refresh_token_expires_in",
)


def utf8_len(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))


def warn(warnings: Warnings, name: str) -> None:
    """Add ``name`` (one of ``WARNINGS``: bounded label values) once."""
    if name not in warnings:
        warnings.append(name)


def number(value: Any) -> float | None:
    """A finite number given as a number or a numeric string (webMethods
    types ``expires_in`` as a String); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return result if math.isfinite(result) else None


def lifetime_s(value: Any, warnings: Warnings, what: str) -> float | None:
    """A lifetime in seconds within [MIN_LIFETIME_S, MAX_LIFETIME_S]: an
    unusable one is None plus ``<what>_invalid``, a too long one is clamped
    plus ``<what>_clamped``."""
    seconds = number(value)
    if seconds is None or seconds < MIN_LIFETIME_S:
        warn(warnings, f"{what}_invalid")
        return None
    if seconds > MAX_LIFETIME_S:
        warn(warnings, f"{what}_clamped")
        return MAX_LIFETIME_S
    return seconds


def read_token_type(body: dict[str, Any], warnings: Warnings) -> str:
    """``token_type``, ``Bearer`` when missing (common, and what every
    provider means) or unusable (with a warning)."""
    if "token_type" not in body:
        return "Bearer"
    value = body["token_type"]
    if isinstance(value, str) and 0 < len(value) <= MAX_TOKEN_TYPE_CHARS:
        return value
    warn(warnings, "token_type_invalid")
    return "Bearer"


def read_scope(body: dict[str, Any], old_scope: str, warnings: Warnings) -> str:
    """The granted scope: RFC 6749 §5.1 says an omitted scope is unchanged,
    and an unreadable one is treated the same way (with a warning)."""
    if "scope" not in body:
        return old_scope
    value = body["scope"]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        value = " ".join(value)
    if isinstance(value, str) and utf8_len(value) <= MAX_SCOPE_BYTES:
        return value
    warn(warnings, "scope_invalid")
    return old_scope
