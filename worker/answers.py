"""Reading a token endpoint's answer: the new token set, or a classified failure.

Every way an answer can be wrong maps to one failure type with a bounded
``reason`` (a metric label, never provider text):

- a 2xx whose body is not a usable token set: ``Ambiguous("invalid_response")``,
  because the provider most likely rotated the token and we could not read
  the new one;
- a 2xx carrying an ``error`` (GitHub) or ``ok: false`` (Slack): a refusal;
- the profile's ``error_rules``, first match wins (e.g. Microsoft's
  ``invalid_grant`` + AADSTS50196 is throttling, not a dead grant);
- 429, 408, 409, 500, 503, and 403 with a non-JSON body (Google's throttling
  page): ``Transient``, honouring ``Retry-After``;
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

from worker.errors import Ambiguous, Permanent, RefreshFailure, Transient
from worker.profile import ErrorClass, ErrorRule, Profile, Rotation, Strategy
from worker.scheduling import parse_retry_after
from worker.transport import HttpAnswer

__all__ = ["TokenSet", "jwt_expiry_ms", "read_answer"]

_MAX_LIFETIME_S = 400 * 86400
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
    access_token: str
    refresh_token: str  # what the next refresh spends; the old one when none returned
    token_type: str
    expires_at_ms: int
    scope: str
    rotated: bool
    extra: dict[str, str] = field(default_factory=dict)
    refresh_expires_at_ms: int | None = None


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
    if status >= 500 or status in (408, 409):
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
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return None
    try:
        return int(exp * 1000) if math.isfinite(exp) and 0 < exp < 1e11 else None
    except OverflowError:
        return None


def _seconds(value: Any, what: str, *, high: float = _MAX_LIFETIME_S) -> float:
    """A positive number of seconds, given as a number or a numeric string
    (webMethods types ``expires_in`` as a String)."""
    if isinstance(value, bool):
        raise Ambiguous("invalid_response", f"{what} is not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise Ambiguous("invalid_response", f"{what} is not a number") from None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise Ambiguous("invalid_response", f"{what} is not a number") from None
    if not math.isfinite(number) or not 0 < number <= high:
        raise Ambiguous("invalid_response", f"{what} out of range")
    return number


def _expiry_ms(body: dict[str, Any], profile: Profile, access_token: str, now_ms: int) -> int:
    lifetime = field_at(body, profile.expires_in_field)
    if lifetime is not None:
        return now_ms + int(_seconds(lifetime, profile.expires_in_field) * 1000)
    absolute: int | None = None
    if profile.expires_at_field:
        at = field_at(body, profile.expires_at_field)
        if at is not None:
            value = _seconds(at, profile.expires_at_field, high=1e14)
            absolute = int(value * 1000) if value < 1e11 else int(value)
    absolute = absolute or jwt_expiry_ms(access_token)
    if absolute is not None and absolute > now_ms:
        return absolute
    # no expiry, or one already past (a skewed clock must not cause a
    # refresh loop): the profile's default lifetime
    return now_ms + int(profile.default_lifetime_s * 1000)


def _kept(body: dict[str, Any], profile: Profile) -> dict[str, str]:
    kept: dict[str, str] = {}
    for name in profile.keep_fields:
        value = field_at(body, name)
        if value is not None:
            kept[name] = value if isinstance(value, str) else json.dumps(value)
    return kept


def read_answer(
    answer: HttpAnswer,
    profile: Profile,
    *,
    now_ms: int,
    old_secret: str,
    old_scope: str,
) -> TokenSet:
    """The token set in ``answer``, or raise the failure it means."""
    body = None if answer.truncated else _json_object(answer.body)
    failure = _classify(answer, profile, body, error_code(body, answer.status))
    if failure is not None:
        raise failure
    if body is None:
        raise Ambiguous("invalid_response", "2xx answer is not a JSON object", status=answer.status)
    if profile.strategy is Strategy.SECRET_ROTATION:
        return _rotated_secret(body, profile, now_ms)
    access_token = field_at(body, profile.access_token_field)
    if not isinstance(access_token, str) or not access_token:
        raise Ambiguous("invalid_response", f"{profile.access_token_field} missing")
    new_secret = _new_refresh_token(body, profile)
    token_type = body.get("token_type", "Bearer")
    scope = body.get("scope", old_scope)
    if not isinstance(token_type, str) or not isinstance(scope, str | list):
        raise Ambiguous("invalid_response", "token_type or scope has the wrong type")
    if isinstance(scope, list):
        scope = " ".join(str(s) for s in scope)
    refresh_expires_at = None
    if profile.refresh_expires_in_field:
        raw = field_at(body, profile.refresh_expires_in_field)
        if raw is not None:
            refresh_expires_at = now_ms + int(_seconds(raw, "refresh expiry") * 1000)
    return TokenSet(
        access_token=access_token,
        # RFC 6749 §5.1: refresh_token is optional; keep the old one (Google, Dropbox)
        refresh_token=new_secret or old_secret,
        token_type=token_type,
        expires_at_ms=_expiry_ms(body, profile, access_token, now_ms),
        scope=scope,
        rotated=bool(new_secret) and new_secret != old_secret,
        extra=_kept(body, profile),
        refresh_expires_at_ms=refresh_expires_at,
    )


def _new_refresh_token(body: dict[str, Any], profile: Profile) -> str | None:
    """The rotated refresh token, or None to keep the old one. Keeping it is
    right only where the old token may still be used: an empty value, or
    none from a provider that always rotates, means the old token is
    probably spent and the new one unreadable."""
    if profile.strategy is not Strategy.OAUTH2_REFRESH_TOKEN:
        return None  # an API token is spent, not rotated; client_credentials has none
    value = field_at(body, profile.refresh_token_field)
    if value is not None and not isinstance(value, str):
        raise Ambiguous("invalid_response", "refresh token is not a string")
    if profile.rotation is Rotation.NEVER:
        return value or None
    if value == "" or (value is None and profile.rotation is Rotation.ALWAYS):
        raise Ambiguous("invalid_response", "no new refresh token from a rotating provider")
    return value


def _rotated_secret(body: dict[str, Any], profile: Profile, now_ms: int) -> TokenSet:
    """A secret-rotation answer (Workato ``refresh_secret``): a new auth
    token, or a new OAuth client id and secret. The old secret is dead the
    moment the provider answered, so anything unreadable is ambiguous."""
    if str(body.get("auth_type", "")).lower() == "jwt":
        raise Permanent("jwt_profile_unsupported", "JWT access profiles have no secret to rotate")
    extra = _kept(body, profile)
    secret = body.get("oauth_client_secret")
    if secret is not None:
        client_id = body.get("oauth_client_id")
        if not isinstance(client_id, str) or not client_id:
            raise Ambiguous("invalid_response", "oauth_client_secret without oauth_client_id")
        extra["oauth_client_id"] = client_id
    else:
        secret = field_at(body, profile.access_token_field)
    if not isinstance(secret, str) or not secret:
        raise Ambiguous("invalid_response", "no new secret in the answer")
    return TokenSet(
        access_token=secret,
        refresh_token=secret,
        token_type=str(body.get("token_type", "Bearer")),
        expires_at_ms=_expiry_ms(body, profile, secret, now_ms),
        scope="",
        rotated=True,
        extra=extra,
    )
