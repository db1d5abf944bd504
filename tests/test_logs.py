"""The log pipeline never lets a token or secret through.

Every assertion reads the *rendered* output of the real configuration, since
that is what an operator (or a log shipper) sees.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest
import structlog

import worker.logs
from worker.logs import (
    REDACTED,
    configure_logging,
    debug_enabled,
    fingerprint,
    get_logger,
    redact,
    scrub,
)

SECRET = "s3cr3tV4lue"  # every secret in this module contains this marker


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Tests reconfigure process-wide logging; put it back for other modules."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    our_level = worker.logs._level
    yield
    worker.logs._level = our_level
    structlog.contextvars.clear_contextvars()
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def out() -> io.StringIO:
    stream = io.StringIO()
    configure_logging("debug", stream=stream)
    return stream


def fail(exc: Exception) -> NoReturn:
    raise exc


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def assert_clean(stream: io.StringIO) -> str:
    text = stream.getvalue()
    assert text, "nothing was logged"
    assert SECRET not in text
    return text


@pytest.mark.parametrize(
    "key",
    [
        "access_token",
        "refresh_token",
        "id_token",
        "client_secret",
        "secret",
        "password",
        "passcode",
        "api_token",
        "token",
        "Authorization",
        "cookie",
        "Set-Cookie",
        "github_token",
        "webhook_secret",
        "db_password_file",
        "REFRESH_TOKEN",
    ],
)
def test_secret_keys_are_redacted(out: io.StringIO, key: str) -> None:
    get_logger("t").info("token.refresh.succeeded", **{key: f"x-{SECRET}"})
    assert_clean(out)
    assert lines(out)[0][key] == REDACTED


def test_none_stays_none_and_harmless_keys_stay(out: io.StringIO) -> None:
    fp = fingerprint(f"rt-{SECRET}")
    get_logger("t").info(
        "token.refresh.succeeded",
        refresh_token=None,
        refresh_token_fp=fp,
        token_type="Bearer",
        expires_in=3600,
    )
    line = lines(out)[0]
    assert line["refresh_token"] is None
    assert line["refresh_token_fp"] == fp
    assert line["token_type"] == "Bearer"
    assert line["expires_in"] == 3600
    assert line["event"] == "token.refresh.succeeded"
    assert line["level"] == "info"
    assert line["logger"] == "t"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line["ts"])


def test_nested_structures(out: io.StringIO) -> None:
    body = {
        "tokens": [{"access_token": f"a-{SECRET}", "expires_in": 60}],
        "meta": ({"client": {"client_secret": f"c-{SECRET}"}},),
        "headers": [("Authorization", f"Bearer {SECRET}"), ("Accept", "json")],
        "tags": {f"refresh_token={SECRET}"},
    }
    get_logger().info("provider.response", body=body)
    assert_clean(out)
    logged = lines(out)[0]["body"]
    assert logged["tokens"][0] == {"access_token": REDACTED, "expires_in": 60}
    assert logged["meta"][0]["client"]["client_secret"] == REDACTED
    assert logged["headers"][1] == ["Accept", "json"]
    # The caller's object is not modified.
    assert body["tokens"][0]["access_token"] == f"a-{SECRET}"  # type: ignore[index]


def test_cyclic_structures_do_not_hang(out: io.StringIO) -> None:
    loop: list[Any] = [f"token={SECRET}"]
    loop.append(loop)
    get_logger().info("cycle", data=loop)
    assert_clean(out)


@pytest.mark.parametrize(
    "text",
    [
        f"Authorization: Bearer {SECRET}.eyJ-_~+/=",
        f"authorization: basic {SECRET}==",
        f"grant_type=refresh_token&refresh_token={SECRET}&client_id=app",
        f"https://idp.example/cb?access_token={SECRET}&state=1",
        f"client_secret={SECRET}",
        f"api_token={SECRET}",
        f"passcode={SECRET}",
        f'{{"refresh_token": "{SECRET}", "token_type": "Bearer"}}',
        f'{{"refresh_token":"{SECRET}\\"more"}}',
        f"{{'access_token': '{SECRET}'}}",
        f'"{{\\"refresh_token\\": \\"{SECRET}\\"}}"',
        f'body={{"refresh_token": "{SECRET}',  # truncated body
        f"redis://default:{SECRET}@redis.internal:6379/0",
        f"rediss://:{SECRET}@redis.internal",
        f"Cookie: session={SECRET}",
    ],
)
def test_secret_text_is_scrubbed_everywhere(out: io.StringIO, text: str) -> None:
    log = get_logger("t")
    log.info(text)  # in the event
    log.info("provider.error", detail=text, nested={"list": [text]})
    structlog.contextvars.bind_contextvars(request=text)
    log.info("with.context")
    log.info("interpolated %s", text)
    assert_clean(out)
    assert REDACTED in out.getvalue()


def test_scrub_keeps_what_is_not_secret() -> None:
    text = "token.refresh.succeeded grant_type=refresh_token&token_type=Bearer&expires_in=60"
    text += " http://h:80/p@x"
    assert scrub(text) == text
    once = scrub(f"refresh_token={SECRET} redis://:{SECRET}@h Bearer {SECRET}")
    assert scrub(once) == once  # idempotent: already-redacted text is stable


def test_foreign_objects_are_scrubbed_via_repr(out: io.StringIO) -> None:
    @dataclass
    class Tokens:
        access_token: str
        refresh_token: str

    get_logger().info("tokens", tokens=Tokens(f"a{SECRET}", f"r{SECRET}"), raw=SECRET.encode())
    text = out.getvalue()
    assert f"a{SECRET}" not in text
    assert f"r{SECRET}" not in text


def test_exception_text_is_scrubbed(out: io.StringIO) -> None:
    log = get_logger("t")
    try:
        fail(RuntimeError(f'provider said {{"refresh_token": "{SECRET}"}} for Bearer {SECRET}'))
    except RuntimeError:
        log.exception("token.refresh.failed")
    try:
        fail(ConnectionError(f"cannot reach redis://u:{SECRET}@h:6379"))
    except ConnectionError as exc:
        log.exception("store.down", error=exc)
    assert_clean(out)
    first, second = lines(out)
    assert "RuntimeError" in first["exception"]
    assert "ConnectionError" in second["exception"]
    assert "redis://u:[redacted]@h" in second["error"]


def test_console_format_is_redacted_too() -> None:
    stream = io.StringIO()
    configure_logging("info", fmt="console", stream=stream)
    log = get_logger("t")
    log.info("token.refresh.succeeded", access_token=SECRET, url=f"redis://:{SECRET}@h")
    try:
        fail(ValueError(f"refresh_token={SECRET}"))
    except ValueError:
        log.exception("boom")
    text = stream.getvalue()
    assert SECRET not in text
    assert "token.refresh.succeeded" in text
    assert "ValueError: refresh_token=[redacted]" in text


def test_stdlib_records_share_the_pipeline(out: io.StringIO) -> None:
    logging.getLogger("redis.connection").warning("retrying redis://:%s@h", SECRET)
    logging.getLogger("aiohttp.client").info("info from a library is dropped")
    try:
        fail(OSError(f"Authorization: Bearer {SECRET}"))
    except OSError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    assert_clean(out)
    warning, error = lines(out)
    assert warning["logger"] == "redis.connection"
    assert warning["level"] == "warning"
    assert warning["event"] == "retrying redis://:[redacted]@h"
    assert "OSError: Authorization: Bearer [redacted]" in error["exception"]


def test_reconfiguring_replaces_the_stdlib_handler(out: io.StringIO) -> None:
    second = io.StringIO()
    configure_logging("info", stream=second)
    logging.getLogger("redis").warning("once")
    get_logger().info("twice")
    assert out.getvalue() == ""
    assert [line["event"] for line in lines(second)] == ["once", "twice"]


def test_level_filtering(out: io.StringIO) -> None:
    log = get_logger("t")  # handed out before reconfiguration, still follows it
    configure_logging("warning", stream=out)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [line["event"] for line in lines(out)] == ["w", "e"]


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="level"):
        configure_logging("verbose")
    with pytest.raises(ValueError, match="format"):
        configure_logging("info", fmt="xml")


def test_redact_is_a_plain_processor() -> None:
    event = {"event": f"Bearer {SECRET}", "password": "x", "n": 1}
    assert redact(None, "info", event) == {
        "event": "Bearer [redacted]",
        "password": REDACTED,
        "n": 1,
    }


def test_fingerprint() -> None:
    fp = fingerprint(f"rt-{SECRET}")
    assert re.fullmatch(r"[0-9a-f]{12}", fp)
    assert fp == fingerprint(f"rt-{SECRET}")
    assert fp != fingerprint(f"rt-{SECRET}x")
    assert fingerprint("abc") == "ba7816bf8f01"  # sha256("abc"), a fixed vector


def test_debug_enabled_follows_the_configured_level() -> None:
    configure_logging("debug", stream=io.StringIO())
    assert debug_enabled()
    configure_logging("info", stream=io.StringIO())
    assert not debug_enabled()
