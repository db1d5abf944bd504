"""What the printing commands hide (``worker.masking``): names judged by
their words in any case or separator style; events, credentials and
profiles shown without them unless revealed. (tests/test_watch.py runs
``watch``, ``credential get`` and ``credential list`` as real processes.)"""

from __future__ import annotations

import json

import pytest

from tests.test_settings_models import profile
from worker.logs import fingerprint
from worker.masking import HIDDEN, looks_secret, mask_event
from worker.models import Credential, Status


@pytest.mark.parametrize(
    "name",
    ["access_token", "id_token", "idToken", "ID-TOKEN", "refreshToken", "client_secret",
     "mfa_passcode", "Passcode", "password", "db_pwd", "private_key", "signing-key",
     "x-api-key", "apiKey", "client_assertion", "SAMLAssertion", "session_token",
     "set_cookie", "Authorization", "jwt", "code", "pin", "otp_seed"],
)  # fmt: skip
def test_a_secret_looking_name_is_hidden(name: str) -> None:
    assert looks_secret(name)


@pytest.mark.parametrize(
    "name",
    ["token_type", "tokenType", "credential_id", "instance_url", "oauth_client_id", "scope",
     "expires_at", "profile", "reason", "detail", "warnings", "managed_user_id", "tenant",
     "refresh_token_expires_in", "issued_token_type", "secrets"],
)  # fmt: skip
def test_a_plain_name_is_shown(name: str) -> None:
    assert not looks_secret(name)


def test_an_event_keeps_its_plain_fields_and_fingerprints_the_rest() -> None:
    raw = json.dumps({
        "schema": 1, "type": "token.refreshed", "credential_id": "c1", "access_token": "AT",
        "token_type": "Bearer", "scope": "read",
        "extra": {"idToken": "ID", "instance_url": "https://x.example",
                  "claims": {"nested_secret": "NS", "tenant": "t"}},
    })  # fmt: skip
    shown = mask_event(raw)
    assert shown["access_token"] == f"[{fingerprint('AT')}]"
    assert (shown["token_type"], shown["scope"], shown["credential_id"]) == ("Bearer", "read", "c1")
    assert shown["extra"] == {
        "idToken": f"[{fingerprint('ID')}]",
        "instance_url": "https://x.example",
        "claims": {"nested_secret": f"[{fingerprint('NS')}]", "tenant": "t"},
    }
    odd = mask_event({"type": "x", "extra": ["ID"]})  # not refreshd's shape: hidden whole
    assert "ID" not in json.dumps(odd)


def test_a_credential_hides_secret_extras_and_params_unless_revealed() -> None:
    cred = Credential(
        id="c1", profile="p", status=Status.ACTIVE, version=1, access_token="AT",
        refresh_token="RT", token_type="Bearer", scope="", expires_at_ms=0, failures=0,
        last_error="", due_at_ms=None, created_at_ms=0, updated_at_ms=0,
        refreshed_at_ms=None, in_flight=False,
        params={"passcode": "123456", "managed_user_id": "42"},
        extra={"idToken": "ID", "instance_url": "https://x.example"},
    )  # fmt: skip
    public = cred.public()
    assert public["params"] == {"passcode": HIDDEN, "managed_user_id": "42"}
    assert public["extra"] == {"idToken": HIDDEN, "instance_url": "https://x.example"}
    assert (public["access_token"], public["refresh_token"]) == (HIDDEN, HIDDEN)
    revealed = cred.public(reveal=True)
    assert revealed["params"]["passcode"] == "123456"
    assert revealed["extra"]["idToken"] == "ID"


def test_a_profile_hides_a_secret_put_in_extra_params() -> None:
    public = profile(extra_params={"audience": "api", "client_assertion": "CA-value"}).public()
    assert public["extra_params"] == {"audience": "api", "client_assertion": HIDDEN}
    assert "CA-value" not in json.dumps(public, default=str)
