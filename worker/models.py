"""Values that cross module boundaries: profiles, credentials, claims.

Validation lives here, at construction, so a bad profile or import line is
refused when it is written ("token_url must be https://") instead of
failing in the worker hours later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from worker.answer_fields import (
    MAX_SCOPE_BYTES,
    MAX_TOKEN_BYTES,
    MAX_TOKEN_TYPE_CHARS,
    utf8_len,
)
from worker.errors import ConfigError, SecretUnreadable
from worker.profile import (
    AuthMethod,
    BodyFormat,
    Profile,
    Rotation,
    Strategy,
    parse_number,
    refuse_control_chars,
    validate_id,
)
from worker.urltemplate import check_param_value

__all__ = [
    "AuthMethod",
    "BodyFormat",
    "Claimed",
    "Credential",
    "CredentialInput",
    "Profile",
    "Rotation",
    "Status",
    "Strategy",
    "validate_id",
]


class Status(StrEnum):
    ACTIVE = "active"
    NEEDS_REAUTH = "needs_reauth"
    QUARANTINED = "quarantined"
    DISABLED = "disabled"


#: caps on what a credential may hold (README "Importing credentials"); a
#: provider's answer is capped at 64 KiB whole and never refused for size
MAX_PARAMS = 32
MAX_PARAM_BYTES = 2048


def _check_sizes(cred: CredentialInput) -> None:
    """Refuse oversized fields by name, never echoing their values."""
    for name, value, cap in (
        ("access_token", cred.access_token, MAX_TOKEN_BYTES),
        ("refresh_token", cred.refresh_token, MAX_TOKEN_BYTES),
        ("scope", cred.scope, MAX_SCOPE_BYTES),
    ):
        if utf8_len(value) > cap:
            raise ConfigError(f"{name} is longer than {cap:,} bytes")
    if len(cred.token_type) > MAX_TOKEN_TYPE_CHARS:
        raise ConfigError(f"token_type is longer than {MAX_TOKEN_TYPE_CHARS} characters")
    if len(cred.params) > MAX_PARAMS:
        raise ConfigError(f"params has more than {MAX_PARAMS} entries")
    for key, value in cred.params.items():
        if utf8_len(key) > MAX_PARAM_BYTES or utf8_len(value) > MAX_PARAM_BYTES:
            raise ConfigError(f"a params entry is longer than {MAX_PARAM_BYTES:,} bytes")


@dataclass(frozen=True, slots=True)
class CredentialInput:
    """One credential as a user registers it (import line or API call).

    ``refresh_token`` holds whatever the strategy spends: a refresh token or
    a long-lived API token (api_token_exchange); client_credentials and
    secret_rotation need none (a rotated secret is the output: the current
    one, if known, is the ``access_token``). ``scope`` is the grant's: it is
    kept as ``granted_scope``, the most a refresh may ask for. ``params``
    fill the profile's URL placeholders (e.g. Workato's access-profile id)."""

    id: str
    profile: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at_ms: int
    token_type: str = "Bearer"  # noqa: S105 - a token type
    scope: str = ""
    params: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Size caps, for every way in (import line or API call): a 5 MB
        token was accepted once, and every refresh would have carried it."""
        _check_sizes(self)

    @classmethod
    def from_json(cls, data: object, *, now_ms: int) -> CredentialInput:
        """Parse one import line; every message names the field, never its value."""
        if not isinstance(data, dict):
            raise ConfigError("line is not a JSON object")
        allowed = {
            "id", "profile", "access_token", "refresh_token", "expires_in", "expires_at",
            "scope", "token_type", "params",
        }  # fmt: skip
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"unknown field(s): {', '.join(unknown)}")
        cred_id = validate_id("credential", data.get("id"))
        profile = validate_id("profile", data.get("profile"))
        for name in ("access_token", "refresh_token", "scope", "token_type"):
            if name in data and not isinstance(data[name], str):
                raise ConfigError(f"{name} must be a string")
        params = data.get("params", {})
        if not isinstance(params, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int) for k, v in params.items()
        ):
            raise ConfigError("params must be an object of string values")
        _refuse_unsafe_values(data, params)
        if ("expires_in" in data) == ("expires_at" in data):
            # a line with nothing but ids: name every missing part at once
            tokenless = not data.get("access_token") and not data.get("refresh_token")
            raise ConfigError(
                "give exactly one of expires_in (seconds) or expires_at"
                + ("; the line has no access_token or refresh_token either" if tokenless else "")
            )
        if "expires_in" in data:
            secs = parse_number(
                "expires_in", data["expires_in"], low=0, high=400 * 86400, echo=False
            )
            expires_at_ms = now_ms + int(secs * 1000)
        else:
            at = parse_number("expires_at", data["expires_at"], low=0, high=1e14, echo=False)
            # seconds and milliseconds since the epoch are both common
            expires_at_ms = int(at * 1000) if at < 1e11 else int(at)
        return cls(
            id=cred_id,
            profile=profile,
            access_token=data.get("access_token", ""),
            refresh_token=data.get("refresh_token", ""),
            expires_at_ms=expires_at_ms,
            token_type=data.get("token_type") or "Bearer",
            scope=data.get("scope", ""),
            params={k: str(v) for k, v in params.items()},
        )

    def check_against(self, profile: Profile) -> None:
        """Import-time checks that need the profile: never at refresh time."""
        if profile.uses_refresh_token and not self.refresh_token:
            what = {
                "api_token_exchange": "the API token (refresh_token field)",
            }.get(profile.strategy.value, "refresh_token")
            raise ConfigError(f"profile {profile.id} needs {what}")
        if profile.strategy is Strategy.SECRET_ROTATION and self.refresh_token:
            # the old semantics (README, Providers): nothing here is sent any more
            raise ConfigError(
                f"profile {profile.id} rotates a secret: give the current secret as "
                "access_token, not refresh_token (the profile's client_secret authorizes)"
            )
        missing = sorted(profile.url_params - set(self.params))
        if missing:
            raise ConfigError(f"params must set {', '.join(missing)} (used in the token URL)")
        for name in sorted(profile.url_params):
            check_param_value(name, self.params[name])


