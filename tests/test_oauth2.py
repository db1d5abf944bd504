"""The refresh_token grant on the wire (worker/oauth2.py) and the transport
boundary that decides "could the provider have received the token?"
(worker/transport.py).

Request building and answer parsing are pure and tested directly. ``send``
is tested against tiny servers on 127.0.0.1 that misbehave on purpose; the
one that matters most reads the whole request and hangs up: the refresh
token reached the provider, so the outcome is Ambiguous, never NotSent.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
import httpx
import pytest
from anyio.abc import SocketAttribute, SocketStream

from worker.answer_fields import WARNINGS
from worker.errors import Ambiguous, ConfigError, NotSent, Permanent, RefreshFailure, Transient
from worker.models import Profile
from worker.oauth2 import TokenSet, build_refresh_request, parse_token_answer
from worker.strategies import build_request
from worker.transport import MAX_BODY_BYTES, HttpAnswer, TokenRequest, make_http_client, send

pytestmark = pytest.mark.anyio

NOW_MS = 1_700_000_000_000
OLD_RT = "rt-old/+=&x"
TOKEN_URL = "https://idp.example/oauth/token"


def profile(**overrides: Any) -> Profile:
    fields: dict[str, Any] = {
        "id": "p",
        "token_url": TOKEN_URL,
        "client_id": "cid",
        "client_secret": "csecret",
    }
    return Profile(**(fields | overrides))


def form(request: TokenRequest) -> dict[str, str]:
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    pairs = parse_qsl(request.content.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    assert len(pairs) == len(dict(pairs)), "a parameter is sent twice"
    return dict(pairs)


def basic_pair(request: TokenRequest) -> str:
    scheme, _, value = request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    return base64.b64decode(value, validate=True).decode()


# ------------------------------------------------------------- requests


def test_client_secret_basic_form_encodes_id_and_secret_before_base64() -> None:
    p = profile(client_id="my client+id:1%", client_secret="p@ss w+rd:%/")
    request = build_refresh_request(p, refresh_token=OLD_RT, granted_scope="")
    assert request.method == "POST"
    assert str(request.url) == TOKEN_URL
    assert request.headers["accept"] == "application/json"
    # RFC 6749 §2.3.1 / Appendix B: ' ' -> '+', '+' -> %2B, ':' -> %3A, '%' -> %25
    assert basic_pair(request) == "my+client%2Bid%3A1%25:p%40ss+w%2Brd%3A%25%2F"
    assert form(request) == {"grant_type": "refresh_token", "refresh_token": OLD_RT}


def test_client_secret_basic_raw_when_form_encoding_is_off() -> None:
    p = profile(client_id="my client+id", client_secret="p@ss w+rd:%/", basic_form_encode=False)
    request = build_refresh_request(p, refresh_token=OLD_RT, granted_scope="")
    assert basic_pair(request) == "my client+id:p@ss w+rd:%/"
    assert form(request) == {"grant_type": "refresh_token", "refresh_token": OLD_RT}


def test_client_secret_post_puts_the_client_in_the_body() -> None:
    p = profile(auth_method="client_secret_post", client_secret="s e+c:r%t")
    request = build_refresh_request(p, refresh_token=OLD_RT, granted_scope="")
    assert "authorization" not in request.headers
    assert form(request) == {
        "grant_type": "refresh_token",
        "refresh_token": OLD_RT,
        "client_id": "cid",
        "client_secret": "s e+c:r%t",
    }


def test_public_client_sends_its_id_and_no_secret() -> None:
    p = profile(auth_method="none", client_secret="")
    request = build_refresh_request(p, refresh_token=OLD_RT, granted_scope="")
    assert "authorization" not in request.headers
    assert form(request) == {
        "grant_type": "refresh_token",
        "refresh_token": OLD_RT,
        "client_id": "cid",
    }


def test_the_form_body_is_exactly_what_urlencode_writes() -> None:
    """The body is encoded pair by pair with the static pairs reused; the
    bytes must still be urlencode's, secret last-changed or not."""
    p = profile(
        auth_method="client_secret_post",
        client_secret="s e+c:r%t",
        scope="read write",
        extra_params={"audience": "https://api.example/ü?a=1&b=2"},
    )
    for rt in (OLD_RT, "rt-2 ü/é+%", OLD_RT):
        request = build_refresh_request(p, refresh_token=rt, granted_scope="read write")
        expected = {
            "grant_type": "refresh_token",
            "refresh_token": rt,
            "scope": "read write",
            "audience": "https://api.example/ü?a=1&b=2",
            "client_id": "cid",
            "client_secret": "s e+c:r%t",
        }
        assert request.content == urlencode(expected).encode()


