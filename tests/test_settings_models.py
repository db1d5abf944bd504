"""Input validation at the edges: ``REFRESHD_*`` settings, provider profiles
and credential import lines. Bad input is refused when it is written, with a
message that names what is wrong and never echoes a secret."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.errors import ConfigError
from worker.models import CredentialInput, Profile
from worker.settings import Settings

# ------------------------------------------------------------- settings


def test_defaults_without_any_variable() -> None:
    settings = Settings.from_env({"PATH": "/usr/bin", "HOME": "/root"})
    assert settings.redis_url is None
    assert settings.partitions == 16
    assert settings.lease_s == 30.0
    assert settings.strict_server is True
    assert settings.unsafe_redis == frozenset()  # refuse an unsafe Redis


def test_variables_are_parsed_to_their_types() -> None:
    settings = Settings.from_env(
        {
            "REFRESHD_REDIS_URL": "redis://127.0.0.1:6390/2",
            "REFRESHD_DATA_DIR": "/var/lib/refreshd",
            "REFRESHD_PARTITIONS": " 4 ",
            "REFRESHD_LEASE_SECONDS": "12.5",
            "REFRESHD_STRICT_SERVER": "yes",
            "REFRESHD_DURABILITY": "fsync",
        }
    )
    assert settings.redis_url == "redis://127.0.0.1:6390/2"
    assert settings.data_dir == Path("/var/lib/refreshd")
    assert settings.partitions == 4
    assert settings.lease_s == 12.5
    assert settings.strict_server is True
    assert settings.durability == "fsync"


def test_an_empty_variable_means_the_default() -> None:
    assert Settings.from_env({"REFRESHD_PARTITIONS": ""}).partitions == 16


def test_overrides_win_over_the_environment() -> None:
    settings = Settings.from_env({"REFRESHD_PARTITIONS": "4"}, partitions=8)
    assert settings.partitions == 8


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        *[("1", True), ("true", True), ("YES", True), ("on", True)],
        *[("0", False), ("false", False), ("No", False), ("off", False)],
    ],
)
def test_boolean_spellings(raw: str, value: bool) -> None:
    # the one boolean setting left only accepts true (false would opt out of
    # the server check, which now takes the hazards by name)
    if value:
        assert Settings.from_env({"REFRESHD_STRICT_SERVER": raw}).strict_server is True
    else:
        with pytest.raises(ConfigError, match="REFRESHD_STRICT_SERVER=false no longer"):
            Settings.from_env({"REFRESHD_STRICT_SERVER": raw})


def test_an_unknown_variable_is_refused_by_name() -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"REFRESHD_CONCURENCY": "4", "REFRESHD_LEASE": "9", "OTHER_X": "1"})
    message = str(refused.value)
    assert "REFRESHD_CONCURENCY" in message
    assert "REFRESHD_LEASE" in message
    assert "OTHER_X" not in message  # only our prefix is ours to police


@pytest.mark.parametrize(
    ("name", "raw", "kind"),
    [
        ("REFRESHD_PARTITIONS", "many", "integer"),
        ("REFRESHD_CONCURRENCY", "1.5", "integer"),
        ("REFRESHD_HTTP_PORT", "80a", "integer"),
        ("REFRESHD_LEASE_SECONDS", "30s", "number"),
        ("REFRESHD_LEAD_FRACTION", "20%", "number"),
        ("REFRESHD_STRICT_SERVER", "maybe", "boolean"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_variable(name: str, raw: str, kind: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({name: raw})
    message = str(refused.value)
    assert name in message
    assert kind in message
    assert repr(raw) in message


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"REFRESHD_PARTITIONS": "0"}, "REFRESHD_PARTITIONS must be at least 1"),
        ({"REFRESHD_CONCURRENCY": "0"}, "REFRESHD_CONCURRENCY must be at least 1"),
        ({"REFRESHD_CLAIM_BATCH": "-1"}, "REFRESHD_CLAIM_BATCH must be at least 1"),
        ({"REFRESHD_LEASE_SECONDS": "4.9"}, "REFRESHD_LEASE_SECONDS must be at least 5"),
        ({"REFRESHD_LEASE_SECONDS": "nan"}, "REFRESHD_LEASE_SECONDS"),
        ({"REFRESHD_SPEND_MARGIN_SECONDS": "0"}, "REFRESHD_SPEND_MARGIN_SECONDS"),
        ({"REFRESHD_SPEND_MARGIN_SECONDS": "15"}, "under half the lease"),
        (
            {"REFRESHD_LEASE_SECONDS": "10", "REFRESHD_SPEND_MARGIN_SECONDS": "5"},
            "under half the lease",
        ),
        ({"REFRESHD_DRAIN_GRACE_SECONDS": "-1"}, "REFRESHD_DRAIN_GRACE_SECONDS"),
        ({"REFRESHD_IDLE_WAKEUP_SECONDS": "0"}, "REFRESHD_IDLE_WAKEUP_SECONDS"),
        ({"REFRESHD_HTTP_PORT": "70000"}, "REFRESHD_HTTP_PORT"),
        ({"REFRESHD_HTTP_PORT": "-1"}, "REFRESHD_HTTP_PORT"),
        ({"REFRESHD_DURABILITY": "always"}, "REFRESHD_DURABILITY must be one of"),
        ({"REFRESHD_LEAD_FRACTION": "1"}, "REFRESHD_LEAD_FRACTION"),
        ({"REFRESHD_LEAD_FRACTION": "0"}, "REFRESHD_LEAD_FRACTION"),
        ({"REFRESHD_LEAD_MIN_SECONDS": "-1"}, "REFRESHD_LEAD_MIN_SECONDS"),
        ({"REFRESHD_LEAD_MAX_SECONDS": "10"}, "REFRESHD_LEAD_MAX_SECONDS"),
        ({"REFRESHD_BACKOFF_BASE_SECONDS": "0"}, "REFRESHD_BACKOFF_BASE_SECONDS"),
        ({"REFRESHD_BACKOFF_MAX_SECONDS": "0.5"}, "REFRESHD_BACKOFF_MAX_SECONDS"),
        ({"REFRESHD_LOG_LEVEL": "verbose"}, "REFRESHD_LOG_LEVEL"),
        ({"REFRESHD_LOG_FORMAT": "xml"}, "REFRESHD_LOG_FORMAT"),
    ],
)
def test_out_of_range_values_are_refused_with_a_clear_message(
    env: dict[str, str], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Settings.from_env(env)


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.partitions = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("REFRESHD_PARTITIONS", "20000"),
        ("REFRESHD_PREFIX", "{tenant}:"),
        ("REFRESHD_PREFIX", "refresh d:"),
        ("REFRESHD_LEASE_SECONDS", "inf"),
        ("REFRESHD_BACKOFF_MAX_SECONDS", "inf"),
    ],
)
def test_values_that_cannot_work_are_refused_at_start(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: raw})


# ------------------------------------------------------------- profiles

SECRET = "S3cr3t-client-secret-value"


def profile(**overrides: Any) -> Profile:
    fields: dict[str, Any] = {
        "id": "acme",
        "token_url": "https://idp.example/oauth/token",
        "client_id": "cid",
        "client_secret": SECRET,
    }
    return Profile(**(fields | overrides))


def refused(message_part: str, **overrides: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        profile(**overrides)
    message = str(caught.value)
    assert message_part in message
    assert SECRET not in message
    return message


def test_a_valid_profile_with_defaults() -> None:
    p = profile()
    assert p.auth_method == "client_secret_basic"
    assert p.body_format == "form"
    assert p.timeout_s == 10.0
    assert p.allow_http is False


def test_plain_http_is_refused() -> None:
    assert "https" in refused("token_url", token_url="http://idp.example/token")


@pytest.mark.parametrize("flag", [True, "true", "1", "yes"])
def test_plain_http_is_allowed_with_allow_http(flag: object) -> None:
    p = profile(
        token_url="http://127.0.0.1:8080/token", allow_http=flag, allow_private_network=True
    )
    assert p.allow_http is True


@pytest.mark.parametrize(
    "url", ["idp.example/token", "/oauth/token", "ftp://idp.example/token", "https://", ""]
)
def test_a_token_url_must_be_absolute_https(url: str) -> None:
    refused("token_url", token_url=url)


def test_credentials_in_the_url_are_refused_without_echoing_them() -> None:
    message = refused("credentials", token_url=f"https://cid:{SECRET}@idp.example/token")
    assert SECRET not in message


def test_client_secret_basic_needs_a_secret() -> None:
    refused("client_secret_basic", client_secret="")


def test_client_secret_post_needs_an_id() -> None:
    refused("client_secret_post", auth_method="client_secret_post", client_id="")


def test_a_public_client_needs_an_id_but_no_secret() -> None:
    assert profile(auth_method="none", client_secret="").client_secret == ""
    refused("client_id", auth_method="none", client_id="", client_secret="")


def test_an_unknown_auth_method_lists_the_allowed_ones() -> None:
    message = refused("auth_method", auth_method="basic")
    assert "client_secret_basic" in message
    assert "client_secret_post" in message


@pytest.mark.parametrize("profile_id", ["", "has space", "-leading", "x" * 201, "a/b"])
def test_a_bad_profile_id_is_refused(profile_id: str) -> None:
    refused("profile id", id=profile_id)


def test_an_unknown_field_is_refused_by_name_without_its_value() -> None:
    data = {
        "id": "acme",
        "token_url": "https://idp.example/token",
        "client_id": "cid",
        "client_secert": SECRET,  # misspelt: must not be silently ignored
    }
    with pytest.raises(ConfigError) as caught:
        Profile.from_mapping(data)
    assert "client_secert" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_a_profile_needs_an_id_and_a_token_url() -> None:
    with pytest.raises(ConfigError, match="token_url"):
        Profile.from_mapping({"id": "acme"})


def test_stored_string_values_are_parsed() -> None:
    p = Profile.from_mapping(
        {
            "id": "acme",
            "token_url": "http://127.0.0.1/token",
            "client_id": "cid",
            "client_secret": SECRET,
            "allow_http": "1",
            "allow_private_network": "1",
            "basic_form_encode": "0",
            "timeout_s": "2.5",
            "extra_params": '{"audience": "api"}',
            "created_at": "1700000000000",
        }
    )
    assert p.allow_http is True
    assert p.basic_form_encode is False
    assert p.timeout_s == 2.5
    assert dict(p.extra_params) == {"audience": "api"}


@pytest.mark.parametrize("name", ["grant_type", "refresh_token", "client_secret"])
def test_extra_params_may_not_set_reserved_names(name: str) -> None:
    message = refused(name, extra_params={name: "x", "audience": "api"})
    assert "extra_params" in message


@pytest.mark.parametrize("value", ["{not json", '["a"]', {"n": 1}, {"n": None}])
def test_extra_params_must_be_an_object_of_strings(value: object) -> None:
    refused("extra_params", extra_params=value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("timeout_s", 0.1),
        ("timeout_s", 121),
        ("timeout_s", "abc"),
        ("timeout_s", True),
        ("timeout_s", float("nan")),
        ("timeout_s", "inf"),
        ("default_lifetime_s", 5),
        ("default_lifetime_s", 401 * 86400),
        ("reuse_grace_s", -1),
        ("refresh_lead_s", -0.5),
        ("refresh_lead_s", 31 * 86400),
    ],
)
def test_numbers_out_of_range_are_refused_by_name(name: str, value: object) -> None:
    refused(name, **{name: value})


def test_public_never_contains_the_secret() -> None:
    p = profile(extra_params={"audience": "api"})
    public = p.public()
    assert "client_secret" not in public
    assert public["has_client_secret"] is True
    assert public["client_id"] == "cid"
    assert public["extra_params"] == {"audience": "api"}
    assert SECRET not in json.dumps(public, default=str)
    assert SECRET not in repr(p)
    assert SECRET not in str(p)


def test_public_of_a_public_client() -> None:
    public = profile(auth_method="none", client_secret="").public()
    assert public["has_client_secret"] is False


# ------------------------------------------------------ credential lines

AT = "ya29.ACCESS-token-value"
RT = "1//REFRESH-token-value"
NOW_MS = 1_700_000_000_000


def line(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "cred-1",
        "profile": "acme",
        "access_token": AT,
        "refresh_token": RT,
        "expires_in": 3600,
    }
    for name, value in overrides.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return data


def test_a_line_with_expires_in() -> None:
    cred = CredentialInput.from_json(line(scope="read write"), now_ms=NOW_MS)
    assert (cred.id, cred.profile) == ("cred-1", "acme")
    assert (cred.access_token, cred.refresh_token) == (AT, RT)
    assert cred.expires_at_ms == NOW_MS + 3_600_000
    assert cred.token_type == "Bearer"
    assert cred.scope == "read write"
    assert AT not in repr(cred)
    assert RT not in repr(cred)


@pytest.mark.parametrize(
    ("expires_at", "ms"),
    [(1_700_003_600, 1_700_003_600_000), (1_700_003_600_000, 1_700_003_600_000)],
    ids=["seconds", "milliseconds"],
)
def test_a_line_with_expires_at_in_seconds_or_milliseconds(expires_at: int, ms: int) -> None:
    cred = CredentialInput.from_json(line(expires_in=None, expires_at=expires_at), now_ms=NOW_MS)
    assert cred.expires_at_ms == ms


def test_an_empty_token_type_means_bearer() -> None:
    assert CredentialInput.from_json(line(token_type=""), now_ms=NOW_MS).token_type == "Bearer"


def refused_line(data: object, *names: str) -> str:
    with pytest.raises(ConfigError) as caught:
        CredentialInput.from_json(data, now_ms=NOW_MS)
    message = str(caught.value)
    for name in names:
        assert name in message
    assert AT not in message
    assert RT not in message
    return message


def test_a_line_that_is_not_an_object() -> None:
    refused_line([AT, RT], "object")


def test_an_unknown_field_is_named_and_its_value_is_not() -> None:
    refused_line(line(**{"refresh-token": RT}), "refresh-token")


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"id": None}, ("credential id",)),
        ({"id": "has space"}, ("credential id",)),
        ({"profile": None}, ("profile id",)),
        ({"profile": 7}, ("profile id",)),
        ({"access_token": 12345}, ("access_token",)),
        ({"refresh_token": [RT]}, ("refresh_token",)),
        ({"refresh_token": {"value": RT}}, ("refresh_token",)),
        ({"scope": ["read"]}, ("scope",)),
        ({"token_type": 1}, ("token_type",)),
        ({"expires_at": 1_700_003_600}, ("expires_in", "expires_at")),
        ({"expires_in": None}, ("expires_in", "expires_at")),
        ({"expires_in": "soon"}, ("expires_in",)),
        ({"expires_in": -5}, ("expires_in",)),
        ({"expires_in": 401 * 86400}, ("expires_in",)),
        ({"expires_in": True}, ("expires_in",)),
        ({"expires_in": None, "expires_at": -1}, ("expires_at",)),
    ],
)
def test_each_error_names_its_field_and_never_a_token(
    overrides: dict[str, Any], names: tuple[str, ...]
) -> None:
    refused_line(line(**overrides), *names)


@pytest.mark.parametrize("field", ["expires_in", "expires_at"])
def test_a_token_in_a_numeric_field_is_not_echoed(field: str) -> None:
    data = line(expires_in=None, access_token="3600")
    data[field] = AT
    refused_line(data, field)