def _refuse_unsafe_values(data: Mapping[str, Any], params: Mapping[str, object]) -> None:
    """Tokens go into headers (``Bearer``) and params into the URL: a CR, LF
    or other control character could add a header or split the request.
    The message names the field, never the value."""
    for name in ("access_token", "refresh_token", "scope", "token_type"):
        if name in data:
            refuse_control_chars(name, data[name])
    for key, value in params.items():
        refuse_control_chars(f"params.{key}", str(value))


@dataclass(frozen=True, slots=True)
class Credential:
    """A stored credential. Tokens are decoded; ``public()`` masks them."""

    id: str
    profile: str
    status: Status
    version: int
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    token_type: str
    scope: str
    expires_at_ms: int
    failures: int
    last_error: str
    due_at_ms: int | None
    created_at_ms: int
    updated_at_ms: int
    refreshed_at_ms: int | None
    in_flight: bool
    last_error_at_ms: int | None = None
    refresh_expires_at_ms: int | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: the grant's original scope (set at import, kept across refreshes);
    #: ``scope`` is the latest answer's, which may be narrower
    granted_scope: str = ""

    def public(self, *, reveal: bool = False) -> dict[str, Any]:
        from worker.masking import HIDDEN, mask_fields

        out = asdict(self)
        out["status"] = self.status.value
        out["params"] = dict(self.params)
        out["extra"] = dict(self.extra)
        if not reveal:
            out["access_token"] = HIDDEN if self.access_token else ""
            out["refresh_token"] = HIDDEN if self.refresh_token else ""
            out["extra"] = mask_fields(self.extra)  # id_token, idToken, signing_key...
            out["params"] = mask_fields(self.params)  # a passcode given per credential
        return out


@dataclass(slots=True)
class Claimed:
    """A credential leased to this worker by one claim call."""

    id: str
    partition: int
    token: str
    due_ms: int
    profile: str
    refresh_token: str = field(repr=False)  # the access token is not read: it is replaced
    token_type: str
    scope: str
    expires_at_ms: int
    version: str
    failures: int
    ambiguous_at_ms: int | None
    recovered: bool
    claimed_at_ms: int
    params: Mapping[str, str] = field(default_factory=dict)
    #: when the current streak of failures began (None: no streak, or unknown)
    failing_since_ms: int | None = None
    #: when the refresh token itself expires, if the provider said
    refresh_expires_at_ms: int | None = None
    granted_scope: str = ""  # "" for a credential stored before it was recorded
    #: the stored refresh token does not decrypt with this worker's key ring
    #: (``worker.keyring``): nothing may be sent, the credential stops
    unreadable: SecretUnreadable | None = field(default=None, compare=False)

    @property
    def original_scope(self) -> str:
        """The most a refresh may ask for: the grant's scope as imported,
        else (stored by an earlier release) the latest answer's."""
        return self.granted_scope or self.scope