def test_json_body() -> None:
    p = profile(body_format="json", auth_method="client_secret_post", scope="read")
    request = build_refresh_request(p, refresh_token=OLD_RT, granted_scope="read write")
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {
        "grant_type": "refresh_token",
        "refresh_token": OLD_RT,
        "scope": "read",
        "client_id": "cid",
        "client_secret": "csecret",
    }


def test_a_narrower_scope_is_sent() -> None:
    p = profile(scope="read")
    request = build_refresh_request(p, refresh_token=OLD_RT, granted_scope="read write")
    assert form(request)["scope"] == "read"


def test_no_scope_parameter_unless_the_profile_sets_one() -> None:
    request = build_refresh_request(profile(), refresh_token=OLD_RT, granted_scope="read write")
    assert "scope" not in form(request)


def test_a_scope_wider_than_the_grant_is_refused_before_sending() -> None:
    p = profile(scope="read admin")
    with pytest.raises(Permanent) as refused:
        build_refresh_request(p, refresh_token=OLD_RT, granted_scope="read write")
    assert refused.value.reason == "scope_wider_than_grant"
    assert "admin" in refused.value.detail
    assert OLD_RT not in str(refused.value)


def test_a_scope_for_a_grant_of_unknown_scope_is_refused_before_sending() -> None:
    """Seed 002: the original request's scope is the limit; a credential
    imported without one cannot be checked, so nothing is sent."""
    with pytest.raises(Permanent) as refused:
        build_refresh_request(profile(scope="read"), refresh_token=OLD_RT, granted_scope="")
    assert refused.value.reason == "scope_unknown"
    assert OLD_RT not in str(refused.value)


def test_secret_rotation_authenticates_with_the_profiles_api_token() -> None:
    """Workato: the bearer is the developer API token (client_secret), never
    the secret being rotated; the request has no body."""
    request = build_request(workato(client_secret="dev-token"), secret="current-secret")
    assert request.headers["authorization"] == "Bearer dev-token"
    assert (request.method, request.content) == ("PUT", b"")
    assert "current-secret" not in repr(request)


def test_extra_params_are_added() -> None:
    p = profile(extra_params={"audience": "https://api.example", "resource": "r 1"})
    body = form(build_refresh_request(p, refresh_token=OLD_RT, granted_scope=""))
    assert body["audience"] == "https://api.example"
    assert body["resource"] == "r 1"
    assert body["grant_type"] == "refresh_token"
    assert body["refresh_token"] == OLD_RT


def test_a_scope_in_extra_params_cannot_widen_the_grant() -> None:
    try:
        p = profile(extra_params={"scope": "read write admin"})
    except ConfigError:
        return  # refused when the profile is written: also fine
    with pytest.raises(Permanent):
        build_refresh_request(p, refresh_token=OLD_RT, granted_scope="read")


# -------------------------------------------------------------- answers


def answer(
    status: int,
    body: bytes | dict[str, Any] | list[Any],
    *,
    headers: dict[str, str] | None = None,
    truncated: bool = False,
) -> HttpAnswer:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpAnswer(status, httpx.Headers(headers or {}), raw, truncated)


def parse(a: HttpAnswer, p: Profile | None = None) -> TokenSet:
    return parse_token_answer(
        a, p or profile(), now_ms=NOW_MS, old_refresh_token=OLD_RT, old_scope="read write"
    )


def fails(a: HttpAnswer, kind: type[RefreshFailure], reason: str) -> RefreshFailure:
    with pytest.raises(RefreshFailure) as caught:
        parse(a)
    failure = caught.value
    assert type(failure) is kind, failure
    assert failure.reason == reason
    return failure


def jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.c2ln"


def test_a_complete_answer() -> None:
    tokens = parse(
        answer(
            200,
            {
                "access_token": "at-new",
                "refresh_token": "rt-new",
                "token_type": "bearer",
                "expires_in": 3600,
                "scope": "read",
            },
        )
    )
    assert tokens.access_token == "at-new"
    assert tokens.refresh_token == "rt-new"
    assert tokens.rotated is True
    assert tokens.token_type == "bearer"
    assert tokens.expires_at_ms == NOW_MS + 3_600_000
    assert tokens.scope == "read"


def test_no_refresh_token_keeps_the_old_one() -> None:
    tokens = parse(answer(200, {"access_token": "at-new", "expires_in": 60}))
    assert tokens.refresh_token == OLD_RT
    assert tokens.rotated is False
    assert tokens.token_type == "Bearer"
    assert tokens.scope == "read write"  # RFC 6749 §5.1: unchanged when omitted


