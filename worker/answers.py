"""Reading a token endpoint's answer: the new token set, or a classified failure.

Every way an answer can be wrong maps to one failure type with a bounded
``reason`` (a metric label, never provider text):

- a 2xx whose body holds neither a usable access token nor a new refresh
  token: ``Ambiguous("invalid_response")``, because the provider most likely
  rotated the token and we could not read the new one (odd secondary fields
  never make an answer unusable: ``worker.answer_fields``);
- a 2xx carrying an ``error`` (GitHub) or ``ok: false`` (Slack): a refusal;
- the profile's ``error_rules``, first match wins (e.g. Microsoft's
  ``invalid_grant`` + AADSTS50196 is throttling, not a dead grant);
- 429, 408, 409 (reason ``conflict``), 500, 503, and 403 with a non-JSON
  body (Google's throttling page): ``Transient``, honouring ``Retry-After``;
- 502, 504: ``Ambiguous`` (a gateway cannot say whether the origin ran it);
- ``invalid_grant``, ``invalid_client``, ``unauthorized_client``, 401, and
  other 4xx refusals: ``Permanent``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from worker.answer_fields import (
    MAX_LIFETIME_S,
    MAX_TOKEN_BYTES,
    MIN_LIFETIME_S,
    REFRESH_EXPIRY_FIELDS,
    Warnings,
    lifetime_s,
    number,
    read_scope,
    read_token_type,
    utf8_len,
    warn,
)
from worker.errors import Ambiguous, Permanent, RefreshFailure, Transient
from worker.profile import ErrorClass, ErrorRule, Profile, Rotation, Strategy
from worker.scheduling import parse_retry_after
from worker.transport import HttpAnswer

__all__ = ["TokenSet", "jwt_expiry_ms", "read_answer"]

_PERMANENT_ERRORS = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_request",
        "access_denied",
        "bad_refresh_token",
        "bad_verification_code",
        "incorrect_client_credentials",
    }
)
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})
# Built-in rules that apply to every profile after its own rules.
_DEFAULT_RULES = (
    # Microsoft Entra: a token-loop throttle dressed as invalid_grant
    ErrorRule(ErrorClass.THROTTLED, contains="AADSTS50196"),
)


@dataclass(frozen=True, slots=True)
class TokenSet:
    """A readable answer. ``access_token`` is "" when the answer carried
    only a new refresh token (then ``expires_at_ms`` is 0)."""

    access_token: str
    refresh_token: str  # what the next refresh spends; the old one when none returned
    token_type: str
    expires_at_ms: int
    scope: str
    rotated: bool
    extra: dict[str, str] = field(default_factory=dict)
    refresh_expires_at_ms: int | None = None
    #: fallbacks applied to secondary fields (``worker.answer_fields.WARNINGS``)
    warnings: tuple[str, ...] = ()
    #: the old refresh token was kept although the provider should have
    #: replaced it: it may be spent (the unknown-outcome rule applies)
    refresh_unconfirmed: bool = False


def field_at(body: dict[str, Any], path: str) -> Any:
    """``a.b.c`` into nested objects (Slack's ``authed_user.access_token``)."""
    value: Any = body
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        # orjson reads strict RFC 8259 only; the stdlib also reads what some
        # servers send (a BOM, UTF-16, NaN, integers past 64 bits)
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def error_code(body: dict[str, Any] | None, http_status: int) -> str | None:
    if body is None:
        return None
    if body.get("ok") is False:  # Slack's Web API convention
        return str(body.get("error") or "rejected")
    code = body.get("error")
    if isinstance(code, str) and code:
        return code
    status = body.get("status")  # HubSpot: {"status": "BAD_REFRESH_TOKEN", ...}
    if not 200 <= http_status < 300 and isinstance(status, str) and status.isupper():
        return status.lower()  # (a 2xx "status": "OK" is not a refusal)
    return None


def _reason(code: str) -> str:
    """Provider error codes become metric labels: keep the vocabulary bounded."""
    return code if code in _PERMANENT_ERRORS | _TRANSIENT_ERRORS else "rejected"


def _apply_rule(
    rule: ErrorRule, status: int, code: str | None, text: str, retry_after: float | None
) -> RefreshFailure | None:
    if rule.status is not None and rule.status != status:
        return None
    if rule.error is not None and rule.error != code:
        return None
    if rule.contains is not None and rule.contains not in text:
        return None
    kind = rule.error_class
    if kind is ErrorClass.UNKNOWN:
        return Ambiguous("unknown_outcome", status=status)
    if kind is ErrorClass.THROTTLED:
        return Transient("throttled", status=status, retry_after_s=retry_after)
    if kind is ErrorClass.TRANSIENT:
        return Transient("transient", status=status, retry_after_s=retry_after)
    if kind is ErrorClass.CONFIG:
        return Permanent("config_error", status=status)
    return Permanent(_reason(code) if code else "reauth", status=status)


def _classify(
    answer: HttpAnswer, profile: Profile, body: dict[str, Any] | None, code: str | None
) -> RefreshFailure | None:
    """The failure an answer means, or None for a 2xx to be parsed."""
    status = answer.status
    retry_after = parse_retry_after(answer.headers.get("retry-after"), now_s=time.time())
    if 200 <= status < 300 and code is None:
        return None
    text = answer.body[:8192].decode("utf-8", "replace")
    if (
        profile.strategy is Strategy.SECRET_ROTATION
        and 400 <= status < 500
        and "jwt" in text.lower()
    ):
        # Workato: refresh_secret fails for JWT access profiles, which have no secret
        return Permanent("jwt_profile_unsupported", status=status)
    for rule in (*profile.error_rules, *_DEFAULT_RULES):
        failure = _apply_rule(rule, status, code, text, retry_after)
        if failure is not None:
            return failure
    # The status decides first where it says "later" or "unknown", whatever
    # error code the body carries (most APIs send JSON with their 429s).
    if status in (502, 504):
        return Ambiguous("gateway_error", status=status)
    if status == 429:
        return Transient("throttled", status=status, retry_after_s=retry_after)
    if status == 409:  # VMware CSP documents it: a conflict, retried like the others
        return Transient("conflict", status=status, retry_after_s=retry_after)
    if status >= 500 or status == 408:
        label = code if code in _TRANSIENT_ERRORS else "server_error"
        return Transient(label or "server_error", status=status, retry_after_s=retry_after)
    if code is not None and code in _TRANSIENT_ERRORS:
        return Transient(code, status=status, retry_after_s=retry_after)
    if code is not None:
        return Permanent(_reason(code), status=status)
    if status == 403 and body is None:
        return Transient("throttled", "403 without a JSON body", status=status,
                         retry_after_s=retry_after)  # fmt: skip
    if status == 404:
        return Permanent("config_error", "token endpoint answered 404", status=status)
    return Permanent("unauthorized" if status == 401 else "rejected", status=status)


def jwt_expiry_ms(token: str) -> int | None:
    """The ``exp`` claim of a JWT access token, read without verifying it:
    we only need to know when the provider will stop accepting it."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        return None  # (a deeply nested payload must not cost the answer's tokens)
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return None
    try:
        return int(exp * 1000) if math.isfinite(exp) and 0 < exp < 1e11 else None
    except OverflowError:
        return None


def _expiry_ms(
    body: dict[str, Any], profile: Profile, access_token: str, now_ms: int, warnings: Warnings
) -> int:
    """When the access token expires: ``expires_in``, else the profile's
    ``expires_at_field``, else the JWT ``exp``, else the default lifetime.
    An unusable value falls through to the next source (with a warning);
    the result always lies within [now + 1 s, now + 400 days]."""
    latest = now_ms + int(MAX_LIFETIME_S * 1000)
    raw = field_at(body, profile.expires_in_field)
    if raw is not None:
        lifetime = lifetime_s(raw, warnings, "expires_in")
        if lifetime is not None:
            return now_ms + int(lifetime * 1000)
    absolute: int | None = None
    if profile.expires_at_field:
        at = field_at(body, profile.expires_at_field)
        if at is not None:
            value = number(at)
            if value is None or value <= 0:
                warn(warnings, "expires_at_invalid")
            else:
                absolute = int(value * 1000) if value < 1e11 else int(min(value, 1e15))
    absolute = absolute or jwt_expiry_ms(access_token)
    if absolute is not None and absolute > now_ms + int(MIN_LIFETIME_S * 1000):
        return min(absolute, latest)
    # no expiry, or one already past (a skewed clock must not cause a
    # refresh loop): the profile's default lifetime
    return now_ms + int(profile.default_lifetime_s * 1000)


def _kept(body: dict[str, Any], profile: Profile, warnings: Warnings) -> dict[str, str]:
    kept: dict[str, str] = {}
    for name in profile.keep_fields:
        value = field_at(body, name)
        if value is None:
            continue
        try:
            kept[name] = value if isinstance(value, str) else json.dumps(value)
        except (RecursionError, ValueError):  # nested ~1,000 deep: the tokens still land
            warn(warnings, "kept_field_invalid")
    return kept


def read_answer(
    answer: HttpAnswer,
    profile: Profile,
    *,
    now_ms: int,
    old_secret: str,
    old_scope: str,
) -> TokenSet:
    """The token set in ``answer``, or raise the failure it means.

    Any 2xx carrying a usable access token or a new refresh token is a
    token set (``worker.answer_fields`` lists the fallbacks and their
    warnings); only one with neither is ``Ambiguous("invalid_response")``.
    Two partial answers keep what they can:

    - a new refresh token without a usable access token: ``access_token``
      is "" (the stored access token and its expiry stay; the caller
      stores the refresh token and refreshes again soon);
    - a usable access token but no readable new refresh token from a
      provider that rotates: the old refresh token may be spent, so
      ``refresh_unconfirmed`` is set and the caller applies the
      unknown-outcome rule to it before sending it again.
    """
    body = None if answer.truncated else _json_object(answer.body)
    failure = _classify(answer, profile, body, error_code(body, answer.status))
    if failure is not None:
        raise failure
    if body is None:
        raise Ambiguous("invalid_response", "2xx answer is not a JSON object", status=answer.status)
    if profile.answer_root:
        root = field_at(body, profile.answer_root)
        if not isinstance(root, dict):
            raise Ambiguous(
                "invalid_response", f"{profile.answer_root} is not an object", status=answer.status
            )
        body = root
    warnings: Warnings = []
    if profile.strategy is Strategy.SECRET_ROTATION:
        return _rotated_secret(body, profile, now_ms, warnings)
    access_token = field_at(body, profile.access_token_field)
    if not isinstance(access_token, str):
        access_token = ""
    new_secret, unconfirmed = _new_refresh_token(body, profile, warnings)
    rotated = bool(new_secret) and new_secret != old_secret
    if not access_token:
        if not rotated:
            raise Ambiguous(
                "invalid_response", f"{profile.access_token_field} missing", status=answer.status
            )
        warn(warnings, "access_token_missing")
    if max(utf8_len(access_token), utf8_len(new_secret or "")) > MAX_TOKEN_BYTES:
        warn(warnings, "token_oversized")
    return TokenSet(
        access_token=access_token,
        # RFC 6749 §5.1: refresh_token is optional; keep the old one (Google, Dropbox)
        refresh_token=new_secret or old_secret,
        token_type=read_token_type(body, warnings),
        expires_at_ms=_expiry_ms(body, profile, access_token, now_ms, warnings)
        if access_token
        else 0,
        scope=read_scope(body, old_scope, warnings),
        rotated=rotated,
        extra=_kept(body, profile, warnings),
        refresh_expires_at_ms=_refresh_expiry_ms(body, profile, now_ms, warnings),
        warnings=tuple(warnings),
        refresh_unconfirmed=unconfirmed and not rotated,
    )


def _refresh_expiry_ms(
    body: dict[str, Any], profile: Profile, now_ms: int, warnings: Warnings
) -> int | None:
    """When the refresh token itself dies, if the answer says: the profile's
    ``refresh_expires_in_field``, else the first of the common names
    (``REFRESH_EXPIRY_FIELDS``). Under a common name, 0 means "does not
    expire" (Keycloak's offline tokens), not an error."""
    if profile.refresh_expires_in_field:
        name: str | None = profile.refresh_expires_in_field
        raw = field_at(body, profile.refresh_expires_in_field)
    else:
        name = next((n for n in REFRESH_EXPIRY_FIELDS if n in body), None)
        raw = body[name] if name is not None else None
        if raw == 0:
            return None
    if raw is None:
        return None
    lifetime = lifetime_s(raw, warnings, "refresh_expires_in")
    return None if lifetime is None else now_ms + int(lifetime * 1000)


def _new_refresh_token(
    body: dict[str, Any], profile: Profile, warnings: Warnings
) -> tuple[str | None, bool]:
    """(the new refresh token or None to keep the old one, whether the old
    one may be spent). Keeping it is safe only where the old token may
    still be used: an unreadable value, or none from a provider that
    always rotates, means the old token is probably spent."""
    if profile.strategy is not Strategy.OAUTH2_REFRESH_TOKEN:
        return None, False  # an API token is spent, not rotated; client_credentials has none
    value = field_at(body, profile.refresh_token_field)
    if isinstance(value, str) and value:
        return value, False
    if value is not None and (value != "" or profile.rotation is not Rotation.NEVER):
        warn(warnings, "refresh_token_invalid")
    if profile.rotation is Rotation.NEVER:
        return None, False
    if value is None and profile.rotation is Rotation.MAYBE:
        return None, False
    if value is None:
        warn(warnings, "refresh_token_missing")
    return None, True


#: where Workato puts a new auth token: ``secret`` (access profiles, v1),
#: ``auth_token`` (API keys, v2); the profile's access_token_field comes first
_SECRET_FIELDS = ("secret", "auth_token")


def _rotated_secret(
    body: dict[str, Any], profile: Profile, now_ms: int, warnings: Warnings
) -> TokenSet:
    """A secret-rotation answer (Workato ``refresh_secret``): a new auth
    token, or a new OAuth client id and secret. It is the credential's
    output, its access token; nothing is kept to send next time (the bearer
    is the profile's). The old secret is dead the moment the provider
    answered: whatever new secret is readable is kept, and only an answer
    without one is ambiguous (asking again is safe: it mints another)."""
    if str(body.get("auth_type", "")).lower() == "jwt":
        raise Permanent("jwt_profile_unsupported", "JWT access profiles have no secret to rotate")
    extra = _kept(body, profile, warnings)
    secret = body.get("oauth_client_secret")
    if isinstance(secret, str) and secret:
        client_id = body.get("oauth_client_id")
        if isinstance(client_id, str) and client_id:
            extra["oauth_client_id"] = client_id
        else:
            warn(warnings, "client_id_missing")  # the client id rarely changes
    else:
        for name in dict.fromkeys((profile.access_token_field, *_SECRET_FIELDS)):
            secret = field_at(body, name)
            if isinstance(secret, str) and secret:
                break
    if not isinstance(secret, str) or not secret:
        raise Ambiguous("invalid_response", "no new secret in the answer")
    if utf8_len(secret) > MAX_TOKEN_BYTES:
        warn(warnings, "token_oversized")
    return TokenSet(
        access_token=secret,
        refresh_token="",  # nothing single-use: a credential of this strategy holds none
        token_type=read_token_type(body, warnings),
        expires_at_ms=_expiry_ms(body, profile, secret, now_ms, warnings),
        scope="",
        rotated=False,
        extra=extra,
        warnings=tuple(warnings),
    )
