"""Values that cross module boundaries: profiles, credentials, claims.

Validation lives here, at construction, so a bad profile or import line is
refused when it is written ("token_url must be https://") instead of
failing in the worker hours later.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from worker.errors import ConfigError

__all__ = [
    "AuthMethod",
    "BodyFormat",
    "Claimed",
    "Credential",
    "CredentialInput",
    "Profile",
    "Rotation",
    "Status",
    "validate_id",
]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$")


def validate_id(kind: str, value: object) -> str:
    """Ids become parts of Redis keys; keep them printable and bounded."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ConfigError(
            f"{kind} id must be 1-200 characters of letters, digits and ._:@- "
            f"(starting with a letter or digit), got {value!r}"
        )
    return value


class Status(StrEnum):
    ACTIVE = "active"
    NEEDS_REAUTH = "needs_reauth"
    QUARANTINED = "quarantined"
    DISABLED = "disabled"


class AuthMethod(StrEnum):
    CLIENT_SECRET_BASIC = "client_secret_basic"  # noqa: S105 - a method name
    CLIENT_SECRET_POST = "client_secret_post"  # noqa: S105 - a method name
    NONE = "none"


class BodyFormat(StrEnum):
    FORM = "form"
    JSON = "json"


class Rotation(StrEnum):
    """Whether the provider replaces the refresh token on use. It decides
    what an unanswered request means: with ``never`` the same token may be
    sent again; otherwise only inside ``reuse_grace_s``."""

    NEVER = "never"
    ALWAYS = "always"
    MAYBE = "maybe"


def _enum(kind: type[StrEnum], name: str, value: object) -> Any:
    try:
        return kind(str(value))
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}") from None


def _number(name: str, value: object, *, low: float, high: float) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {number:g}")
    return number