@pytest.mark.parametrize(
    ("rotation", "returned", "warning"),
    [
        ("always", None, "refresh_token_missing"),
        ("always", "", "refresh_token_invalid"),
        ("maybe", "", "refresh_token_invalid"),
        ("maybe", 5, "refresh_token_invalid"),
    ],
    ids=["always-none", "always-empty", "maybe-empty", "maybe-number"],
)
def test_a_missing_rotation_from_a_rotating_provider_keeps_the_access_token(
    rotation: str, returned: object, warning: str
) -> None:
    """The old refresh token is probably spent and the new one unreadable:
    the new access token is still stored (it works until it expires), and
    the old refresh token is marked unconfirmed, so that the unknown-outcome
    rule decides before it is ever sent again."""
    body: dict[str, Any] = {"access_token": "at-new", "expires_in": 60}
    if returned is not None:
        body["refresh_token"] = returned
    tokens = parse(answer(200, body), profile(rotation=rotation))
    assert (tokens.access_token, tokens.refresh_token) == ("at-new", OLD_RT)
    assert tokens.refresh_unconfirmed is True
    assert tokens.rotated is False
    assert tokens.warnings == (warning,)


@pytest.mark.parametrize("returned", [None, ""])
def test_a_provider_that_never_rotates_keeps_its_token(returned: str | None) -> None:
    body: dict[str, Any] = {"access_token": "at-new", "expires_in": 60}
    if returned is not None:
        body["refresh_token"] = returned
    tokens = parse(answer(200, body), profile(rotation="never"))
    assert (tokens.refresh_token, tokens.rotated) == (OLD_RT, False)


def test_the_same_refresh_token_returned_is_not_a_rotation() -> None:
    tokens = parse(answer(200, {"access_token": "a", "refresh_token": OLD_RT, "expires_in": 60}))
    assert (tokens.refresh_token, tokens.rotated) == (OLD_RT, False)


def test_a_scope_list_is_joined() -> None:
    tokens = parse(answer(200, {"access_token": "a", "expires_in": 60, "scope": ["a", "b"]}))
    assert tokens.scope == "a b"


@pytest.mark.parametrize("value", ["3600", " 3600 ", 3600.0])
def test_expires_in_as_a_string_or_float(value: object) -> None:
    tokens = parse(answer(200, {"access_token": "a", "expires_in": value}))
    assert tokens.expires_at_ms == NOW_MS + 3_600_000


def test_missing_expires_in_uses_the_jwt_exp_claim() -> None:
    exp_s = NOW_MS // 1000 + 900
    tokens = parse(answer(200, {"access_token": jwt({"exp": exp_s, "sub": "u"})}))
    assert tokens.expires_at_ms == exp_s * 1000


