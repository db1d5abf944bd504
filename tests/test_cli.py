"""`refreshd` as operators use it: real Valkey, real HTTP on loopback.

Most tests call ``worker.cli.main`` in-process (fast, output captured); the
token endpoint is a FakeProvider served from a thread; a few tests run the
CLI as real processes (``python -m worker`` and the installed ``refreshd``
console script) where two commands must run at once (``watch`` + refresh).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import worker.logs
from tests.cli_helpers import (
    REFRESHD,
    Cli,
    ProviderThread,
    cred_line,
    provider_thread,
    raw_redis,
    run_refreshd,
    stored_records,
    wait_until,
    write_jsonl,
)
from tests.redis_server import free_port
from worker.codec import RECORD_MARK
from worker.fakeprovider import FakeProviderConfig, Fault, IssuedGrant
from worker.keys import Keyspace
from worker.logs import fingerprint
from worker.settings import SETTINGS_DOC

KEYS = Keyspace()
SECRET = "s3cr3t-Zq8vX2-do-not-print"
HTTPS_URL = "https://auth.example.com/oauth/token"


# ----------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each CLI call points logging at the captured stderr of that moment;
    put back whatever was configured before so later test modules are not
    left writing to a closed capture."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configured = worker.logs._configured
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    structlog.configure(**config)
    worker.logs._configured = configured


@pytest.fixture
def cli(redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """The CLI pointed at a flushed Valkey; only error logs, so that an error
    is exactly one line on stderr. The environment is inherited by the
    subprocesses the tests start."""
    for name in list(os.environ):
        if name.startswith("REFRESHD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("REFRESHD_REDIS_URL", redis_url)
    monkeypatch.setenv("REFRESHD_LOG_LEVEL", "error")
    monkeypatch.setenv("TEST_CLIENT_SECRET", SECRET)
    return Cli(capsys, monkeypatch)


@pytest.fixture
def provider() -> Iterator[ProviderThread]:
    with provider_thread(FakeProviderConfig(lifetime_s=3600)) as running:
        yield running


def make_profile(cli: Cli, profile_id: str, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = cli.ok(
        "profile", "create", profile_id, "--token-url", HTTPS_URL,
        "--client-id", f"{profile_id}-client", "--client-secret-env", "TEST_CLIENT_SECRET",
        *args,
    )  # fmt: skip
    return result


def import_lines(cli: Cli, tmp_path: Path, *lines: dict[str, Any] | str) -> dict[str, Any]:
    path = write_jsonl(tmp_path / f"import-{time.monotonic_ns()}.jsonl", lines)
    result: dict[str, Any] = cli.ok("credential", "import", str(path))
    assert result["failed"] == 0, result
    return result


def fake_profile(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, provider: ProviderThread, profile_id: str = "fp"
) -> None:
    monkeypatch.setenv("FP_SECRET", provider.config.client_secret)
    cli.ok(
        "profile", "create", profile_id, "--token-url", provider.url,
        "--client-id", provider.config.client_id, "--client-secret-env", "FP_SECRET",
        "--allow-http", "true", "--allow-private-network", "true",
        "--rotation", "always", "--timeout", "5",
    )  # fmt: skip


def import_grant(
    cli: Cli,
    tmp_path: Path,
    provider: ProviderThread,
    cred_id: str,
    *,
    replace: bool = False,
    profile: str = "fp",
) -> IssuedGrant:
    grant = provider.issue_grant()
    line = {
        "id": cred_id,
        "profile": profile,
        "access_token": grant.access_token,
        "refresh_token": grant.refresh_token,
        "expires_in": grant.expires_in,
        "scope": grant.scope,
    }
    path = write_jsonl(tmp_path / f"{cred_id}-{time.monotonic_ns()}.jsonl", [line])
    summary = cli.ok("credential", "import", str(path), *(["--replace"] if replace else []))
    assert summary["failed"] == 0, summary
    return grant


def without(line: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in line.items() if k != key}


def table_rows(text: str) -> list[dict[str, str]]:
    """``--table`` output as dicts keyed by column header (cells have no spaces)."""
    header, *lines = [line.split() for line in text.splitlines()]
    assert all(len(line) == len(header) for line in lines), text
    return [dict(zip(header, line, strict=True)) for line in lines]


def stored_secret(redis_url: str, profile_id: str) -> str | None:
    with raw_redis(redis_url) as client:
        value = client.hget(KEYS.profile(profile_id), "client_secret")
        return None if value is None else str(value)


def secret_source(
    source: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], str | None]:
    """CLI arguments (and stdin) that hand ``value`` over as the client secret."""
    if source == "file":
        path = tmp_path / f"secret-{time.monotonic_ns()}"
        path.write_text(value + "\n")
        return ["--client-secret-file", str(path)], None
    if source == "env":
        monkeypatch.setenv("ACME_CLIENT_SECRET", value)
        return ["--client-secret-env", "ACME_CLIENT_SECRET"], None
    return ["--client-secret-stdin"], value + "\n"


# ------------------------------------------------------------ profile create


def test_create_with_every_knob(cli: Cli, tmp_path: Path, redis_url: str) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    created = cli.ok(
        "profile", "create", "full",
        "--token-url", HTTPS_URL,
        "--client-id", "client+id:1",
        "--auth-method", "client_secret_post",
        "--basic-form-encode", "false",
        "--body-format", "json",
        "--scope", "read write",
        "--rotation", "never",
        "--reuse-grace", "5",
        "--refresh-lead", "120",
        "--default-lifetime", "600",
        "--timeout", "3.5",
        "--allow-http", "false",
        "--name", "Acme production",
        "--extra", "audience=https://api.example.com",
        "--extra", "resource=urn:a=b",  # only the first '=' separates
        "--client-secret-file", str(secret_file),
    )  # fmt: skip
    expected = {
        "id": "full",
        "token_url": HTTPS_URL,
        "client_id": "client+id:1",
        "auth_method": "client_secret_post",
        "basic_form_encode": False,
        "body_format": "json",
        "scope": "read write",
        "rotation": "never",
        "reuse_grace_s": 5.0,
        "refresh_lead_s": 120.0,
        "default_lifetime_s": 600.0,
        "timeout_s": 3.5,
        "allow_http": False,
        "name": "Acme production",
        "extra_params": {"audience": "https://api.example.com", "resource": "urn:a=b"},
        "has_client_secret": True,
        "credentials_count": 0,
    }
    assert {k: created.get(k) for k in expected} == expected
    assert "client_secret" not in created
    assert created["created_at"] == created["updated_at"] > 0
    assert cli.ok("profile", "get", "full") == created
    assert stored_secret(redis_url, "full") == SECRET  # file's newline stripped
    assert SECRET not in cli.everything


@pytest.mark.parametrize("source", ["file", "env", "stdin"])
def test_client_secret_sources_are_stored_and_never_printed(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str, source: str
) -> None:
    # debug logging: a secret must not leak through the logs either
    monkeypatch.setenv("REFRESHD_LOG_LEVEL", "debug")
    secret = f"{SECRET}-{source}"
    args, stdin = secret_source(source, secret, tmp_path, monkeypatch)
    created = cli.ok(
        "profile", "create", "acme", "--token-url", HTTPS_URL, "--client-id", "acme", *args,
        stdin=stdin,
    )  # fmt: skip
    assert created["has_client_secret"] is True
    assert "client_secret" not in created
    assert stored_secret(redis_url, "acme") == secret

    got = cli.ok("profile", "get", "acme")
    listed = cli.ok("profile", "list")["result"]
    assert got["has_client_secret"] is True
    assert [p["has_client_secret"] for p in listed] == [True]
    assert all("client_secret" not in p for p in [got, *listed])
    assert cli("profile", "list", "--table").code == 0

    # rotate the secret through the same source
    rotated = f"{secret}-rotated"
    args, stdin = secret_source(source, rotated, tmp_path, monkeypatch)
    updated = cli.ok("profile", "update", "acme", *args, stdin=stdin)
    assert updated["has_client_secret"] is True
    assert stored_secret(redis_url, "acme") == rotated

    assert secret not in cli.everything
    assert rotated not in cli.everything


def test_secret_params_show_by_name_only(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REFRESHD_LOG_LEVEL", "debug")
    monkeypatch.setenv("ACME_PASSCODE", "passcode-81d0c4-secret")
    key_file = tmp_path / "key"
    key_file.write_text("apikey-77e1aa-secret\n")
    created = make_profile(
        cli, "acme",
        "--secret-param-env", "passcode=ACME_PASSCODE",
        "--secret-param-file", f"api_key={key_file}",
    )  # fmt: skip
    assert created["secret_params"] == ["api_key", "passcode"]
    assert cli.ok("profile", "get", "acme")["secret_params"] == ["api_key", "passcode"]
    updated = cli.ok("profile", "update", "acme", "--name", "kept")
    assert updated["secret_params"] == ["api_key", "passcode"]
    cli.ok("profile", "list")
    for value in ("passcode-81d0c4-secret", "apikey-77e1aa-secret", SECRET):
        assert value not in cli.everything


def test_update_of_one_secret_param_keeps_the_others(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_PASSCODE", "passcode-81d0c4-secret")
    monkeypatch.setenv("ACME_API_KEY", "apikey-77e1aa-secret")
    make_profile(
        cli, "acme",
        "--secret-param-env", "passcode=ACME_PASSCODE",
        "--secret-param-env", "api_key=ACME_API_KEY",
    )  # fmt: skip
    monkeypatch.setenv("ACME_API_KEY", "apikey-rotated-secret")
    updated = cli.ok("profile", "update", "acme", "--secret-param-env", "api_key=ACME_API_KEY")
    assert updated["secret_params"] == ["api_key", "passcode"]


def test_there_is_no_plain_client_secret_argument(cli: Cli) -> None:
    result = cli(
        "profile", "create", "acme", "--token-url", HTTPS_URL, "--client-id", "acme",
        "--client-secret", SECRET,
    )  # fmt: skip
    assert result.code == 2
    assert result.out == ""
    assert "--client-secret" in result.err
    assert "Traceback" not in result.err
    assert SECRET not in result.err
    assert cli.ok("profile", "list")["result"] == []


def test_client_secret_given_inline_is_not_echoed(cli: Cli) -> None:
    result = cli(
        "profile", "create", "acme", "--token-url", HTTPS_URL, "--client-id", "acme",
        f"--client-secret={SECRET}",
    )  # fmt: skip
    assert result.code == 2
    assert SECRET not in result.err


def test_create_from_file_with_flags_taking_precedence(cli: Cli, tmp_path: Path) -> None:
    spec = tmp_path / "profile.json"
    spec.write_text(
        json.dumps(
            {
                "token_url": HTTPS_URL,
                "client_id": "from-file",
                "auth_method": "client_secret_post",
                "rotation": "always",
                "timeout_s": 7,
                "extra_params": {"audience": "file", "kept": "yes"},
                "name": "from file",
            }
        )
    )
    created = cli.ok(
        "profile", "create", "ff", "--from-file", str(spec),
        "--name", "from flag", "--extra", "audience=flag",
        "--client-secret-env", "TEST_CLIENT_SECRET",
    )  # fmt: skip
    assert created["client_id"] == "from-file"
    assert created["auth_method"] == "client_secret_post"
    assert created["rotation"] == "always"
    assert created["timeout_s"] == 7.0
    assert created["name"] == "from flag"
    assert created["extra_params"] == {"audience": "flag", "kept": "yes"}
    assert created["has_client_secret"] is True
    assert SECRET not in cli.everything


def _spec(tmp_path: Path, content: object) -> str:
    path = tmp_path / f"spec-{time.monotonic_ns()}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


_SECRET_ENV = ["--client-secret-env", "TEST_CLIENT_SECRET"]
_BASE = ["--client-id", "acme", *_SECRET_ENV]

CREATE_ERRORS: list[Any] = [
    pytest.param(["--token-url", "http://auth.example.com/token", *_BASE], "https://",
                 id="http-without-allow-http"),
    pytest.param(["--token-url", HTTPS_URL, "--auth-method", "private_key_jwt", *_BASE],
                 "auth_method must be one of", id="unknown-auth-method"),
    pytest.param(["--token-url", HTTPS_URL, "--client-id", "acme"],
                 "needs client_id and client_secret", id="basic-without-secret"),
    pytest.param(["--token-url", HTTPS_URL, *_BASE, "--extra", "audience"],
                 "--extra takes NAME=VALUE", id="extra-without-equals"),
    pytest.param(["--token-url", HTTPS_URL, *_BASE, "--extra", "=value"],
                 "--extra takes NAME=VALUE", id="extra-without-name"),
    pytest.param(["--token-url", HTTPS_URL, *_BASE, "--extra", "grant_type=password"],
                 "grant_type", id="extra-reserved-name"),
    pytest.param(["--token-url", HTTPS_URL, *_BASE, "--rotation", "sometimes"],
                 "rotation must be one of", id="unknown-rotation"),
    pytest.param(["--token-url", HTTPS_URL, *_BASE, "--body-format", "xml"],
                 "body_format must be one of", id="unknown-body-format"),
    pytest.param(["--token-url", HTTPS_URL, *_BASE, "--timeout", "0.1"],
                 "timeout_s must be between", id="timeout-out-of-range"),
    pytest.param(["--token-url", HTTPS_URL, *_BASE, "--allow-http", "maybe"],
                 "--allow-http: true or false", id="allow-http-not-a-flag"),
    pytest.param(["--token-url", "https://user:pw@auth.example.com/t", *_BASE],
                 "must not carry credentials", id="url-with-credentials"),
    pytest.param(["--token-url", "auth.example.com/token", *_BASE], "absolute",
                 id="relative-url"),
    pytest.param([*_BASE], "token_url", id="no-token-url"),
    pytest.param(["--token-url", HTTPS_URL, "--client-id", "acme",
                  "--client-secret-env", "REFRESHD_TEST_UNSET_VAR_X"],
                 "REFRESHD_TEST_UNSET_VAR_X", id="secret-env-unset"),
    pytest.param(["--token-url", HTTPS_URL, "--client-id", "acme",
                  "--client-secret-file", "/nonexistent/secret"],
                 "cannot read client_secret", id="secret-file-missing"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), CREATE_ERRORS)
def test_create_validation_errors_are_one_line_exit_2(
    cli: Cli, args: list[str], message: str
) -> None:
    error = cli.fails(2, "profile", "create", "acme", *args)
    assert message in error
    assert cli.ok("profile", "list")["result"] == []
    assert SECRET not in cli.everything


def test_create_validation_errors_from_files(cli: Cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty-secret"
    empty.write_text("\n")
    cases = [
        (["--token-url", HTTPS_URL, "--client-id", "a", "--client-secret-file", str(empty)],
         "client_secret is empty"),
        (["--from-file", str(tmp_path / "missing.json"), *_SECRET_ENV], "cannot read profile"),
        (["--from-file", _spec(tmp_path, "{not json"), *_SECRET_ENV], "cannot read profile"),
        (["--from-file", _spec(tmp_path, [HTTPS_URL]), *_SECRET_ENV], "must hold an object"),
        (["--from-file", _spec(tmp_path, {"token_url": HTTPS_URL, "client_id": "a",
                                          "client_secrte": "x"}), *_SECRET_ENV],
         "unknown profile field(s): client_secrte"),
    ]  # fmt: skip
    for args, message in cases:
        assert message in cli.fails(2, "profile", "create", "acme", *args)
    assert cli.ok("profile", "list")["result"] == []


def test_argparse_type_errors_exit_2(cli: Cli) -> None:
    result = cli("profile", "create", "acme", "--token-url", HTTPS_URL, "--timeout", "soon")
    assert result.code == 2
    assert "--timeout" in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("field", "value"),
    [("scope", ["read", "write"]), ("client_id", 42), ("client_secret", 12345), ("name", {})],
)
def test_from_file_rejects_wrongly_typed_fields(
    cli: Cli, tmp_path: Path, field: str, value: object
) -> None:
    spec = {"token_url": HTTPS_URL, "client_id": "a", "client_secret": "b", field: value}
    error = cli.fails(2, "profile", "create", "acme", "--from-file", _spec(tmp_path, spec))
    assert field in error


def test_from_file_non_string_token_url_is_a_clean_error(cli: Cli, tmp_path: Path) -> None:
    spec = _spec(tmp_path, {"token_url": 443, "client_id": "a"})
    error = cli.fails(2, "profile", "create", "acme", "--from-file", spec, *_SECRET_ENV)
    assert "token_url" in error


def test_create_twice_is_refused_and_keeps_the_first(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    first = make_profile(cli, "acme", "--name", "first")
    monkeypatch.setenv("OTHER_SECRET", "other-secret-value")
    error = cli.fails(
        1, "profile", "create", "acme", "--token-url", "https://other.example.com/t",
        "--client-id", "other", "--client-secret-env", "OTHER_SECRET", "--name", "second",
    )  # fmt: skip
    assert "already exists" in error
    assert cli.ok("profile", "get", "acme") == first
    assert stored_secret(redis_url, "acme") == SECRET


def test_update_keeps_the_secret_and_validates(cli: Cli, tmp_path: Path, redis_url: str) -> None:
    before = make_profile(cli, "acme", "--scope", "read write", "--extra", "audience=x")
    updated = cli.ok("profile", "update", "acme", "--name", "Renamed", "--timeout", "4")
    assert updated["name"] == "Renamed"
    assert updated["timeout_s"] == 4.0
    assert updated["has_client_secret"] is True
    assert updated["scope"] == "read write"  # fields not given are kept
    assert updated["created_at"] == before["created_at"]
    assert updated["updated_at"] >= before["updated_at"]
    assert stored_secret(redis_url, "acme") == SECRET

    invalid = [
        (["--auth-method", "bogus"], "auth_method must be one of"),
        (["--token-url", "http://insecure.example.com/t"], "https://"),
        (["--timeout", "500"], "timeout_s must be between"),
        (["--extra", "novalue"], "--extra takes NAME=VALUE"),
        (["--from-file", _spec(tmp_path, {"id": "other"})], "id cannot change"),
        (["--from-file", _spec(tmp_path, {"client_secret": ""})], "client_secret"),
    ]
    for args, message in invalid:
        assert message in cli.fails(2, "profile", "update", "acme", *args)
    # nothing of the refused updates stuck
    assert cli.ok("profile", "get", "acme") == updated
    assert stored_secret(redis_url, "acme") == SECRET

    assert "no profile" in cli.fails(1, "profile", "update", "ghost", "--name", "x")
    assert SECRET not in cli.everything


def test_update_with_a_preset_applies_it_again(cli: Cli, redis_url: str) -> None:
    """Issue 13: ``--preset`` on update re-applies the preset's knobs (it
    used to change the label only); other flags given win; the secret stays."""
    make_profile(cli, "st", "--preset", "smartthings")
    cli.ok("profile", "update", "st", "--rotation", "never", "--timeout", "3")
    again = cli.ok("profile", "update", "st", "--preset", "smartthings", "--timeout", "4")
    assert (again["rotation"], again["reuse_grace_s"], again["timeout_s"]) == ("always", 0, 4.0)
    assert (again["client_id_in_body"], again["client_id"]) == (True, "st-client")
    assert stored_secret(redis_url, "st") == SECRET
    assert SECRET not in cli.everything


# -------------------------------------------------------- profile list / get


def test_list_pages(cli: Cli) -> None:
    for n in range(7, 0, -1):  # created out of order: listing is by id
        make_profile(cli, f"p{n}")
    everything = cli.ok("profile", "list")
    assert everything["page"] == 1
    assert everything["per_page"] == 100
    assert [p["id"] for p in everything["result"]] == [f"p{n}" for n in range(1, 8)]

    pages = {
        page: [p["id"] for p in cli.ok("profile", "list", "--per-page", "3", "--page", str(page))[
            "result"]]
        for page in (1, 2, 3, 4)
    }  # fmt: skip
    assert pages == {1: ["p1", "p2", "p3"], 2: ["p4", "p5", "p6"], 3: ["p7"], 4: []}
    third = cli.ok("profile", "list", "--per-page", "3", "--page", "2")
    assert (third["total"], third["truncated"]) == (7, True)
    last = cli.ok("profile", "list", "--per-page", "3", "--page", "3")
    assert (last["total"], last["truncated"]) == (7, False)
    assert len(cli.ok("profile", "list", "--per-page", "100")["result"]) == 7

    assert "per_page" in cli.fails(2, "profile", "list", "--per-page", "101")
    assert "per_page" in cli.fails(2, "profile", "list", "--per-page", "0")
    assert "page" in cli.fails(2, "profile", "list", "--page", "0")
    assert "page" in cli.fails(2, "profile", "list", "--page", "-1")
    assert SECRET not in cli.everything


def test_list_table(cli: Cli, tmp_path: Path) -> None:
    make_profile(cli, "alpha", "--rotation", "always")
    make_profile(cli, "beta", "--auth-method", "client_secret_post")
    import_lines(cli, tmp_path, cred_line("c1", "alpha", 1), cred_line("c2", "alpha", 2))
    result = cli("profile", "list", "--table")
    assert result.code == 0
    rows = table_rows(result.out)
    wanted = ["ID", "TOKEN_URL", "AUTH_METHOD", "ROTATION", "CREDENTIALS_COUNT"]
    assert [{k: row[k] for k in wanted} for row in rows] == [
        dict(zip(wanted, ["alpha", HTTPS_URL, "client_secret_basic", "always", "2"], strict=True)),
        dict(zip(wanted, ["beta", HTTPS_URL, "client_secret_post", "maybe", "0"], strict=True)),
    ]
    assert SECRET not in cli.everything


def test_get_unknown_profile(cli: Cli) -> None:
    assert "no profile 'ghost'" in cli.fails(1, "profile", "get", "ghost")
    assert "profile id" in cli.fails(2, "profile", "get", "not an id")


# ------------------------------------------------------------ profile delete


def test_delete_refuses_while_credentials_use_the_profile(cli: Cli, tmp_path: Path) -> None:
    make_profile(cli, "acme")
    import_lines(cli, tmp_path, cred_line("c1", "acme", 1), cred_line("c2", "acme", 2))
    error = cli.fails(1, "profile", "delete", "acme")
    assert "2 credential" in error
    assert "--force" in error
    assert cli.ok("profile", "get", "acme")["credentials_count"] == 2
    assert [c["id"] for c in cli.ok("credential", "list")["result"]] == ["c1", "c2"]


def test_forced_delete_removes_the_profile_and_its_credentials(cli: Cli, tmp_path: Path) -> None:
    make_profile(cli, "acme")
    make_profile(cli, "other")
    import_lines(
        cli, tmp_path,
        cred_line("c1", "acme", 1), cred_line("c2", "acme", 2, expires_in=0),
        cred_line("c3", "acme", 3), cred_line("keep", "other", 4),
    )  # fmt: skip
    assert cli.ok("profile", "delete", "acme", "--force") == {
        "deleted": "acme",
        "credentials_deleted": 3,
    }
    assert "no profile" in cli.fails(1, "profile", "get", "acme")
    assert [p["id"] for p in cli.ok("profile", "list")["result"]] == ["other"]
    # no orphans: only the other profile's credential is left, and counted
    remaining = cli.ok("credential", "list")["result"]
    assert [(c["id"], c["profile"]) for c in remaining] == [("keep", "other")]
    status = cli.ok("status")
    assert status["credentials"] == 1
    assert status["by_status"] == {"active": 1}
    assert status["by_profile"] == {"other": 1}
    assert status["scheduled"] == 1
    assert status["backlog"] == 0
    # once its last credential goes too, everything counts zero
    cli.ok("profile", "delete", "other", "--force")
    assert cli.ok("credential", "list")["result"] == []
    status = cli.ok("status")
    assert (status["credentials"], status["by_status"], status["by_profile"]) == (0, {}, {})
    assert (status["scheduled"], status["backlog"], status["next_due_ms"]) == (0, 0, None)
    # the id is free again, with nothing attached
    assert make_profile(cli, "acme")["credentials_count"] == 0


def test_delete_unused_profile(cli: Cli) -> None:
    make_profile(cli, "acme")
    assert cli.ok("profile", "delete", "acme") == {"deleted": "acme", "credentials_deleted": 0}
    assert cli.ok("profile", "list")["result"] == []
    assert "no profile" in cli.fails(1, "profile", "delete", "acme")


def test_forced_delete_during_an_import_leaves_no_orphans(cli: Cli) -> None:
    make_profile(cli, "acme")
    lines = [json.dumps(cred_line(f"c{n:03d}", "acme", n)) + "\n" for n in range(257)]
    with subprocess.Popen(
        [sys.executable, "-m", "worker", "credential", "import", "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as importer:  # fmt: skip
        try:
            assert importer.stdin is not None
            importer.stdin.write("".join(lines[:256]))  # one full batch: imported at once
            importer.stdin.flush()
            try:
                wait_until(
                    lambda: cli.ok("status")["credentials"] == 256, within=20, what="first batch"
                )
            except AssertionError as exc:  # not the bug under test: fail, don't xfail
                raise RuntimeError(f"the import did not take its first batch: {exc}") from None
            deleted = cli.ok("profile", "delete", "acme", "--force")
            assert deleted["credentials_deleted"] == 256
            importer.communicate("".join(lines[256:]), timeout=20)
        finally:
            if importer.poll() is None:
                importer.kill()
    assert "no profile" in cli.fails(1, "profile", "get", "acme")
    orphans = [c["id"] for c in cli.ok("credential", "list")["result"]]
    assert orphans == []


# --------------------------------------------------------- credential import


def test_import_good_lines(cli: Cli, tmp_path: Path) -> None:
    make_profile(cli, "acme")
    expires_at_s = int(time.time()) + 7200
    expires_at_ms = (int(time.time()) + 5400) * 1000
    path = write_jsonl(
        tmp_path / "good.jsonl",
        [
            cred_line("c1", "acme", 1),
            "",
            "   ",
            cred_line("c2", "acme", 2, expires_in=0),
            cred_line("c3", "acme", 3, scope="read", token_type="MAC", expires_in=60),
            without(cred_line("c4", "acme", 4), "expires_in") | {"expires_at": expires_at_s},
            without(cred_line("c5", "acme", 5), "expires_in") | {"expires_at": expires_at_ms},
        ],
    )
    summary = cli.ok("credential", "import", str(path))
    assert summary == {"lines": 5, "created": 5, "replaced": 0, "failed": 0, "errors": []}
    creds = {c["id"]: c for c in cli.ok("credential", "list")["result"]}
    assert sorted(creds) == ["c1", "c2", "c3", "c4", "c5"]
    assert creds["c3"]["scope"] == "read"
    assert creds["c3"]["token_type"] == "MAC"
    assert creds["c1"]["token_type"] == "Bearer"
    assert creds["c4"]["expires_at_ms"] == expires_at_s * 1000  # seconds since the epoch
    assert creds["c5"]["expires_at_ms"] == expires_at_ms  # milliseconds since the epoch
    assert all(c["status"] == "active" and c["version"] == 0 for c in creds.values())
    revealed = cli.ok("credential", "get", "c3", "--reveal")
    assert (revealed["access_token"], revealed["refresh_token"]) == ("AT-3-9f3c1e", "RT-3-4b7d2a")
    assert cli.ok("profile", "get", "acme")["credentials_count"] == 5


def test_import_reports_bad_lines_by_number_and_keeps_the_good_ones(
    cli: Cli, tmp_path: Path
) -> None:
    make_profile(cli, "acme")
    no_expiry = without(cred_line("c-noexp", "acme", 13), "expires_in")
    lines: list[dict[str, Any] | str] = [
        cred_line("c1", "acme", 1),  # 1 good
        "",  # 2 blank: ignored, still counted in line numbers
        '{"id": "c-trunc", "profile": "acme", "access_token": "AT-3-9f3c1e", "refre',  # 3
        without(cred_line("c-noprofile", "acme", 4), "profile"),  # 4 missing field
        cred_line("c-ghost", "ghost", 5),  # 5 unknown profile
        cred_line("c-both", "acme", 6, expires_at=int(time.time()) + 60),  # 6 both expiries
        cred_line("c2", "acme", 7),  # 7 good
        cred_line("bad id!", "acme", 8),  # 8 bad id
        cred_line("c-empty", "acme", 9, refresh_token=""),  # 9 empty token
        "   ",  # 10 blank
        cred_line("c3", "acme", 11),  # 11 good
        json.dumps(["AT-12-9f3c1e", "RT-12-4b7d2a"]),  # 12 not an object
        no_expiry,  # 13 neither expiry
        cred_line("c-typo", "acme", 14, refresh="RT-14-extra"),  # 14 unknown field
        cred_line("c4", "acme", 15),  # 15 good
        cred_line("c-type", "acme", 16, access_token=["AT-16-9f3c1e"]),  # 16 token not a string
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    result = cli("credential", "import", str(path))
    assert result.code == 1
    assert "Traceback" not in result.err
    summary = result.json()
    expected_errors = {
        3: "not valid JSON",
        4: "profile id",
        5: "unknown profile 'ghost'",
        6: "exactly one of expires_in",
        8: "credential id",
        9: "refresh_token",
        12: "not a JSON object",
        13: "exactly one of expires_in",
        14: "unknown field(s): refresh",
        16: "access_token",
    }
    assert [e["line"] for e in summary["errors"]] == sorted(expected_errors)
    for error in summary["errors"]:
        assert expected_errors[error["line"]] in error["error"], error
    assert summary["lines"] == 14
    assert summary["failed"] == len(expected_errors)
    assert summary["created"] == 4
    # the good lines are all there, with their own tokens; nothing else is
    creds = cli.ok("credential", "list")["result"]
    assert [c["id"] for c in creds] == ["c1", "c2", "c3", "c4"]
    for cred_id, n in (("c1", 1), ("c2", 7), ("c3", 11), ("c4", 15)):
        revealed = cli.ok("credential", "get", cred_id, "--reveal")
        assert revealed["access_token"] == f"AT-{n}-9f3c1e"
    # no token of any line appears in what the import printed
    for n in range(1, 17):
        assert f"AT-{n}-" not in result.out + result.err
        assert f"RT-{n}-" not in result.out + result.err


def test_import_replace_semantics(cli: Cli, tmp_path: Path) -> None:
    make_profile(cli, "acme")
    make_profile(cli, "other")
    import_lines(cli, tmp_path, cred_line("c1", "acme", "old"))
    path = write_jsonl(
        tmp_path / "again.jsonl",
        [cred_line("c1", "other", "new"), cred_line("c2", "acme", "c2")],
    )

    # without --replace an existing id is an error for that line only
    result = cli("credential", "import", str(path))
    assert result.code == 1
    summary = result.json()
    assert summary["created"] == 1
    assert summary["replaced"] == 0
    assert [e["line"] for e in summary["errors"]] == [1]
    assert "already exists" in summary["errors"][0]["error"]
    c1 = cli.ok("credential", "get", "c1", "--reveal")
    assert (c1["access_token"], c1["profile"], c1["version"]) == ("AT-old-9f3c1e", "acme", 0)

    # with --replace both lines overwrite (c2 was created by the run above)
    summary = cli.ok("credential", "import", str(path), "--replace")
    assert summary == {"lines": 2, "created": 0, "replaced": 2, "failed": 0, "errors": []}
    c1 = cli.ok("credential", "get", "c1", "--reveal")
    assert (c1["access_token"], c1["refresh_token"]) == ("AT-new-9f3c1e", "RT-new-4b7d2a")
    assert c1["profile"] == "other"
    assert c1["version"] == 1  # new tokens: a claim taken before cannot commit over them
    status = cli.ok("status")
    assert status["credentials"] == 2
    assert status["by_profile"] == {"acme": 1, "other": 1}


def test_import_from_stdin(cli: Cli) -> None:
    make_profile(cli, "acme")
    stdin = "\n".join(json.dumps(cred_line(f"c{n}", "acme", n)) for n in range(3)) + "\n\n"
    summary = cli.ok("credential", "import", "-", stdin=stdin)
    assert summary == {"lines": 3, "created": 3, "replaced": 0, "failed": 0, "errors": []}
    assert [c["id"] for c in cli.ok("credential", "list")["result"]] == ["c0", "c1", "c2"]


def test_import_missing_file(cli: Cli, tmp_path: Path) -> None:
    assert "cannot open" in cli.fails(2, "credential", "import", str(tmp_path / "nope.jsonl"))


def test_replace_with_duplicate_ids_in_one_file_keeps_the_last_line(
    cli: Cli, tmp_path: Path, redis_url: str
) -> None:
    make_profile(cli, "acme")
    # 64 ids, each four times: all 256 lines fall in one batch
    lines = [cred_line(f"c{n:02d}", "acme", f"v{v}") for v in range(4) for n in range(64)]
    path = write_jsonl(tmp_path / "dups.jsonl", lines)
    summary = cli.ok("credential", "import", str(path), "--replace")
    assert (summary["created"], summary["replaced"], summary["failed"]) == (64, 192, 0)
    records = stored_records(redis_url, [f"c{n:02d}" for n in range(64)])
    stored = {n: record["access_token"] for n, record in enumerate(records)}
    assert {n: token for n, token in stored.items() if token != "AT-v3-9f3c1e"} == {}


def test_import_line_that_is_not_utf8_is_reported_by_number(cli: Cli, tmp_path: Path) -> None:
    make_profile(cli, "acme")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps(cred_line("c1", "acme", 1)).encode()
        + b'\n{"id": "c\xe9", "profile": "acme"}\n'
        + json.dumps(cred_line("c2", "acme", 2)).encode()
        + b"\n"
    )
    result = cli("credential", "import", str(path))
    assert result.code == 1
    assert [e["line"] for e in result.json()["errors"]] == [2]
    assert [c["id"] for c in cli.ok("credential", "list")["result"]] == ["c1", "c2"]


def test_a_deeply_nested_line_is_reported_and_the_rest_imported(cli: Cli, tmp_path: Path) -> None:
    """Issue 10: 100,000 nested arrays crashed the import with a traceback
    (RecursionError) and lost the lines read before it but not yet written."""
    make_profile(cli, "acme")
    lines: list[dict[str, Any] | str] = [
        cred_line("c1", "acme", 1),
        cred_line("c2", "acme", 2),
        "[" * 100_000 + "]" * 100_000,
        '{"id": ' * 30_000,
        cred_line("c3", "acme", 3),
    ]
    result = cli("credential", "import", str(write_jsonl(tmp_path / "deep.jsonl", lines)))
    assert result.code == 1
    assert "Traceback" not in result.err
    summary = result.json()
    assert (summary["lines"], summary["created"], summary["failed"]) == (5, 3, 2)
    assert summary["errors"] == [
        {"line": 3, "error": "JSON nested too deeply"},
        {"line": 4, "error": "JSON nested too deeply"},
    ]
    assert [c["id"] for c in cli.ok("credential", "list")["result"]] == ["c1", "c2", "c3"]


def test_oversized_tokens_and_lines_are_refused_by_number(cli: Cli, tmp_path: Path) -> None:
    """Issue 10: a 5 MB token was accepted. Tokens are capped at 16 KiB,
    a line at 256 KiB (never read whole); the messages never echo a value."""
    make_profile(cli, "acme")
    big = "B" * (16 * 1024 + 1)
    lines = [
        cred_line("c-max", "acme", 1, refresh_token="R" * 16 * 1024),  # 1 at the cap: fine
        cred_line("c-rt", "acme", 2, refresh_token=big),  # 2
        cred_line("c-at", "acme", 3, access_token=big),  # 3
        cred_line("c-5mb", "acme", 4, refresh_token="M" * 5_000_000),  # 4
        cred_line("c-tt", "acme", 5, token_type="T" * 65),  # 5
        cred_line("c-scope", "acme", 6, scope="s" * (16 * 1024 + 1)),  # 6
        cred_line("c-ok", "acme", 7),  # 7
    ]
    result = cli("credential", "import", str(write_jsonl(tmp_path / "big.jsonl", lines)))
    assert result.code == 1
    summary = result.json()
    assert summary["created"] == 2
    assert summary["errors"] == [
        {"line": 2, "error": "refresh_token is longer than 16,384 bytes"},
        {"line": 3, "error": "access_token is longer than 16,384 bytes"},
        {"line": 4, "error": "line is longer than 262,144 bytes"},
        {"line": 5, "error": "token_type is longer than 64 characters"},
        {"line": 6, "error": "scope is longer than 16,384 bytes"},
    ]
    assert "BBBB" not in result.out + result.err
    assert "MMMM" not in result.out + result.err
    assert [c["id"] for c in cli.ok("credential", "list")["result"]] == ["c-max", "c-ok"]


def test_an_overlong_line_from_stdin_is_reported_too(cli: Cli) -> None:
    make_profile(cli, "acme")
    stdin = json.dumps(cred_line("c1", "acme", 1, refresh_token="M" * 300_000)) + "\n"
    stdin += json.dumps(cred_line("c2", "acme", 2)) + "\n"
    result = cli("credential", "import", "-", stdin=stdin)
    assert result.code == 1
    assert result.json()["errors"] == [{"line": 1, "error": "line is longer than 262,144 bytes"}]
    assert [c["id"] for c in cli.ok("credential", "list")["result"]] == ["c2"]


def test_id_with_trailing_newline_is_rejected(cli: Cli, tmp_path: Path) -> None:
    make_profile(cli, "acme")
    path = write_jsonl(tmp_path / "nl.jsonl", [cred_line("c1\n", "acme", 1)])
    result = cli("credential", "import", str(path))
    assert result.code == 1
    assert [e["line"] for e in result.json()["errors"]] == [1]


# ------------------------------------------------ credential get/list/delete


def test_credential_get_list_delete(cli: Cli, tmp_path: Path) -> None:
    make_profile(cli, "acme")
    import_lines(cli, tmp_path, cred_line("c1", "acme", 1), cred_line("c2", "acme", 2))

    masked = cli.ok("credential", "get", "c1")
    assert masked["access_token"] == "[hidden]"
    assert masked["refresh_token"] == "[hidden]"
    assert masked["id"] == "c1"
    assert masked["profile"] == "acme"
    revealed = cli.ok("credential", "get", "c1", "--reveal")
    assert revealed["access_token"] == "AT-1-9f3c1e"
    assert revealed["refresh_token"] == "RT-1-4b7d2a"
    assert {k: v for k, v in revealed.items() if not k.endswith("_token")} == {
        k: v for k, v in masked.items() if not k.endswith("_token")
    }

    listed = cli("credential", "list")
    assert [c["id"] for c in listed.json()["result"]] == ["c1", "c2"]
    table = cli("credential", "list", "--table")
    rows = table_rows(table.out)
    assert [(r["ID"], r["PROFILE"], r["STATUS"], r["VERSION"]) for r in rows] == [
        ("c1", "acme", "active", "0"),
        ("c2", "acme", "active", "0"),
    ]
    assert "EXPIRES_AT_MS" in rows[0]
    for output in (listed.out, table.out, masked_text := json.dumps(masked)):
        for n in (1, 2):
            assert f"AT-{n}-" not in output
            assert f"RT-{n}-" not in output
    assert "[hidden]" in masked_text

    assert cli.ok("credential", "delete", "c1") == {"deleted": "c1"}
    assert "no credential 'c1'" in cli.fails(1, "credential", "get", "c1")
    assert "no credential 'c1'" in cli.fails(1, "credential", "delete", "c1")
    assert [c["id"] for c in cli.ok("credential", "list")["result"]] == ["c2"]
    assert cli.ok("status")["credentials"] == 1
    assert cli.ok("profile", "get", "acme")["credentials_count"] == 1


def test_credential_list_limit_zero(cli: Cli, tmp_path: Path) -> None:
    make_profile(cli, "acme")
    import_lines(cli, tmp_path, *(cred_line(f"c{n}", "acme", n) for n in range(3)))
    result = cli("credential", "list", "--limit", "0")
    assert result.code == 2 or result.json()["result"] == []


# -------------------------------------------------------------------- status


def test_status_counts_backlog_and_next_due(cli: Cli, tmp_path: Path) -> None:
    make_profile(cli, "acme")
    make_profile(cli, "other")
    before_ms = int(time.time() * 1000)
    import_lines(
        cli, tmp_path,
        cred_line("due-now", "acme", 1, expires_in=0),
        without(cred_line("expired", "acme", 2), "expires_in")
        | {"expires_at": int(time.time()) - 600},
        cred_line("later", "other", 3, expires_in=7200),
    )  # fmt: skip
    status = cli.ok("status")
    assert status["credentials"] == 3
    assert status["by_status"] == {"active": 3}
    assert status["by_profile"] == {"acme": 2, "other": 1}
    assert status["scheduled"] == 3
    assert status["backlog"] == 2
    assert before_ms - 1000 <= status["next_due_ms"] <= int(time.time() * 1000)
    assert status["next_due_in_s"] <= 0

    for cred_id in ("due-now", "expired"):
        cli.ok("credential", "delete", cred_id)
    status = cli.ok("status")
    assert (status["credentials"], status["scheduled"], status["backlog"]) == (1, 1, 0)
    # 7200 s lifetime: the default lead is 20 % (1440 s) plus up to 10 % jitter
    assert 7200 - 1440 * 1.1 - 5 <= status["next_due_in_s"] <= 7200 - 1440 + 1
    due_ms = cli.ok("credential", "get", "later")["due_at_ms"]
    assert status["next_due_ms"] == due_ms


# ------------------------------------------------------ credential refresh


def test_refresh_against_the_provider(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, provider: ProviderThread
) -> None:
    fake_profile(cli, monkeypatch, provider)
    grant = import_grant(cli, tmp_path, provider, "c1")
    result = cli("credential", "refresh", "c1")
    assert result.code == 0, result
    out = result.json()
    assert out["credential_id"] == "c1"
    assert out["outcome"] == "refreshed"
    assert out["credential"]["version"] == 1
    assert out["credential"]["status"] == "active"
    assert out["credential"]["access_token"] == "[hidden]"

    state = provider.grant_state(grant.grant_id)
    assert state.refreshes == 1
    stored = cli.ok("credential", "get", "c1", "--reveal")
    assert stored["access_token"] == state.access_token != grant.access_token
    assert stored["refresh_token"] == state.refresh_token != grant.refresh_token
    assert stored["version"] == 1
    assert stored["failures"] == 0
    assert stored["refreshed_at_ms"] is not None
    assert abs(stored["expires_at_ms"] - (time.time() + 3600) * 1000) < 60_000
    assert provider.send_counts() == {grant.refresh_token: 1}
    for token in (grant.access_token, grant.refresh_token, state.access_token, state.refresh_token):
        assert token not in result.out + result.err
    assert "no credential" in cli.fails(1, "credential", "refresh", "ghost")


def test_import_replace_never_writes_back_a_spent_refresh_token(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, provider: ProviderThread
) -> None:
    """Issue 10: re-importing an old line after a rotation would have sent
    the spent refresh token again (and, for a rotating provider, revoked the
    grant). The line is refused by number and credential id, without the
    token; the stored tokens stay; the rest of the file is imported."""
    fake_profile(cli, monkeypatch, provider)
    grant = import_grant(cli, tmp_path, provider, "c1")
    old_line = {
        "id": "c1",
        "profile": "fp",
        "access_token": grant.access_token,
        "refresh_token": grant.refresh_token,
        "expires_in": 0,
    }
    assert cli("credential", "refresh", "c1").code == 0
    rotated = cli.ok("credential", "get", "c1", "--reveal")
    assert rotated["refresh_token"] != grant.refresh_token

    path = write_jsonl(tmp_path / "old.jsonl", [cred_line("c2", "fp", 2), old_line])
    result = cli("credential", "import", str(path), "--replace")
    assert result.code == 1
    summary = result.json()
    assert (summary["created"], summary["replaced"]) == (1, 0)
    [error] = summary["errors"]
    assert error["line"] == 2
    assert "c1" in error["error"]
    assert "already spent" in error["error"]
    for token in (grant.refresh_token, grant.access_token, rotated["refresh_token"]):
        assert token not in result.out + result.err
    stored = cli.ok("credential", "get", "c1", "--reveal")
    assert stored["refresh_token"] == rotated["refresh_token"]
    assert stored["version"] == rotated["version"]

    # the current tokens may be re-imported, and the next refresh spends them
    current = old_line | {"refresh_token": rotated["refresh_token"]}
    assert cli.ok("credential", "import", str(write_jsonl(tmp_path / "cur.jsonl", [current])),
                  "--replace")["replaced"] == 1  # fmt: skip
    assert cli("credential", "refresh", "c1").code == 0
    assert provider.send_counts()[grant.refresh_token] == 1
    assert max(provider.send_counts().values()) == 1


def test_refresh_refused_by_the_provider_needs_reauth(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, provider: ProviderThread
) -> None:
    fake_profile(cli, monkeypatch, provider)
    grant = import_grant(cli, tmp_path, provider, "c1")
    second = import_grant(cli, tmp_path, provider, "c2")
    provider.inject(
        Fault(
            "status",
            match_refresh_token=grant.refresh_token,
            status=400,
            body={"error": "invalid_grant", "error_description": "Token has been revoked."},
        )
    )
    result = cli("credential", "refresh", "c1")
    assert result.code == 1
    assert "Traceback" not in result.err
    out = result.json()
    assert out["outcome"] == "needs_reauth"
    assert out["credential"]["status"] == "needs_reauth"
    stored = cli.ok("credential", "get", "c1")
    assert stored["status"] == "needs_reauth"
    assert stored["due_at_ms"] is None  # no longer scheduled
    assert stored["version"] == 0
    assert "invalid_grant" in stored["last_error"]
    status = cli.ok("status")
    assert status["by_status"] == {"active": 1, "needs_reauth": 1}
    assert status["scheduled"] == 1
    assert status["failing_by_reason"] == {"invalid_grant": 1}

    # a stopped credential is not refreshed until an operator puts it back
    refused = cli.fails(1, "credential", "refresh", "c1")
    assert "needs_reauth" in refused
    assert "credential resume c1" in refused
    assert cli.ok("credential", "resume", "c1") == {
        "resumed": "c1",
        "previous_status": "needs_reauth",
    }
    assert "already active" in cli.fails(1, "credential", "resume", "c1")
    assert cli.ok("credential", "refresh", "c1")["outcome"] == "refreshed"

    # ... or re-imports it with fresh tokens
    provider.inject(Fault("status", match_refresh_token=second.refresh_token, status=400,
                          body={"error": "invalid_grant"}))  # fmt: skip
    assert cli("credential", "refresh", "c2").code == 1
    import_grant(cli, tmp_path, provider, "c2", replace=True)
    assert cli.ok("credential", "get", "c2")["status"] == "active"
    assert cli.ok("credential", "refresh", "c2")["outcome"] == "refreshed"
    status = cli.ok("status")
    assert status["by_status"] == {"active": 2}
    assert status["scheduled"] == 2
    assert not status.get("failing_by_reason")


# --------------------------------------------------------------------- watch


def _wait_for_subscriber(redis_url: str, watcher: subprocess.Popen[str]) -> None:
    """`watch` says on stderr when it is following (from the event log:
    nothing committed after this line is missed)."""
    assert watcher.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = watcher.stderr.readline()
        assert line, watcher.communicate()
        if line.startswith("watching"):
            return
    raise AssertionError("watch never said it was watching")


def test_watch_prints_one_masked_event(
    cli: Cli,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    provider: ProviderThread,
    redis_url: str,
) -> None:
    fake_profile(cli, monkeypatch, provider)
    grant = import_grant(cli, tmp_path, provider, "c1")
    # the installed console script, and the refresh as another real process
    with subprocess.Popen(
        [REFRESHD, "watch", "--count", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as watcher:  # fmt: skip
        try:
            _wait_for_subscriber(redis_url, watcher)
            refreshed = run_refreshd("credential", "refresh", "c1")
            out, err = watcher.communicate(timeout=20)
        finally:
            if watcher.poll() is None:
                watcher.kill()
    assert refreshed.code == 0, refreshed
    assert refreshed.json()["outcome"] == "refreshed"
    assert watcher.returncode == 0, err
    state = provider.grant_state(grant.grant_id)
    lines = out.splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["type"] == "token.refreshed"
    assert event["credential_id"] == "c1"
    assert event["profile"] == "fp"
    assert event["version"] == 1
    assert event["access_token"] == f"[{fingerprint(state.access_token)}]"
    assert "refresh_token" not in event
    for output in (out + err, refreshed.out + refreshed.err):
        assert state.access_token not in output
        assert state.refresh_token not in output
        assert grant.refresh_token not in output


def test_watch_reveal_shows_the_access_token(
    cli: Cli,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    provider: ProviderThread,
    redis_url: str,
) -> None:
    fake_profile(cli, monkeypatch, provider)
    grant = import_grant(cli, tmp_path, provider, "c1")
    with subprocess.Popen(
        [sys.executable, "-m", "worker", "watch", "--reveal", "--count", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as watcher:  # fmt: skip
        try:
            _wait_for_subscriber(redis_url, watcher)
            assert cli.ok("credential", "refresh", "c1")["outcome"] == "refreshed"
            out, err = watcher.communicate(timeout=20)
        finally:
            if watcher.poll() is None:
                watcher.kill()
    assert watcher.returncode == 0, err
    event = json.loads(out)
    state = provider.grant_state(grant.grant_id)
    assert event["access_token"] == state.access_token
    assert "refresh_token" not in event
    assert state.refresh_token not in out


# ------------------------------------------------------------ settings, help


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("REFRESHD_CONCURRENCY", "abc", "REFRESHD_CONCURRENCY is not an integer: 'abc'"),
        ("REFRESHD_FOO", "1", "unknown setting(s): REFRESHD_FOO"),
        ("REFRESHD_LEASE_SECONDS", "1", "REFRESHD_LEASE_SECONDS must be at least 5"),
        ("REFRESHD_STRICT_SERVER", "perhaps", "REFRESHD_STRICT_SERVER is not a boolean"),
    ],
)
def test_settings_errors_name_the_variable(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    assert message in cli.fails(2, "status")


def test_unreachable_redis_is_a_one_line_error(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFRESHD_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert "redis unavailable" in cli.fails(1, "status")


def test_help_lists_every_setting(cli: Cli) -> None:
    result = cli("--help")
    assert result.code == 0
    for env, default, _help in SETTINGS_DOC:
        lines = [line for line in result.out.splitlines() if line.split()[:1] == [env]]
        assert len(lines) == 1, env
        if default:
            assert f"[default: {default}]" in lines[0], lines[0]
    assert len(SETTINGS_DOC) >= 20


@pytest.mark.parametrize(
    "command",
    [
        "run", "demo", "status", "watch", "server",
        "profile create", "profile update", "profile list", "profile get", "profile delete",
        "profile presets",
        "credential import", "credential get", "credential list", "credential delete",
        "credential refresh", "credential resume",
    ],
)  # fmt: skip
def test_every_command_has_help(cli: Cli, command: str) -> None:
    result = cli(*command.split(), "--help")
    assert result.code == 0, result.err
    assert result.out.startswith(f"usage: refreshd {command}")


def test_profile_flags_set_the_rate_and_lifecycle_knobs(cli: Cli) -> None:
    shown = make_profile(
        cli, "knobs", "--rate-limit", "10", "--rate-limit-burst", "3",
        "--max-refresh-interval", "86400", "--give-up-after", "3600",
    )  # fmt: skip
    assert shown["rate_limit_per_s"] == 10
    assert shown["rate_limit_burst"] == 3
    assert shown["max_refresh_interval_s"] == 86400
    assert shown["give_up_after_s"] == 3600
    line = cli.fails(2, "profile", "create", "bad", "--token-url", HTTPS_URL,
                     "--max-refresh-interval", "5")  # fmt: skip
    assert "max_refresh_interval_s" in line


def test_with_a_key_ring_tokens_are_stored_encrypted_and_revealed_in_clear(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """Encryption at rest through the CLI: import writes ciphertext, `get
    --reveal` shows the tokens to an operator holding the ring; without
    the ring it says which key is missing, in one line; a malformed ring is
    one line that never shows the key."""
    key = "k1:" + base64.b64encode(bytes(range(32))).decode()
    monkeypatch.setenv("REFRESHD_ENCRYPTION_KEYS", key)
    make_profile(cli, "acme")
    import_lines(cli, tmp_path, cred_line("c1", "acme", 1))
    [stored] = stored_records(redis_url, ["c1"])  # read without the ring: as stored
    assert stored["access_token"].startswith(RECORD_MARK + "k1.")
    assert "AT-1-9f3c1e" not in json.dumps(stored)
    revealed = cli.ok("credential", "get", "c1", "--reveal")
    assert (revealed["access_token"], revealed["refresh_token"]) == ("AT-1-9f3c1e", "RT-1-4b7d2a")
    assert cli.ok("profile", "get", "acme")["id"] == "acme"

    monkeypatch.delenv("REFRESHD_ENCRYPTION_KEYS")
    shown = cli.ok("credential", "get", "c1")  # no --reveal: nothing to decrypt
    assert shown["access_token"] == "[hidden]"
    line = cli.fails(1, "credential", "get", "c1", "--reveal")
    assert "unknown_key" in line
    assert "'k1'" in line

    monkeypatch.setenv("REFRESHD_ENCRYPTION_KEYS", key[:-8])
    line = cli.fails(2, "credential", "get", "c1")
    assert line.startswith("REFRESHD_ENCRYPTION_KEYS: key 'k1' (entry 1)")
    assert key[3:-8] not in line