def _flag(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in {"1", "true", "yes"}:
        return True
    if str(value).lower() in {"0", "false", "no", ""}:
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True, slots=True)
class Profile:
    """How to refresh the credentials of one provider client.

    ``client_secret`` is the only secret; ``public()`` leaves it out, and it
    is stored through the store's secret codec.
    """

    id: str
    token_url: str
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    auth_method: AuthMethod = AuthMethod.CLIENT_SECRET_BASIC
    basic_form_encode: bool = True
    body_format: BodyFormat = BodyFormat.FORM
    scope: str = ""
    extra_params: Mapping[str, str] = field(default_factory=dict)
    rotation: Rotation = Rotation.MAYBE
    reuse_grace_s: float = 0.0
    refresh_lead_s: float = 0.0
    default_lifetime_s: float = 3600.0
    timeout_s: float = 10.0
    allow_http: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        validate_id("profile", self.id)
        set_ = object.__setattr__
        set_(self, "auth_method", _enum(AuthMethod, "auth_method", self.auth_method))
        set_(self, "body_format", _enum(BodyFormat, "body_format", self.body_format))
        set_(self, "rotation", _enum(Rotation, "rotation", self.rotation))
        set_(self, "basic_form_encode", _flag("basic_form_encode", self.basic_form_encode))
        set_(self, "allow_http", _flag("allow_http", self.allow_http))
        for name, low, high in (
            ("reuse_grace_s", 0, 30 * 86400),
            ("refresh_lead_s", 0, 30 * 86400),
            ("default_lifetime_s", 10, 400 * 86400),
            ("timeout_s", 0.5, 120),
        ):
            set_(self, name, _number(name, getattr(self, name), low=low, high=high))
        parts = urlsplit(self.token_url)
        if parts.scheme not in {"https", "http"} or not parts.hostname:
            raise ConfigError(f"token_url must be an absolute https:// URL, got {self.token_url!r}")
        if parts.scheme == "http" and not self.allow_http:
            raise ConfigError(
                "token_url must use https:// (set allow_http only for local test endpoints)"
            )
        if parts.username or parts.password:
            raise ConfigError("token_url must not carry credentials; use client_id/client_secret")
        if self.auth_method is not AuthMethod.NONE and not (self.client_id and self.client_secret):
            raise ConfigError(
                f"auth_method {self.auth_method.value} needs client_id and client_secret"
            )
        if self.auth_method is AuthMethod.NONE and not self.client_id:
            raise ConfigError("auth_method none still needs client_id (public client)")
        extra = self.extra_params
        if isinstance(extra, str):
            try:
                extra = json.loads(extra) if extra else {}
            except ValueError:
                raise ConfigError("extra_params must be a JSON object of strings") from None
        if not isinstance(extra, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
        ):
            raise ConfigError("extra_params must be an object of string values")
        reserved = {"grant_type", "refresh_token", "client_secret"} & set(extra)
        if reserved:
            raise ConfigError(f"extra_params may not set {', '.join(sorted(reserved))}")
        set_(self, "extra_params", dict(extra))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Profile:
        """Build from user input or a stored hash; unknown fields are refused
        so that a misspelt knob is not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"created_at", "updated_at"})
        if unknown:
            raise ConfigError(f"unknown profile field(s): {', '.join(unknown)}")
        if "id" not in data or "token_url" not in data:
            raise ConfigError("a profile needs at least id and token_url")
        return cls(**{k: v for k, v in data.items() if k in known})

    def public(self) -> dict[str, Any]:
        """Everything but the secret: what list and get return."""
        out = asdict(self)
        out.pop("client_secret")
        out["has_client_secret"] = bool(self.client_secret)
        out["extra_params"] = dict(self.extra_params)
        return out


@dataclass(frozen=True, slots=True)
class CredentialInput:
    """One credential as a user registers it (import line or API call)."""

    id: str
    profile: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at_ms: int
    token_type: str = "Bearer"  # noqa: S105 - a token type
    scope: str = ""

    @classmethod
    def from_json(cls, data: object, *, now_ms: int) -> CredentialInput:
        """Parse one import line; every message names the field, never its value."""
        if not isinstance(data, dict):
            raise ConfigError("line is not a JSON object")
        allowed = {
            "id",
            "profile",
            "access_token",
            "refresh_token",
            "expires_in",
            "expires_at",
            "scope",
            "token_type",
        }
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"unknown field(s): {', '.join(unknown)}")
        cred_id = validate_id("credential", data.get("id"))
        profile = validate_id("profile", data.get("profile"))
        for name in ("access_token", "refresh_token"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise ConfigError(f"{name} must be a non-empty string")
        for name in ("scope", "token_type"):
            if name in data and not isinstance(data[name], str):
                raise ConfigError(f"{name} must be a string")
        if ("expires_in" in data) == ("expires_at" in data):
            raise ConfigError("give exactly one of expires_in (seconds) or expires_at")
        if "expires_in" in data:
            secs = _number("expires_in", data["expires_in"], low=0, high=400 * 86400)
            expires_at_ms = now_ms + int(secs * 1000)
        else:
            at = _number("expires_at", data["expires_at"], low=0, high=1e14)
            # seconds and milliseconds since the epoch are both common
            expires_at_ms = int(at * 1000) if at < 1e11 else int(at)
        return cls(
            id=cred_id,
            profile=profile,
            access_token=data["access_token"],
            refresh_token=data["refresh_token"],
            expires_at_ms=expires_at_ms,
            token_type=data.get("token_type") or "Bearer",
            scope=data.get("scope", ""),
        )


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

    def public(self, *, reveal: bool = False) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = self.status.value
        if not reveal:
            out["access_token"] = "[hidden]" if self.access_token else ""
            out["refresh_token"] = "[hidden]" if self.refresh_token else ""
        return out


@dataclass(slots=True)
class Claimed:
    """A credential leased to this worker by one claim call."""

    id: str
    partition: int
    token: str
    due_ms: int
    profile: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    token_type: str
    scope: str
    expires_at_ms: int
    version: str
    failures: int
    ambiguous_at_ms: int | None
    recovered: bool
    claimed_at_ms: int