@pytest.mark.parametrize("exp_offset_s", [-10, -86_400, 10**12])
def test_a_jwt_exp_in_the_past_or_absurd_uses_the_profile_default(exp_offset_s: int) -> None:
    """A skewed provider clock must not schedule a refresh loop."""
    token = jwt({"exp": NOW_MS // 1000 + exp_offset_s})
    tokens = parse(answer(200, {"access_token": token}), profile(default_lifetime_s=600))
    assert tokens.expires_at_ms == NOW_MS + 600_000


@pytest.mark.parametrize(
    "access_token",
    ["opaque-token", jwt({"sub": "no exp"}), jwt({"exp": "soon"}), "a.b!.c", "x.e30.y"],
)
def test_missing_expires_in_without_a_usable_exp_uses_the_profile_default(
    access_token: str,
) -> None:
    p = profile(default_lifetime_s=1234)
    tokens = parse(answer(200, {"access_token": access_token}), p)
    assert tokens.expires_at_ms == NOW_MS + 1_234_000


@pytest.mark.parametrize(
    "value",
    [0, -1, -3600, 0.5, True, False, "soon", "", "NaN", None, [], {}],
    ids=repr,
)
def test_an_unusable_expires_in_falls_back_to_the_default_lifetime(value: object) -> None:
    """Issue 10: each of these used to discard the new tokens (and, for a
    rotating provider, the grant). Now they are stored with the profile's
    default lifetime and a warning. (null reads as absent: no warning.)"""
    body = {"access_token": "at-new", "refresh_token": "rt-new", "expires_in": value}
    tokens = parse(answer(200, body), profile(default_lifetime_s=1234))
    assert (tokens.access_token, tokens.refresh_token) == ("at-new", "rt-new")
    assert tokens.expires_at_ms == NOW_MS + 1_234_000
    assert tokens.warnings == (() if value is None else ("expires_in_invalid",))


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_a_non_finite_expires_in_falls_back_to_the_default_lifetime(literal: bytes) -> None:
    body = b'{"access_token": "a", "refresh_token": "r", "expires_in": ' + literal + b"}"
    tokens = parse(answer(200, body), profile(default_lifetime_s=600))
    assert (tokens.access_token, tokens.refresh_token) == ("a", "r")
    assert tokens.expires_at_ms == NOW_MS + 600_000
    assert tokens.warnings == ("expires_in_invalid",)


def test_an_unusable_expires_in_falls_back_to_the_jwt_exp_first() -> None:
    exp_s = NOW_MS // 1000 + 900
    body = {"access_token": jwt({"exp": exp_s}), "expires_in": "soon"}
    tokens = parse(answer(200, body))
    assert tokens.expires_at_ms == exp_s * 1000
    assert tokens.warnings == ("expires_in_invalid",)


@pytest.mark.parametrize("value", [10**12, 400 * 86400 + 1, "1e300"], ids=repr)
def test_a_lifetime_over_400_days_is_clamped(value: object) -> None:
    tokens = parse(answer(200, {"access_token": "a", "refresh_token": "r", "expires_in": value}))
    assert tokens.expires_at_ms == NOW_MS + 400 * 86_400_000
    assert tokens.warnings == ("expires_in_clamped",)


def test_a_jwt_exp_over_400_days_is_clamped() -> None:
    token = jwt({"exp": NOW_MS // 1000 + 500 * 86400})
    tokens = parse(answer(200, {"access_token": token}))
    assert tokens.expires_at_ms == NOW_MS + 400 * 86_400_000


@pytest.mark.parametrize(
    ("extra", "expected", "warnings"),
    [
        ({"token_type": None}, ("Bearer", "read write"), ("token_type_invalid",)),
        ({"token_type": ""}, ("Bearer", "read write"), ("token_type_invalid",)),
        ({"token_type": 1}, ("Bearer", "read write"), ("token_type_invalid",)),
        ({"token_type": "x" * 65}, ("Bearer", "read write"), ("token_type_invalid",)),
        ({}, ("Bearer", "read write"), ()),
        ({"scope": None}, ("Bearer", "read write"), ("scope_invalid",)),
        ({"scope": 1}, ("Bearer", "read write"), ("scope_invalid",)),
        ({"scope": ["read", 2]}, ("Bearer", "read write"), ("scope_invalid",)),
        ({"scope": "s" * 16385}, ("Bearer", "read write"), ("scope_invalid",)),
        ({"scope": ""}, ("Bearer", ""), ()),
        (
            {"token_type": None, "scope": None, "expires_in": -5},
            ("Bearer", "read write"),
            ("expires_in_invalid", "token_type_invalid", "scope_invalid"),
        ),
    ],
    ids=repr,
)
def test_odd_secondary_fields_get_their_fallback_and_a_warning(
    extra: dict[str, Any], expected: tuple[str, str], warnings: tuple[str, ...]
) -> None:
    body = {"access_token": "at-new", "refresh_token": "rt-new", "expires_in": 60} | extra
    tokens = parse(answer(200, body))
    assert (tokens.access_token, tokens.refresh_token) == ("at-new", "rt-new")
    assert (tokens.token_type, tokens.scope) == expected
    assert sorted(tokens.warnings) == sorted(warnings)
    assert set(tokens.warnings) <= WARNINGS


@pytest.mark.parametrize("value", [0, -1, "soon", None, 10**12], ids=repr)
def test_an_unusable_refresh_expiry_keeps_the_tokens(value: object) -> None:
    body = {"access_token": "a", "refresh_token": "r", "expires_in": 60, "rx": value}
    tokens = parse(answer(200, body), profile(refresh_expires_in_field="rx"))
    assert (tokens.access_token, tokens.refresh_token) == ("a", "r")
    if value == 10**12:
        assert tokens.refresh_expires_at_ms == NOW_MS + 400 * 86_400_000
        assert tokens.warnings == ("refresh_expires_in_clamped",)
    elif value is None:
        assert (tokens.refresh_expires_at_ms, tokens.warnings) == (None, ())
    else:
        assert tokens.refresh_expires_at_ms is None
        assert tokens.warnings == ("refresh_expires_in_invalid",)


@pytest.mark.parametrize("access_token", [None, "", 7, ["a"]], ids=repr)
def test_a_new_refresh_token_without_an_access_token_is_kept(access_token: object) -> None:
    """A partial answer: the grant lives on in the new refresh token, so it
    is a token set with no access token (the caller keeps the stored one)."""
    body: dict[str, Any] = {"refresh_token": "rt-new", "expires_in": 60}
    if access_token is not None:
        body["access_token"] = access_token
    tokens = parse(answer(200, body), profile(rotation="always"))
    assert (tokens.access_token, tokens.refresh_token, tokens.rotated) == ("", "rt-new", True)
    assert tokens.expires_at_ms == 0
    assert tokens.warnings == ("access_token_missing",)


def test_an_oversized_token_in_an_answer_is_stored_with_a_warning() -> None:
    big = "r" * (16 * 1024 + 1)
    tokens = parse(answer(200, {"access_token": "a", "refresh_token": big, "expires_in": 60}))
    assert tokens.refresh_token == big
    assert tokens.warnings == ("token_oversized",)


def test_a_deeply_nested_kept_field_does_not_cost_the_tokens() -> None:
    """orjson reads 1,023 levels; json.dumps of 1,000 raised RecursionError,
    which the refresher took for an unknown outcome (tokens lost)."""
    raw = b'{"access_token": "a", "refresh_token": "rt-new", "x": ' + b"[" * 1000
    raw += b"]" * 1000 + b', "y": 1}'
    tokens = parse(answer(200, raw), profile(keep_fields=["x", "y"]))
    assert (tokens.access_token, tokens.refresh_token) == ("a", "rt-new")
    assert tokens.extra == {"y": "1"}
    assert tokens.warnings == ("kept_field_invalid",)


def test_a_deeply_nested_jwt_payload_does_not_cost_the_tokens() -> None:
    payload = base64.urlsafe_b64encode(b"[" * 40_000).rstrip(b"=").decode()
    body = {"access_token": f"eyJhbGciOiJub25lIn0.{payload}.c2ln", "refresh_token": "rt-new"}
    tokens = parse(answer(200, body), profile(default_lifetime_s=600))
    assert tokens.refresh_token == "rt-new"
    assert tokens.expires_at_ms == NOW_MS + 600_000


@pytest.mark.parametrize(
    "raw",
    [
        b'\xef\xbb\xbf{"access_token": "at-1", "refresh_token": "rt-1", "expires_in": 60}',
        '{"access_token": "at-1", "refresh_token": "rt-1", "expires_in": 60}'.encode("utf-16"),
        b'{"access_token": "at-1", "refresh_token": "rt-1", "expires_in": 60, "n": 1e999,'
        b' "big": 123456789012345678901234567890}',
    ],
    ids=["utf-8 BOM", "utf-16", "past 64-bit and float range"],
)
def test_answers_outside_strict_json_are_still_read(raw: bytes) -> None:
    """The fast parser reads strict RFC 8259 only; what it refuses is read
    as before by the stdlib's, so no provider's answer changes meaning."""
    tokens = parse(answer(200, raw))
    assert (tokens.access_token, tokens.refresh_token) == ("at-1", "rt-1")


@pytest.mark.parametrize(
    "body",
    [b"<html>ok</html>", b"", b"[1, 2]", b'"at"', b"\xff\xfe", b'{"access_token": "a"'],
    ids=["html", "empty", "array", "string", "not-utf8", "cut"],
)
def test_a_2xx_that_is_not_a_json_object_is_ambiguous(body: bytes) -> None:
    failure = fails(answer(200, body), Ambiguous, "invalid_response")
    assert failure.status == 200


def test_a_truncated_2xx_is_ambiguous_even_when_the_prefix_parses() -> None:
    body = json.dumps({"access_token": "a", "expires_in": 60}).encode()
    fails(answer(200, body, truncated=True), Ambiguous, "invalid_response")


@pytest.mark.parametrize(
    "body",
    [
        {"expires_in": 60},
        {"access_token": "", "expires_in": 60},
        {"access_token": 7, "refresh_token": "", "expires_in": 60},
        {"access_token": None, "refresh_token": OLD_RT, "expires_in": 60},
        {"access_token": "", "refresh_token": 5, "expires_in": 60},
    ],
)
def test_a_2xx_without_a_usable_token_set_is_ambiguous(body: dict[str, Any]) -> None:
    """Neither a usable access token nor a new refresh token: nothing to keep."""
    fails(answer(200, body), Ambiguous, "invalid_response")


def workato(**overrides: Any) -> Profile:
    knobs: dict[str, Any] = {
        "strategy": "secret_rotation",
        "method": "PUT",
        "auth_method": "bearer",
        "access_token_field": "secret",
        "rotation": "never",
        "default_lifetime_s": 30 * 86400,
    }
    return profile(**(knobs | overrides))


@pytest.mark.parametrize(
    ("body", "warnings"),
    [
        ({"secret": "s-new", "expires_in": "soon"}, ("expires_in_invalid",)),
        ({"secret": "s-new", "token_type": None, "expires_in": -1},
         ("token_type_invalid", "expires_in_invalid")),
        ({"oauth_client_secret": "s-new"}, ("client_id_missing",)),
    ],
    ids=["expires_in", "token_type+expires_in", "client-id-missing"],
)  # fmt: skip
def test_a_rotated_secret_with_odd_fields_is_kept(
    body: dict[str, Any], warnings: tuple[str, ...]
) -> None:
    """Issue 10, Workato: the old secret died the moment the provider
    answered, so a readable new one is kept whatever else is odd."""
    tokens = parse(answer(200, body), workato())
    # the output is the access token; nothing is kept to send (the bearer is the profile's)
    assert (tokens.access_token, tokens.refresh_token, tokens.rotated) == ("s-new", "", False)
    assert tokens.token_type == "Bearer"
    assert tokens.expires_at_ms == NOW_MS + 30 * 86_400_000
    assert sorted(tokens.warnings) == sorted(warnings)


def test_a_rotation_answer_without_a_new_secret_is_ambiguous() -> None:
    with pytest.raises(Ambiguous) as caught:
        parse(answer(200, {"secret": "", "expires_in": 60}), workato())
    assert caught.value.reason == "invalid_response"


@pytest.mark.parametrize("name", ["auth_token", "secret"])
def test_a_workato_v2_answer_is_read_under_data(name: str) -> None:
    """``PUT /api/v2/.../api_keys/:id/refresh_secret`` wraps the key in
    ``data``; its new secret is read from the profile's field, else from
    Workato's other name for it."""
    body = {"data": {"id": 7, "auth_type": "token", name: "s-new", "active": True}}
    tokens = parse(answer(200, body), workato(answer_root="data", access_token_field="auth_token"))
    assert (tokens.access_token, tokens.refresh_token) == ("s-new", "")


@pytest.mark.parametrize("body", [{"data": None}, {"secret": "s-new"}, {"data": "s-new"}])
def test_a_workato_v2_answer_without_its_data_object_is_ambiguous(body: dict[str, Any]) -> None:
    with pytest.raises(Ambiguous) as caught:
        parse(answer(200, body), workato(answer_root="data"))
    assert caught.value.reason == "invalid_response"


def test_a_409_is_a_conflict_retried_later() -> None:
    failure = fails(answer(409, {"message": "conflict"}, headers={"Retry-After": "2"}),
                    Transient, "conflict")  # fmt: skip
    assert (failure.status, failure.retry_after_s) == (409, 2.0)


def test_github_error_in_a_200_is_a_refusal() -> None:
    failure = fails(
        answer(200, {"error": "bad_refresh_token", "error_description": "expired"}),
        Permanent,
        "bad_refresh_token",
    )
    assert failure.status == 200


@pytest.mark.parametrize("body", [{"ok": False, "error": "invalid_refresh_token"}, {"ok": False}])
def test_slack_ok_false_is_a_refusal(body: dict[str, Any]) -> None:
    fails(answer(200, body), Permanent, "rejected")


def test_hubspot_status_code_is_a_refusal() -> None:
    body = {"status": "BAD_REFRESH_TOKEN", "message": "missing or unknown refresh token"}
    fails(answer(400, body), Permanent, "bad_refresh_token")


def test_a_2xx_token_set_with_an_upper_case_status_field_is_accepted() -> None:
    """Regression: the HubSpot rule read any upper-case ``status`` as an error
    code, so this rotated token set was refused and its tokens dropped."""
    body = {"status": "OK", "access_token": "at-new", "refresh_token": "rt-new", "expires_in": 60}
    assert parse(answer(200, body)).refresh_token == "rt-new"


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (400, "invalid_grant", "invalid_grant"),
        (401, "invalid_client", "invalid_client"),
        (400, "unauthorized_client", "unauthorized_client"),
        (400, "invalid_scope", "invalid_scope"),
        (400, "some_vendor_code", "rejected"),  # bounded metric vocabulary
    ],
)
def test_oauth_error_codes_are_permanent(status: int, error: str, reason: str) -> None:
    failure = fails(answer(status, {"error": error}), Permanent, reason)
    assert failure.status == status


def test_a_401_without_a_body_is_permanent() -> None:
    fails(answer(401, b""), Permanent, "unauthorized")


def test_a_temporarily_unavailable_error_code_is_transient() -> None:
    fails(answer(400, {"error": "temporarily_unavailable"}), Transient, "temporarily_unavailable")


def test_429_with_retry_after_seconds() -> None:
    failure = fails(
        answer(429, b"slow down", headers={"Retry-After": "17"}), Transient, "throttled"
    )
    assert failure.retry_after_s == 17.0
    assert failure.status == 429


def test_429_with_retry_after_http_date() -> None:
    at = datetime.fromtimestamp(time.time() + 120, UTC)
    headers = {"Retry-After": format_datetime(at, usegmt=True)}
    failure = fails(answer(429, b"", headers=headers), Transient, "throttled")
    assert failure.retry_after_s is not None
    assert 110 <= failure.retry_after_s <= 121


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (429, "too_many_requests", "throttled"),
        (429, "rate_limit_exceeded", "throttled"),
        (408, "timeout", "server_error"),
    ],
)
def test_throttling_with_a_json_error_body_is_transient(
    status: int, error: str, reason: str
) -> None:
    failure = fails(
        answer(status, {"error": error}, headers={"Retry-After": "30"}), Transient, reason
    )
    assert failure.retry_after_s == 30.0


