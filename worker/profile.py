"""A provider profile: everything needed to refresh one client's credentials.

Every knob is validated when the profile is written, so a typo in a URL or
an unknown auth method is refused by ``profile create``, not discovered by
the worker at 3 a.m. Secrets (``client_secret``, ``secret_params``) are the
only fields ``public()`` leaves out; the store keeps them through the codec.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from worker.errors import ConfigError
from worker.masking import mask_fields
from worker.tokenhosts import check_token_host
from worker.urltemplate import parse_url_template

__all__ = [
    "AuthMethod",
    "BodyFormat",
    "ErrorClass",
    "ErrorRule",
    "Profile",
    "Rotation",
    "Strategy",
    "parse_number",
    "refuse_control_chars",
    "url_placeholders",
    "validate_id",
]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$")
_FIELD_PATH = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_PARAM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


def validate_id(kind: str, value: object) -> str:
    """Ids become parts of Redis keys; keep them printable and bounded."""
    if value is None:
        raise ConfigError(f"{kind} id is missing")
    if not isinstance(value, str):
        raise ConfigError(f"{kind} id must be a string, got {type(value).__name__}")
    if not _ID.fullmatch(value):
        raise ConfigError(
            f"{kind} id must be 1-200 characters of letters, digits and ._:@- "
            f"(starting with a letter or digit), got {value!r}"
        )
    return value


class Strategy(StrEnum):
    """One small strategy per kind of token endpoint."""

    OAUTH2_REFRESH_TOKEN = "oauth2_refresh_token"  # noqa: S105 - a strategy name
    API_TOKEN_EXCHANGE = "api_token_exchange"  # noqa: S105 - a strategy name
    SECRET_ROTATION = "secret_rotation"  # noqa: S105 - a strategy name
    CLIENT_CREDENTIALS = "client_credentials"


class AuthMethod(StrEnum):
    CLIENT_SECRET_BASIC = "client_secret_basic"  # noqa: S105 - a method name
    CLIENT_SECRET_POST = "client_secret_post"  # noqa: S105 - a method name
    NONE = "none"
    #: ``Authorization: Bearer <client_secret>``: a long-lived API token of the
    #: caller (Workato: the workspace's developer API client token), never
    #: the secret being rotated
    BEARER = "bearer"


class BodyFormat(StrEnum):
    FORM = "form"
    JSON = "json"
    QUERY = "query"  # parameters in the URL query string, empty body


class Rotation(StrEnum):
    """Whether the provider replaces the refresh token on use. It decides
    what an unanswered request means: with ``never`` the same token may be
    sent again; otherwise only inside ``reuse_grace_s``."""

    NEVER = "never"
    ALWAYS = "always"
    MAYBE = "maybe"


class ErrorClass(StrEnum):
    TRANSIENT = "transient"  # retry with backoff
    THROTTLED = "throttled"  # retry with backoff, honouring Retry-After
    REAUTH = "reauth"  # stop: a person must re-authorize
    CONFIG = "config"  # stop: the profile is wrong (URL, client, secret)
    UNKNOWN = "unknown"  # the grant may have been used: apply the rotation rule


@dataclass(frozen=True, slots=True)
class ErrorRule:
    """Maps an error answer to a class, ahead of the built-in table. All
    given conditions must hold: ``status`` (HTTP), ``error`` (the error code
    field), ``contains`` (a substring of the body)."""

    error_class: ErrorClass
    status: int | None = None
    error: str | None = None
    contains: str | None = None

    @classmethod
    def parse(cls, raw: object) -> ErrorRule:
        if isinstance(raw, ErrorRule):
            return raw
        if not isinstance(raw, Mapping):
            raise ConfigError("each error rule must be an object")
        unknown = set(raw) - {"class", "status", "error", "contains"}
        if unknown:
            raise ConfigError(f"unknown error rule field(s): {', '.join(sorted(unknown))}")
        status = raw.get("status")
        if status is not None and (
            isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599
        ):
            raise ConfigError(f"error rule status must be an HTTP status, got {status!r}")
        for name in ("error", "contains"):
            if raw.get(name) is not None and not isinstance(raw[name], str):
                raise ConfigError(f"error rule {name} must be a string")
        if status is None and raw.get("error") is None and raw.get("contains") is None:
            raise ConfigError("an error rule needs at least one of status, error, contains")
        return cls(
            error_class=_enum(ErrorClass, "error rule class", raw.get("class")),
            status=status,
            error=raw.get("error"),
            contains=raw.get("contains"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"class": self.error_class.value}
        for name in ("status", "error", "contains"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def _enum(kind: type[StrEnum], name: str, value: object) -> Any:
    try:
        return kind(str(value))
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}") from None


def parse_number(name: str, value: object, *, low: float, high: float, echo: bool = True) -> float:
    """``echo=False`` where the value might be a misplaced token (an import
    line's columns swapped): the message then never repeats it."""
    shown = f", got {value!r}" if echo else ""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number{shown}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name} must be a number{shown}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number")
    if not low <= number <= high:
        got = f", got {_plain(number)}" if echo else ""
        raise ConfigError(f"{name} must be between {_plain(low)} and {_plain(high)}{got}")
    return number


