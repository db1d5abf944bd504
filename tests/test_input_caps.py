"""Issue 10: size caps on what a credential may hold, for every way in
(``CredentialInput`` is what the import and any API caller construct)."""

from __future__ import annotations

from typing import Any

import pytest

from worker.errors import ConfigError
from worker.models import CredentialInput


def cred(**overrides: Any) -> CredentialInput:
    fields: dict[str, Any] = {
        "id": "c1",
        "profile": "p",
        "access_token": "at",
        "refresh_token": "rt",
        "expires_at_ms": 1,
    }
    return CredentialInput(**(fields | overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"refresh_token": "r" * 5_000_000}, "refresh_token is longer than 16,384 bytes"),
        ({"access_token": "é" * 8193}, "access_token is longer than 16,384 bytes"),
        ({"scope": "s" * 16385}, "scope is longer than 16,384 bytes"),
        ({"token_type": "t" * 65}, "token_type is longer than 64 characters"),
        ({"params": {f"k{n}": "v" for n in range(33)}}, "params has more than 32 entries"),
        ({"params": {"k": "v" * 2049}}, "a params entry is longer than 2,048 bytes"),
    ],
    ids=["5MB-refresh", "utf8-access", "scope", "token_type", "params-count", "param-size"],
)
def test_oversized_fields_are_refused_by_name(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        cred(**overrides)
    assert str(caught.value) == message


def test_fields_at_the_caps_are_accepted() -> None:
    at_cap = cred(
        access_token="a" * 16384,
        refresh_token="r" * 16384,
        scope="s" * 16384,
        token_type="t" * 64,
        params={f"k{n}": "v" * 2048 for n in range(32)},
    )
    assert len(at_cap.refresh_token) == 16384