def test_429_without_retry_after() -> None:
    assert fails(answer(429, b""), Transient, "throttled").retry_after_s is None


def test_403_html_page_is_throttling() -> None:
    page = b"<html><body>We're sorry... automated queries</body></html>"
    failure = fails(
        answer(403, page, headers={"content-type": "text/html"}), Transient, "throttled"
    )
    assert failure.status == 403


def test_403_json_refusal_is_permanent() -> None:
    fails(answer(403, {"error": "access_denied"}), Permanent, "access_denied")


@pytest.mark.parametrize("status", [500, 503, 408])
def test_server_errors_are_transient(status: int) -> None:
    failure = fails(
        answer(status, b"oops", headers={"Retry-After": "3"}), Transient, "server_error"
    )
    assert failure.retry_after_s == 3.0


def test_a_5xx_with_an_oauth_error_code_is_still_transient() -> None:
    fails(answer(500, {"error": "invalid_grant"}), Transient, "server_error")


@pytest.mark.parametrize("status", [502, 504])
def test_gateway_errors_are_ambiguous(status: int) -> None:
    # the gateway cannot say whether the origin redeemed the refresh token
    failure = fails(answer(status, b"bad gateway"), Ambiguous, "gateway_error")
    assert failure.status == status


def test_failures_never_carry_the_provider_text_or_tokens() -> None:
    body = {"error": "invalid_grant", "error_description": f"token {OLD_RT} revoked"}
    failure = fails(answer(400, body), Permanent, "invalid_grant")
    assert OLD_RT not in str(failure)
    assert "revoked" not in str(failure)