def _plain(number: float) -> str:
    """34,560,000 rather than ``:g``'s 3.456e+07 in a message."""
    number = float(number)
    if abs(number) >= 1e18:
        return f"{number:g}"
    return f"{int(number):,}" if number.is_integer() else f"{number:,.6g}"


def _flag(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in {"1", "true", "yes"}:
        return True
    if str(value).lower() in {"0", "false", "no", ""}:
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _json_value(name: str, value: object, default: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value) if value else default
        except ValueError:
            raise ConfigError(f"{name} must be JSON") from None
    return value


def _string_map(name: str, value: object) -> dict[str, str]:
    value = _json_value(name, value, {})
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and _PARAM_NAME.match(k) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(f"{name} must be an object of parameter names to string values")
    return dict(value)


def _string_list(name: str, value: object) -> tuple[str, ...]:
    value = _json_value(name, value, [])
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{name} must be a list of field names")
    if not all(isinstance(v, str) and _FIELD_PATH.match(v) for v in value):
        raise ConfigError(f"{name} must be a list of field names")
    return tuple(value)


def url_placeholders(url: str) -> frozenset[str]:
    """``{name}`` placeholders of a token URL, filled per credential from its
    ``params`` (e.g. Workato's access-profile id in the path); the rules are
    in ``worker.urltemplate``."""
    return parse_url_template(url).placeholders


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def refuse_control_chars(name: str, value: str) -> None:
    """CR/LF in a value that ends up in a header (or a secret that might)
    would let it add headers or split the request: refused when written,
    and again when a request is built (``worker.strategies``)."""
    if _CONTROL.search(value):
        raise ConfigError(f"{name} may not contain control characters (CR, LF, ...)")


_DEFAULT_TOKEN_PARAM = {
    "oauth2_refresh_token": "refresh_token",
    "api_token_exchange": "api_token",
    "secret_rotation": "",
    "client_credentials": "",
}


_STRING_FIELDS = (
    "id", "token_url", "method", "client_id", "client_secret", "token_param", "redirect_uri",
    "scope", "accept", "access_token_field", "refresh_token_field", "expires_in_field",
    "expires_at_field", "refresh_expires_in_field", "answer_root", "preset", "name",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Profile:
    """How to refresh the credentials of one provider client (see the
    README's "Providers" section for every knob and the presets)."""

    id: str
    token_url: str
    strategy: Strategy = Strategy.OAUTH2_REFRESH_TOKEN
    method: str = "POST"
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    auth_method: AuthMethod = AuthMethod.CLIENT_SECRET_BASIC
    basic_form_encode: bool = True
    client_id_in_body: bool = False
    body_format: BodyFormat = BodyFormat.FORM
    token_param: str = ""  # "" = the strategy's default (refresh_token, api_token)
    redirect_uri: str = ""
    scope: str = ""
    extra_params: Mapping[str, str] = field(default_factory=dict)
    secret_params: Mapping[str, str] = field(default_factory=dict, repr=False)
    accept: str = "application/json"
    access_token_field: str = "access_token"  # noqa: S105 - a field name
    refresh_token_field: str = "refresh_token"  # noqa: S105 - a field name
    expires_in_field: str = "expires_in"
    expires_at_field: str = ""
    refresh_expires_in_field: str = ""
    #: dotted path of the object that holds the answer's fields (Workato v2:
    #: ``data``); "" = the top level. Error answers are read whole.
    answer_root: str = ""
    keep_fields: tuple[str, ...] = ()
    rotation: Rotation = Rotation.MAYBE
    reuse_grace_s: float = 0.0
    refresh_lead_s: float = 0.0
    default_lifetime_s: float = 3600.0
    timeout_s: float = 10.0
    rate_limit_per_s: float = 0.0
    max_concurrency: int = 0
    error_rules: tuple[ErrorRule, ...] = ()
    allow_http: bool = False
    allow_private_network: bool = False
    fresh_connection: bool = False
    preset: str = ""
    name: str = ""
    # -- rate-limit burst, lifecycle and TLS (issue 13: sections 2, 3, 5) --
    #: requests allowed at once after an idle period (0: max(1, rate))
    rate_limit_burst: int = 0
    #: refresh at least this often, whatever the expiry (0: no keep-alive)
    max_refresh_interval_s: float = 0.0
    #: transient failures going on this long end as needs_reauth (gave_up)
    give_up_after_s: float = 4 * 86400.0
    #: PEM certificate(s) trusted for this profile's token host, on top of
    #: the system store and REFRESHD_CA_FILE
    ca_pem: str = ""

    def __post_init__(self) -> None:
        for name in _STRING_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string")
        validate_id("profile", self.id)
        set_ = object.__setattr__
        set_(self, "strategy", _enum(Strategy, "strategy", self.strategy))
        set_(self, "auth_method", _enum(AuthMethod, "auth_method", self.auth_method))
        set_(self, "body_format", _enum(BodyFormat, "body_format", self.body_format))
        set_(self, "rotation", _enum(Rotation, "rotation", self.rotation))
        flags = (
            "basic_form_encode",
            "client_id_in_body",
            "allow_http",
            "allow_private_network",
            "fresh_connection",
        )
        for name in flags:
            set_(self, name, _flag(name, getattr(self, name)))
        for name, low, high in (
            ("reuse_grace_s", 0, 365 * 86400),
            ("refresh_lead_s", 0, 30 * 86400),
            ("default_lifetime_s", 10, 400 * 86400),
            ("timeout_s", 0.5, 120),
            ("rate_limit_per_s", 0, 100_000),
            ("max_concurrency", 0, 100_000),
        ):
            set_(self, name, parse_number(name, getattr(self, name), low=low, high=high))
        set_(self, "max_concurrency", int(self.max_concurrency))
        self._check_lifecycle()
        method = str(self.method).upper()
        if method not in {"POST", "PUT", "GET"}:
            raise ConfigError(f"method must be POST, PUT or GET, got {self.method!r}")
        set_(self, "method", method)
        self._check_url()
        self._check_auth()
        set_(self, "extra_params", _string_map("extra_params", self.extra_params))
        set_(self, "secret_params", _string_map("secret_params", self.secret_params))
        self._check_control_chars()
        # scope is checked against the grant before sending: no back door
        reserved = {"grant_type", "client_secret", "scope", self.effective_token_param} - {""}
        clash = reserved & (set(self.extra_params) | set(self.secret_params))
        if clash:
            raise ConfigError(f"extra_params/secret_params may not set {', '.join(sorted(clash))}")
        for name in ("access_token_field", "refresh_token_field", "expires_in_field"):
            if not _FIELD_PATH.match(getattr(self, name)):
                raise ConfigError(f"{name} must be a field name or dotted path")
        for name in ("expires_at_field", "refresh_expires_in_field", "answer_root"):
            if getattr(self, name) and not _FIELD_PATH.match(getattr(self, name)):
                raise ConfigError(f"{name} must be a field name or dotted path")
        if self.token_param and not _PARAM_NAME.match(self.token_param):
            raise ConfigError("token_param must be a parameter name")
        if self.token_param and self.strategy is Strategy.SECRET_ROTATION:
            raise ConfigError("strategy secret_rotation sends no token parameter (token_param)")
        set_(self, "keep_fields", _string_list("keep_fields", self.keep_fields))
        rules = _json_value("error_rules", self.error_rules, [])
        if isinstance(rules, str | Mapping) or not isinstance(rules, Sequence):
            raise ConfigError("error_rules must be a list of rules")
        set_(self, "error_rules", tuple(ErrorRule.parse(r) for r in rules))

    def _check_lifecycle(self) -> None:
        """The issue-13 knobs: burst, keep-alive, give-up, CA."""
        set_ = object.__setattr__
        for name, low, high in (
            ("rate_limit_burst", 0, 100_000),
            ("max_refresh_interval_s", 0, 400 * 86400),
            ("give_up_after_s", 0, 400 * 86400),
        ):
            set_(self, name, parse_number(name, getattr(self, name), low=low, high=high))
        set_(self, "rate_limit_burst", int(self.rate_limit_burst))
        if 0 < self.max_refresh_interval_s < 60:
            raise ConfigError("max_refresh_interval_s must be 0 (off) or at least 60")
        if not isinstance(self.ca_pem, str):
            raise ConfigError("ca_pem must be a string")
        if self.ca_pem:
            from worker.tlstrust import check_pem

            check_pem(self.ca_pem)

    @property
    def effective_burst(self) -> int:
        """The rate limit's burst: the profile's, else one second's worth."""
        return self.rate_limit_burst or max(1, int(self.rate_limit_per_s))

    def _check_url(self) -> None:
        url = self.token_url
        parse_url_template(url)  # placeholders: plain names, whole segments or values
        parts = urlsplit(url)
        if parts.scheme not in {"https", "http"} or not parts.hostname:
            raise ConfigError(f"token_url must be an absolute https:// URL, got {url!r}")
        if parts.username or parts.password:
            raise ConfigError("token_url must not carry credentials; use client_id/client_secret")
        if parts.scheme == "http" and not (self.allow_http and self.allow_private_network):
            raise ConfigError(
                "token_url must use https:// (allow_http is for local test endpoints and "
                "needs allow_private_network as well)"
            )
        if not self.allow_private_network:
            check_token_host(parts.hostname)

    def _check_control_chars(self) -> None:
        for name in _STRING_FIELDS:
            refuse_control_chars(name, getattr(self, name))
        for name in ("extra_params", "secret_params"):
            for key, value in getattr(self, name).items():
                refuse_control_chars(f"{name}.{key}", value)

    def _check_auth(self) -> None:
        method = self.auth_method
        needs_secret = method in (AuthMethod.CLIENT_SECRET_BASIC, AuthMethod.CLIENT_SECRET_POST)
        if needs_secret and not (self.client_id and self.client_secret):
            raise ConfigError(f"auth_method {method.value} needs client_id and client_secret")
        if self.strategy is Strategy.CLIENT_CREDENTIALS and not needs_secret:
            raise ConfigError("strategy client_credentials needs client_secret_basic or _post")
        if self.strategy is Strategy.SECRET_ROTATION and method is not AuthMethod.BEARER:
            raise ConfigError("strategy secret_rotation authenticates with auth_method bearer")
        if method is AuthMethod.BEARER and not self.client_secret:
            raise ConfigError(
                "auth_method bearer sends client_secret as the bearer token (Workato: the "
                "workspace's developer API token); set it with --client-secret-env/-file/-stdin"
            )
        if self.strategy is Strategy.SECRET_ROTATION and self.rotation is not Rotation.NEVER:
            # the bearer is not consumed and the rotated secret is the output:
            # an unanswered request is sent again, never quarantined
            raise ConfigError(
                "strategy secret_rotation spends nothing single-use: rotation must be never "
                "(`--preset workato_secret` or `--rotation never`)"
            )
        public = self.strategy is Strategy.OAUTH2_REFRESH_TOKEN and method is AuthMethod.NONE
        if public and not self.client_id:
            raise ConfigError("auth_method none still needs client_id (public client)")
        if self.client_id_in_body and not self.client_id:
            raise ConfigError("client_id_in_body needs client_id")

    @property
    def effective_token_param(self) -> str:
        return self.token_param or _DEFAULT_TOKEN_PARAM[self.strategy.value]

    @property
    def uses_refresh_token(self) -> bool:
        """Does a credential hold something the strategy sends? Not for
        client_credentials (the client's own credentials re-issue) nor for
        secret_rotation (the profile's bearer authorizes; the rotated secret
        is the credential's output, its ``access_token``)."""
        return self.strategy not in (Strategy.CLIENT_CREDENTIALS, Strategy.SECRET_ROTATION)

    @property
    def url_params(self) -> frozenset[str]:
        return url_placeholders(self.token_url)

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

    def to_fields(self) -> dict[str, Any]:
        """Every field as plain JSON-able values (secrets included)."""
        out = asdict(self)
        for name in ("strategy", "auth_method", "body_format", "rotation"):
            out[name] = getattr(self, name).value
        out["extra_params"] = dict(self.extra_params)
        out["secret_params"] = dict(self.secret_params)
        out["keep_fields"] = list(self.keep_fields)
        out["error_rules"] = [r.to_json() for r in self.error_rules]
        return out

    def public(self) -> dict[str, Any]:
        """Everything but the secrets: what list and get return."""
        out = self.to_fields()
        out.pop("client_secret")
        out["has_client_secret"] = bool(self.client_secret)
        out["secret_params"] = sorted(self.secret_params)  # names only
        # a secret put in extra_params by mistake (secret_params is its place)
        out["extra_params"] = mask_fields(self.extra_params)
        return out
