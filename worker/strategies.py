"""The request each strategy sends, shaped by the profile.

- ``oauth2_refresh_token``: RFC 6749 §6, ``grant_type=refresh_token``; a
  configured scope wider than the grant's original scope, or any configured
  scope for a credential whose grant scope is unknown, is refused before
  anything is sent (RFC 6749 §6, webMethods: "cannot contain any scope
  tokens that were not in the original request").
- ``api_token_exchange``: a long-lived API token traded for an access token
  (VMware CSP: form field ``api_token``, optional MFA ``passcode``; no
  ``grant_type``, no client authentication).
- ``secret_rotation``: a call to a rotation endpoint (Workato: ``PUT``, no
  body) with ``Authorization: Bearer <the profile's client_secret>``, a
  long-lived API token of the caller that the call does not consume; the
  answer's new secret is the credential's output (its access token).
- ``client_credentials``: ``grant_type=client_credentials``, re-issued
  before expiry; nothing single-use is spent.

The answer is read by ``worker.answers.read_answer`` for every strategy.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from functools import lru_cache
from urllib.parse import quote_plus, urlencode

from multidict import CIMultiDict

from worker.errors import Permanent
from worker.profile import AuthMethod, BodyFormat, Profile, Strategy
from worker.transport import TokenRequest
from worker.urltemplate import parse_url_template

__all__ = ["basic_credentials", "build_request", "token_url"]


@lru_cache(maxsize=256)  # a handful of profiles; the header is the same every refresh
def basic_credentials(client_id: str, client_secret: str, *, form_encode: bool) -> str:
    """RFC 6749 §2.3.1: id and secret are form-encoded (Appendix B) before
    base64, so ``+``, ``:`` and ``%`` survive. Some servers skip the decode
    step, hence the per-profile switch."""
    if form_encode:
        client_id, client_secret = quote_plus(client_id), quote_plus(client_secret)
    raw = f"{client_id}:{client_secret}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def token_url(profile: Profile, params: Mapping[str, str]) -> str:
    """The profile's URL with ``{name}`` placeholders filled from the
    credential's params, each percent-encoded as one path segment or query
    value (``worker.urltemplate``); a param that is ``.``, ``..`` or empty
    is a ``ConfigError``, so the refresh stops as a config failure."""
    if not profile.url_params:
        return profile.token_url
    return parse_url_template(profile.token_url).fill(params)


def _refuse_unsafe_headers(headers: Mapping[str, str], url: str) -> None:
    """Defence in depth: values are checked when profiles and credentials are
    written, but a stored value may predate those checks (a profile written
    by an earlier release). A header value with CR/LF or another
    control character is never sent; the message names the header only."""
    for name, value in headers.items():
        if not value.isprintable():  # C speed; headers are visible ASCII anyway
            raise Permanent("unsafe_request", f"header {name} holds a control character")
    if not url.isprintable():
        raise Permanent("unsafe_request", "the token URL holds a control character")


def _form(body: Mapping[str, str], *, secret_name: str) -> str:
    """``urlencode(body)``, with every pair but the secret's encoded once per
    process: the rest of a profile's body is the same on every refresh, and
    urlencode's per-character quoting was a tenth of building a request.
    The secret is encoded afresh each time and never cached."""
    return "&".join(
        [
            f"{quote_plus(k)}={quote_plus(v)}" if k == secret_name else _form_pair(k, v)
            for k, v in body.items()
        ]
    )


@lru_cache(maxsize=1024)
def _form_pair(name: str, value: str) -> str:
    return f"{quote_plus(name)}={quote_plus(value)}"


def _scope_tokens(scope: str) -> set[str]:
    return set(scope.split())


def _check_scope(requested: str, granted_scope: str) -> None:
    """RFC 6749 §6: never more than the grant's original scope. Unknown
    (nothing recorded at import) is refused too: sending a guess could end
    the grant as ``invalid_scope`` at a strict server."""
    if not granted_scope.strip():
        raise Permanent(
            "scope_unknown",
            "the profile asks for a scope but the credential has no recorded grant scope; "
            "import it again with its scope",
        )
    wider = _scope_tokens(requested) - _scope_tokens(granted_scope)
    if wider:
        raise Permanent("scope_wider_than_grant", " ".join(sorted(wider)))


def _grant_params(profile: Profile, secret: str, granted_scope: str) -> dict[str, str]:
    params: dict[str, str] = {}
    strategy = profile.strategy
    if strategy is Strategy.OAUTH2_REFRESH_TOKEN:
        params["grant_type"] = "refresh_token"
    elif strategy is Strategy.CLIENT_CREDENTIALS:
        params["grant_type"] = "client_credentials"
    if profile.effective_token_param:
        params[profile.effective_token_param] = secret
    if profile.scope and strategy in (Strategy.OAUTH2_REFRESH_TOKEN, Strategy.CLIENT_CREDENTIALS):
        if strategy is Strategy.OAUTH2_REFRESH_TOKEN:
            _check_scope(profile.scope, granted_scope)
        params["scope"] = profile.scope
    if profile.redirect_uri:
        params["redirect_uri"] = profile.redirect_uri
    params.update(profile.extra_params)
    params.update(profile.secret_params)
    return params


def build_request(
    profile: Profile,
    *,
    secret: str,
    granted_scope: str = "",
    params: Mapping[str, str] | None = None,
) -> TokenRequest:
    """The request for one refresh. ``secret`` is what the strategy spends:
    the refresh token or the API token (unused by secret_rotation and
    client_credentials). ``granted_scope`` is the grant's original scope
    (``Claimed.original_scope``), not the latest answer's."""
    body = _grant_params(profile, secret, granted_scope)
    headers = {"Accept": profile.accept}
    auth = profile.auth_method
    if auth is AuthMethod.CLIENT_SECRET_BASIC:
        headers["Authorization"] = basic_credentials(
            profile.client_id, profile.client_secret, form_encode=profile.basic_form_encode
        )
    elif auth is AuthMethod.CLIENT_SECRET_POST:
        body["client_id"] = profile.client_id
        body["client_secret"] = profile.client_secret
    elif auth is AuthMethod.BEARER:
        headers["Authorization"] = f"Bearer {profile.client_secret}"
    elif profile.client_id:
        body["client_id"] = profile.client_id  # public client (none)
    if profile.client_id_in_body:
        body["client_id"] = profile.client_id  # SmartThings: Basic and client_id in the body
    url = token_url(profile, params or {})
    query: dict[str, str] = {}
    content = b""
    if profile.body_format is BodyFormat.QUERY:
        query = body
    elif body and profile.body_format is BodyFormat.JSON:
        headers["Content-Type"] = "application/json"
        content = json.dumps(body).encode()
    elif body:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        content = _form(body, secret_name=profile.effective_token_param).encode()
    if query:
        url = f"{url}{'&' if '?' in url else '?'}{urlencode(query)}"
    if profile.fresh_connection:
        headers["Connection"] = "close"  # and never pooled afterwards (worker.connpool)
    _refuse_unsafe_headers(headers, url)
    return TokenRequest(
        profile.method,
        url,
        CIMultiDict(headers),
        content,
        allow_private_network=profile.allow_private_network,
        fresh_connection=profile.fresh_connection,
    )