# ------------------------------------------------------------ transport

Behaviour = Callable[[SocketStream, bytes], Awaitable[None]]


async def read_request(stream: SocketStream) -> bytes:
    """One HTTP/1.1 request with a Content-Length body, read in full."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive()
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += await stream.receive()
    return head + b"\r\n\r\n" + body


@asynccontextmanager
async def tcp_server(behaviour: Behaviour) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A raw HTTP server on 127.0.0.1: reads each request in full, records
    it, then does whatever ``behaviour`` says (answer, hang up, stall)."""
    seen: list[bytes] = []

    async def handle(stream: SocketStream) -> None:
        async with stream:
            with suppress(anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                request = await read_request(stream)
                seen.append(request)
                await behaviour(stream, request)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - not Django
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield f"http://127.0.0.1:{port}/token", seen
        finally:
            tg.cancel_scope.cancel()


def sent_form(raw: bytes) -> dict[str, str]:
    return dict(parse_qsl(raw.partition(b"\r\n\r\n")[2].decode("ascii")))


def http_response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 9\r\n\r\n"
    )
    return head.encode() + body


def token_request(url: str) -> TokenRequest:
    p = profile(token_url=url, allow_http=True, allow_private_network=True)
    return build_refresh_request(p, refresh_token=OLD_RT, granted_scope="")


