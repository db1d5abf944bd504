"""RFC 6749 §6: the refresh_token grant - building the request, reading the answer.

Answers are validated strictly; every way an answer can be wrong maps to
one failure type with a bounded ``reason``:

- 2xx whose body is not a usable token set: ``Ambiguous("invalid_response")``,
  because the provider most likely rotated the refresh token and we could
  not read the new one;
- 2xx carrying an ``error`` (GitHub) or ``ok: false`` (Slack): a refusal;
- 429, 408, 500, 503, 403 with a non-JSON body (Google's throttling page):
  ``Transient`` (the grant was not used), honouring ``Retry-After``;
- 502, 504: ``Ambiguous`` (a gateway cannot say whether the origin ran it);
- ``invalid_grant``, ``invalid_client``, ``unauthorized_client`` and other
  4xx refusals: ``Permanent``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlencode

import httpx

from worker.errors import Ambiguous, Permanent, RefreshFailure, Transient
from worker.models import AuthMethod, BodyFormat, Profile
from worker.scheduling import parse_retry_after
from worker.transport import HttpAnswer

__all__ = ["TokenSet", "build_refresh_request", "parse_token_answer"]

_MAX_LIFETIME_S = 400 * 86400
_PERMANENT_ERRORS = {
    "invalid_grant",
    "invalid_client",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "invalid_request",
    "access_denied",
    "bad_refresh_token",
    "bad_verification_code",
}
_TRANSIENT_ERRORS = {"temporarily_unavailable", "server_error", "slow_down"}


@dataclass(frozen=True, slots=True)
class TokenSet:
    access_token: str
    refresh_token: str  # the old one when the provider returned none
    token_type: str
    expires_at_ms: int
    scope: str
    rotated: bool


def basic_credentials(client_id: str, client_secret: str, *, form_encode: bool) -> str:
    """RFC 6749 §2.3.1: id and secret are form-encoded (Appendix B) before
    base64, so ``+``, ``:`` and ``%`` survive. Some servers skip the decode
    step, hence the per-profile switch."""
    if form_encode:
        client_id, client_secret = quote_plus(client_id), quote_plus(client_secret)
    raw = f"{client_id}:{client_secret}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _scope_tokens(scope: str) -> set[str]:
    return set(scope.split())


def build_refresh_request(
    profile: Profile, *, refresh_token: str, granted_scope: str
) -> httpx.Request:
    """The request for one refresh. A configured scope wider than the one
    originally granted is refused here, before anything is sent (RFC 6749 §6)."""
    params: dict[str, str] = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if profile.scope:
        wider = _scope_tokens(profile.scope) - _scope_tokens(granted_scope)
        if granted_scope and wider:
            raise Permanent("scope_wider_than_grant", " ".join(sorted(wider)))
        params["scope"] = profile.scope
    params.update(profile.extra_params)
    headers = {"Accept": "application/json"}
    if profile.auth_method is AuthMethod.CLIENT_SECRET_BASIC:
        headers["Authorization"] = basic_credentials(
            profile.client_id, profile.client_secret, form_encode=profile.basic_form_encode
        )
    elif profile.auth_method is AuthMethod.CLIENT_SECRET_POST:
        params["client_id"] = profile.client_id
        params["client_secret"] = profile.client_secret
    else:
        params["client_id"] = profile.client_id
    if profile.body_format is BodyFormat.JSON:
        headers["Content-Type"] = "application/json"
        content = json.dumps(params).encode()
    else:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        content = urlencode(params).encode()
    return httpx.Request("POST", profile.token_url, headers=headers, content=content)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _error_code(body: dict[str, Any] | None) -> str | None:
    if body is None:
        return None
    if body.get("ok") is False:  # Slack's Web API convention
        return str(body.get("error") or "rejected")
    code = body.get("error")
    if isinstance(code, str) and code:
        return code
    status = body.get("status")  # HubSpot: {"status": "BAD_REFRESH_TOKEN", ...}
    if isinstance(status, str) and status.isupper():
        return status.lower()
    return None


def _reason(code: str) -> str:
    """Provider error codes become metric labels: keep the vocabulary bounded."""
    return code if code in _PERMANENT_ERRORS | _TRANSIENT_ERRORS else "rejected"


def _refusal(code: str, status: int, retry_after: float | None) -> RefreshFailure:
    if code in _TRANSIENT_ERRORS:
        return Transient(_reason(code), status=status, retry_after_s=retry_after)
    return Permanent(_reason(code), status=status)


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
    if isinstance(exp, int | float) and not isinstance(exp, bool) and math.isfinite(exp):
        return int(exp * 1000)
    return None


def _lifetime_s(body: dict[str, Any]) -> float | None:
    raw = body.get("expires_in")
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise Ambiguous("invalid_response", "expires_in is not a number")
    if isinstance(raw, str):
        try:
            raw = float(raw.strip())
        except ValueError:
            raise Ambiguous("invalid_response", "expires_in is not a number") from None
    if not isinstance(raw, int | float) or not math.isfinite(raw):
        raise Ambiguous("invalid_response", "expires_in is not a number")
    if not 0 < raw <= _MAX_LIFETIME_S:
        raise Ambiguous("invalid_response", "expires_in out of range")
    return float(raw)


def parse_token_answer(
    answer: HttpAnswer,
    profile: Profile,
    *,
    now_ms: int,
    old_refresh_token: str,
    old_scope: str,
) -> TokenSet:
    status = answer.status
    body = None if answer.truncated else _json_object(answer.body)
    retry_after = parse_retry_after(answer.headers.get("retry-after"), now_s=time.time())
    code = _error_code(body)
    if 200 <= status < 300:
        if code is not None:
            raise _refusal(code, status, retry_after)
        if body is None:
            raise Ambiguous("invalid_response", "2xx answer is not a JSON object", status=status)
        return _token_set(body, profile, now_ms, old_refresh_token, old_scope)
    if status in (502, 504):
        raise Ambiguous("gateway_error", status=status)
    if status == 429:
        raise Transient("throttled", status=status, retry_after_s=retry_after)
    if status == 403 and body is None:
        raise Transient("throttled", "403 without a JSON body", status=status,
                        retry_after_s=retry_after)  # fmt: skip
    if status >= 500 or status == 408:
        raise Transient("server_error", status=status, retry_after_s=retry_after)
    if code is not None:
        raise _refusal(code, status, retry_after)
    raise Permanent("unauthorized" if status == 401 else "rejected", status=status)


def _token_set(
    body: dict[str, Any], profile: Profile, now_ms: int, old_refresh_token: str, old_scope: str
) -> TokenSet:
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise Ambiguous("invalid_response", "access_token missing")
    new_refresh = body.get("refresh_token")
    if new_refresh is not None and not isinstance(new_refresh, str):
        raise Ambiguous("invalid_response", "refresh_token is not a string")
    token_type = body.get("token_type", "Bearer")
    scope = body.get("scope", old_scope)
    if not isinstance(token_type, str) or not isinstance(scope, str | list):
        raise Ambiguous("invalid_response", "token_type or scope has the wrong type")
    if isinstance(scope, list):
        scope = " ".join(str(s) for s in scope)
    lifetime = _lifetime_s(body)
    if lifetime is not None:
        expires_at_ms = now_ms + int(lifetime * 1000)
    else:
        expires_at_ms = jwt_expiry_ms(access_token) or now_ms + int(
            profile.default_lifetime_s * 1000
        )
    return TokenSet(
        access_token=access_token,
        # RFC 6749 §5.1: refresh_token is optional; keep the old one (Google, Dropbox)
        refresh_token=new_refresh or old_refresh_token,
        token_type=token_type,
        expires_at_ms=expires_at_ms,
        scope=scope,
        rotated=bool(new_refresh) and new_refresh != old_refresh_token,
    )
