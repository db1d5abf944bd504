"""Built-in profile presets: ``--preset smartthings`` and add only secrets.

Each preset sets the knobs a provider needs (sources in
``shared/PROVIDERS.md``); a user's own fields override them. Numbers that
providers change (grace windows, lifetimes) are starting points, not
truths: override them when the provider's current documentation differs.
A preset whose URL depends on the tenant leaves ``token_url`` to the user
(or uses a ``{placeholder}`` filled from each credential's ``params``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from worker.errors import ConfigError

__all__ = ["PRESETS", "apply_preset", "deprecation_notice", "reapply_preset"]

_KEEP_SMARTTHINGS = ["installed_app_id", "access_tier", "owner_account_id"]

#: every Workato rotation endpoint (PROVIDERS.md §3.2)
_WORKATO: dict[str, Any] = {
    "strategy": "secret_rotation",
    "method": "PUT",
    "auth_method": "bearer",  # client_secret: the developer API token
    "access_token_field": "secret",
    "rotation": "never",  # nothing single-use is sent: an unanswered PUT is asked again
    "reuse_grace_s": 0,
    "default_lifetime_s": 30 * 86400,  # how often to rotate
    "rate_limit_per_s": 10,  # API-platform endpoints: 10 requests/s per token
}

PRESETS: dict[str, dict[str, Any]] = {
    # --- the seed systems --------------------------------------------------
    "workato_secret": {
        # seed 000: PUT .../api_access_profiles/:id/refresh_secret, no body.
        # Bearer = the workspace's developer API token (client_secret), which
        # the call does not consume; the new secret is the output and the old
        # one dies at once. Deprecated by Workato on 2025-12-01.
        **_WORKATO,
        "token_url": "https://www.workato.com/api/api_access_profiles/"
        "{api_access_profile_id}/refresh_secret",
        "keep_fields": ["id", "name", "auth_type"],
    },
    "workato_api_key": {
        # its replacement: the API key's secret, the answer under "data"
        **_WORKATO,
        "token_url": "https://www.workato.com/api/v2/api_clients/{api_client_id}/"
        "api_keys/{api_key_id}/refresh_secret",
        "answer_root": "data",
        "access_token_field": "auth_token",
        "keep_fields": ["id", "name", "auth_type"],
    },
    "workato_api_key_embedded": {
        # the embedded-partner form: managed_user_id is the customer id or an
        # external id prefixed with E (percent-encoded as one path segment)
        **_WORKATO,
        "token_url": "https://www.workato.com/api/v2/managed_users/{managed_user_id}/"
        "api_clients/{api_client_id}/api_keys/{api_key_id}/refresh_secret",
        "answer_root": "data",
        "access_token_field": "auth_token",
        "keep_fields": ["id", "name", "auth_type"],
    },
    "vmware_csp": {
        # seed 001: API token -> access token; anonymous; form field api_token
        "strategy": "api_token_exchange",
        "token_url": "https://console.cloud.vmware.com/csp/gateway/am/api/auth/"
        "api-tokens/authorize",
        "auth_method": "none",
        "token_param": "api_token",
        "rotation": "never",  # the API token is reusable until its own TTL
        "keep_fields": ["id_token"],
        "default_lifetime_s": 1800,
    },
    "webmethods": {
        # seed 002: pub.oauth:refreshAccessToken on the user's Integration Server
        # (token_url required); POST, Basic, expires_in typed String
        "strategy": "oauth2_refresh_token",
        "method": "POST",
        "auth_method": "client_secret_basic",
        "rotation": "maybe",
    },
    "smartthings": {
        # seed 003: Basic + client_id in the body, form only, no redirect_uri;
        # refresh tokens rotate and die on use; an expired one gives 401
        "strategy": "oauth2_refresh_token",
        "token_url": "https://api.smartthings.com/v1/oauth/token",
        "auth_method": "client_secret_basic",
        "client_id_in_body": True,
        "body_format": "form",
        "rotation": "always",
        "reuse_grace_s": 0,
        "default_lifetime_s": 86400,
        "keep_fields": _KEEP_SMARTTHINGS,
    },
    "client_credentials": {
        "strategy": "client_credentials",
        "auth_method": "client_secret_basic",
        "rotation": "never",
    },
    # --- common providers ----------------------------------------------------
    "google": {
        "token_url": "https://oauth2.googleapis.com/token",
        "auth_method": "client_secret_post",
        "rotation": "never",
    },
    "microsoft": {
        # old refresh tokens stay valid after a rotation (no reuse detection)
        "token_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        "auth_method": "client_secret_post",
        "rotation": "always",
        "reuse_grace_s": 86400,
        "error_rules": [{"contains": "AADSTS50196", "class": "throttled"}],
    },
    "xero": {
        "token_url": "https://identity.xero.com/connect/token",
        "auth_method": "client_secret_basic",
        "rotation": "always",
        "reuse_grace_s": 1800,
    },
    "salesforce": {
        # no expires_in: set default_lifetime_s to the org's session timeout
        "token_url": "https://login.salesforce.com/services/oauth2/token",
        "auth_method": "client_secret_post",
        "rotation": "maybe",
        "default_lifetime_s": 7200,
        "keep_fields": ["instance_url", "id", "issued_at"],
    },
    "github": {
        # errors come back as HTTP 200; form answers unless Accept: JSON
        "token_url": "https://github.com/login/oauth/access_token",
        "auth_method": "client_secret_post",
        "rotation": "always",
        "refresh_expires_in_field": "refresh_token_expires_in",
    },
    "slack": {
        "token_url": "https://slack.com/api/oauth.v2.access",
        "auth_method": "client_secret_basic",
        "rotation": "always",
    },
    "hubspot": {
        "token_url": "https://api.hubapi.com/oauth/v1/token",
        "auth_method": "client_secret_post",
        "rotation": "never",
    },
    "intuit": {
        "token_url": "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer",
        "auth_method": "client_secret_basic",
        "rotation": "maybe",
        "refresh_expires_in_field": "x_refresh_token_expires_in",
    },
    "zoom": {
        "token_url": "https://zoom.us/oauth/token",
        "auth_method": "client_secret_basic",
        "rotation": "always",
    },
}


def _preset(name: object) -> dict[str, Any]:
    if name not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise ConfigError(f"unknown preset {name!r}; known presets: {known}")
    return dict(PRESETS[str(name)])


def apply_preset(data: Mapping[str, Any]) -> dict[str, Any]:
    """The preset's knobs under the user's fields; ``preset`` is recorded."""
    name = data.get("preset")
    if not name:
        return dict(data)
    merged = _preset(name)
    merged.update({k: v for k, v in data.items() if v is not None})
    if "token_url" not in merged:
        raise ConfigError(f"preset {name} needs token_url (the provider's host is yours)")
    return merged


def reapply_preset(current: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A stored profile's fields with ``changes`` over them. A ``preset``
    among the changes is applied again, as at creation: the knobs the
    stored preset set go back to their defaults, the new preset's knobs
    replace the stored values, and the other changes win over both (so a
    fixed preset reaches profiles made from an older one). Secrets and the
    fields no preset sets (client id, name, allow_*) are kept."""
    name = changes.get("preset")
    if not name:
        return dict(current) | dict(changes)
    preset = _preset(name)
    old = PRESETS.get(str(current.get("preset") or ""), {})
    merged = {k: v for k, v in current.items() if k not in old or k in ("id", "token_url")}
    if "token_url" in old and "token_url" not in preset and "token_url" not in changes:
        raise ConfigError(f"preset {name} needs token_url (the provider's host is yours)")
    merged |= preset
    merged |= {k: v for k, v in changes.items() if v is not None}
    return merged


#: endpoints their provider has deprecated: (path pattern, what to do)
_DEPRECATED = (
    (
        re.compile(r"/api/(?:managed_users/[^/]+/)?api_access_profiles/[^/]+/refresh_secret"),
        "Workato deprecated PUT /api/api_access_profiles/{id}/refresh_secret on 2025-12-01: "
        "move to preset workato_api_key (README, Providers)",
    ),
)


def deprecation_notice(token_url: str) -> str | None:
    """What to tell the operator when a profile points at an endpoint its
    provider has deprecated (said at ``profile create`` and ``update``)."""
    path = urlsplit(token_url).path.rstrip("/")
    for pattern, notice in _DEPRECATED:
        if pattern.fullmatch(path):
            return notice
    return None