async def test_a_normal_answer_is_read_whole() -> None:
    body = json.dumps({"access_token": "at-new", "expires_in": 60}).encode()

    async def answer_it(stream: SocketStream, _: bytes) -> None:
        await stream.send(http_response(200, body))

    async with tcp_server(answer_it) as (url, seen), make_http_client() as client:
        got = await send(client, token_request(url), timeout_s=5)
    assert (got.status, got.body, got.truncated) == (200, body, False)
    assert got.headers["retry-after"] == "9"
    # what reached the wire is exactly the request that was built
    head = seen[0].partition(b"\r\n\r\n")[0]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /token HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"] == "application/x-www-form-urlencoded"
    assert headers["authorization"].startswith("Basic ")
    assert sent_form(seen[0]) == {"grant_type": "refresh_token", "refresh_token": OLD_RT}


async def test_connection_refused_is_not_sent() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens here
    async with make_http_client() as client:
        with pytest.raises(NotSent) as caught:
            await send(client, token_request(f"http://127.0.0.1:{port}/token"), timeout_s=5)
    assert caught.value.reason == "connect_error"


async def test_a_server_that_reads_the_request_and_hangs_up_is_ambiguous() -> None:
    """httpx-aiohttp maps aiohttp.ServerDisconnectedError to httpx.ConnectTimeout:
    judged by the httpx type alone this would be NotSent, and the same refresh
    token would be sent again to a provider that has already rotated it."""

    async def hang_up(stream: SocketStream, _: bytes) -> None:
        await stream.aclose()

    async with tcp_server(hang_up) as (url, seen), make_http_client() as client:
        with pytest.raises(RefreshFailure) as caught:
            await send(client, token_request(url), timeout_s=5)
    assert type(caught.value) is Ambiguous
    # the provider did get the refresh token, exactly once (no silent retry)
    assert len(seen) == 1
    assert sent_form(seen[0])["refresh_token"] == OLD_RT


async def test_a_server_that_resets_after_reading_is_ambiguous() -> None:
    async def reset(stream: SocketStream, _: bytes) -> None:
        sock = stream.extra(SocketAttribute.raw_socket)  # noqa: S610 - not Django
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    async with tcp_server(reset) as (url, seen), make_http_client() as client:
        with pytest.raises(RefreshFailure) as caught:
            await send(client, token_request(url), timeout_s=5)
    assert type(caught.value) is Ambiguous
    assert len(seen) == 1


async def test_a_body_cut_short_is_ambiguous() -> None:
    async def cut(stream: SocketStream, _: bytes) -> None:
        full = http_response(200, b'{"access_token": "at-new", "expires_in": 60}')
        await stream.send(full[:-10])
        await stream.aclose()

    async with tcp_server(cut) as (url, _), make_http_client() as client:
        with pytest.raises(RefreshFailure) as caught:
            await send(client, token_request(url), timeout_s=5)
    assert type(caught.value) is Ambiguous


async def test_a_server_that_never_answers_times_out_as_ambiguous_within_the_deadline() -> None:
    async def stall(stream: SocketStream, _: bytes) -> None:
        await anyio.sleep_forever()

    async with tcp_server(stall) as (url, seen), make_http_client() as client:
        started = time.monotonic()
        with pytest.raises(RefreshFailure) as caught:
            await send(client, token_request(url), timeout_s=0.5)
        elapsed = time.monotonic() - started
    assert type(caught.value) is Ambiguous
    assert caught.value.reason == "timeout"
    assert len(seen) == 1
    assert 0.4 <= elapsed < 1.5


async def test_an_oversized_body_is_cut_and_marked_truncated() -> None:
    big = b'{"access_token": "' + b"x" * (3 * MAX_BODY_BYTES) + b'"}'

    async def flood(stream: SocketStream, _: bytes) -> None:
        await stream.send(http_response(200, big))

    async with tcp_server(flood) as (url, _), make_http_client() as client:
        got = await send(client, token_request(url), timeout_s=5)
    assert got.status == 200
    assert got.truncated is True
    assert MAX_BODY_BYTES < len(got.body) < len(big)
    # and a truncated 2xx is never taken for a token set
    with pytest.raises(Ambiguous):
        parse(got)


async def test_a_malformed_answer_after_the_request_is_ambiguous() -> None:
    """Regression: aiohttp.ClientResponseError (bad status line) is not in
    httpx-aiohttp's exception map and used to escape ``send`` unclassified."""

    async def garbage(stream: SocketStream, _: bytes) -> None:
        await stream.send(b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    outcome: Exception | None = None
    async with tcp_server(garbage) as (url, seen), make_http_client() as client:
        try:
            await send(client, token_request(url), timeout_s=5)
        except Exception as exc:  # noqa: BLE001 - the point is which type escapes
            outcome = exc
    assert len(seen) == 1  # the refresh token reached the server
    assert isinstance(outcome, Ambiguous), repr(outcome)


async def test_a_connect_that_never_completes_is_not_sent() -> None:
    """Regression: the connect used to share the overall deadline, so a
    blackholed provider (SYNs dropped) ended as Ambiguous('timeout') and
    every rotating credential refreshed during the outage was quarantined."""
    # A listener that never accepts, with its accept queue full: Linux drops
    # further SYNs, so a new connect hangs and no request byte can leave.
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        with anyio.move_on_after(0.3) as probe:
            extra = await anyio.connect_tcp("127.0.0.1", port)
            await extra.aclose()
        if not probe.cancelled_caught:
            pytest.skip("this kernel completes connects to a full accept queue")
        async with make_http_client() as client:
            with pytest.raises(NotSent):
                await send(client, token_request(f"http://127.0.0.1:{port}/token"), timeout_s=0.5)
    finally:
        for sock in (*fillers, listener):
            sock.close()
