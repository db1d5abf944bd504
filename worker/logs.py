"""Structured logging with redaction built into the pipeline.

Guarantee served here: no token or client secret appears in logs. Every line,
ours via structlog and third-party ones via stdlib ``logging``, passes through
:func:`redact` after exceptions are rendered to text and before the renderer,
so no path to the output skips it. Tokens are named only by
:func:`fingerprint`, under a key such as ``token_fp`` (a key called ``token``
is redacted even if it holds a hash).

Belt and braces: secret-named *keys* lose their values, and every string
(event, values, exception text, reprs of foreign objects) is scrubbed for
secret-shaped *text*, because secrets mostly leak through text nobody thought
of as carrying one (a provider's error body, a Redis URL in an error).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO, cast

import structlog
from structlog.contextvars import merge_contextvars
from structlog.processors import add_log_level
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

# fmt: off
__all__ = ["REDACTED", "configure_logging", "debug_enabled", "fingerprint", "get_logger",
           "is_secret_key", "redact", "scrub"]
# fmt: on

REDACTED = "[redacted]"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS |= {"error": logging.ERROR, "critical": logging.CRITICAL}

# Libraries that log through stdlib logging; kept at WARNING so their debug
# chatter (which can include request lines and connection URLs) never shows.
_NOISY_LIBRARIES = ("aiohttp", "asyncio", "httpcore", "httpx", "redis", "valkey")

# fmt: off
_SECRET_NAMES = frozenset((
    "access_token", "refresh_token", "id_token", "client_secret", "secret", "password",
    "passcode", "api_token", "token", "authorization", "proxy_authorization", "cookie",
    "cookies", "set_cookie", "api_key", "apikey", "x_api_key",
))
# fmt: on

_SECRET_ENDS = ("_token", "_secret", "_authorization")

# Key names inside free text: anything ending in token/secret/password/passcode
# (refresh_token, client_secret, x-api-token, ...). "token_type" does not end so.
_TEXT_KEY = r"[\w-]*?(?:token|secret|passw(?:or)?d|passcode)"
_DQ = r'"(?:[^"\\]|\\.)*"'
_SQ = r"'(?:[^'\\]|\\.)*'"


def _keyvalue_repl(match: re.Match[str]) -> str:
    quote = '"' if match["dq"] else "'" if match["sq"] else ""
    return f"{match['k']}{match['sep']}{quote}{REDACTED}{quote}"


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


_SCRUBBERS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    # "refresh_token": "x" (JSON), 'refresh_token': 'x' (Python repr), the
    # backslash-escaped form of JSON inside a JSON string, and a value cut
    # short (a truncated error body).
    (
        _rx(
            rf"(?P<q>\\*[\"'])(?P<k>{_TEXT_KEY}|authorization|cookie|set-cookie)(?P=q)"
            r"(?P<sep>\s*:\s*)(?P<q2>\\*[\"'])(?:(?:\\.|[^\\])*?(?P=q2)|[^\s\"'\\,}]*)"
        ),
        rf"\g<q>\g<k>\g<q>\g<sep>\g<q2>{REDACTED}\g<q2>",
    ),
    # refresh_token=x in query strings and form bodies, token='x' in reprs,
    # "refresh_token: x" in prose.
    (
        _rx(
            rf"\b(?P<k>{_TEXT_KEY})(?P<sep>\s*[=:]\s*)(?!\[redacted\])"
            rf"(?:(?P<dq>{_DQ})|(?P<sq>{_SQ})|[\"']?[^&\s\"',;)}}\]>]+)"
        ),
        _keyvalue_repl,
    ),
    # Authorization header values; Cookie headers as text.
    (_rx(r"\b(?P<s>bearer|basic)(?P<sp>\s+)[^\s\"',;]+"), rf"\g<s>\g<sp>{REDACTED}"),
    (_rx(r"\b(?P<h>set-cookie|cookie)(?P<sep>\s*:\s*)[^\r\n]+"), rf"\g<h>\g<sep>{REDACTED}"),
    # scheme://user:password@host and scheme://:password@host.
    (_rx(r"\b(?P<pre>[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)[^@/?#\s]+@"), rf"\g<pre>{REDACTED}@"),
)

# Every rule above needs one of these words; most strings have none, and
# substring tests are far cheaper than five substitutions.
_MARKERS = ("token", "secret", "passw", "passcode", "bearer", "basic", "cookie", "authoriz", "://")
_MAX_DEPTH = 32


def scrub(text: str) -> str:
    """Replace secret-shaped fragments of free text with ``[redacted]``.

    Exposed for callers that store text outside the log pipeline (e.g. an
    error detail kept in Redis) and must uphold the same guarantee.
    """
    lowered = text.lower()
    if not any(marker in lowered for marker in _MARKERS):
        return text
    for pattern, replacement in _SCRUBBERS:
        text = pattern.sub(replacement, text)
    return text


@functools.lru_cache(maxsize=1024)
def is_secret_key(name: str) -> bool:
    """Whether a mapping key names a secret (case- and ``-``/``_``-insensitive)."""
    key = name.lower().replace("-", "_")
    return key in _SECRET_NAMES or key.endswith(_SECRET_ENDS) or "password" in key


def _clean(value: Any, path: set[int], depth: int = 0) -> Any:
    """Return a copy of *value* with secrets removed; never mutates the input,
    which may be a caller's live object (a response dict, a settings map).
    *path* holds the ids of the containers being cleaned, to cut cycles."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if not isinstance(value, Mapping | list | tuple | set | frozenset):
        # The renderer would repr() this *after* redaction: do it now so that
        # secrets in reprs (a dataclass holding tokens, an exception, bytes)
        # get scrubbed too.
        return scrub(repr(value))
    if id(value) in path or depth >= _MAX_DEPTH:
        return "[recursion]"
    path.add(id(value))
    try:
        if isinstance(value, Mapping):
            return {
                _key(k): _blank(v) if _secret_key(k) else _clean(v, path, depth + 1)
                for k, v in value.items()
            }
        return [
            # ("Authorization", "...") pairs, as in header lists.
            (item[0], _blank(item[1]))
            if isinstance(item, tuple) and len(item) == 2 and _secret_key(item[0])
            else _clean(item, path, depth + 1)
            for item in value
        ]
    finally:
        path.discard(id(value))


def _key(key: Any) -> Any:
    # A string key may carry a secret; JSON takes only scalar keys.
    if isinstance(key, str):
        return scrub(key)
    return key if key is None or isinstance(key, bool | int | float) else scrub(repr(key))


def _secret_key(key: Any) -> bool:
    return isinstance(key, str) and is_secret_key(key)


def _blank(value: Any) -> Any:
    return None if value is None else REDACTED


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: blank secret-named keys at any depth, scrub all text.

    Must run after exceptions are rendered to text (``format_exc_info``) and
    before the renderer.
    """
    return cast(EventDict, _clean(event_dict, set()))


def fingerprint(secret: str) -> str:
    """Short stable name for a token: first 12 hex digits of its SHA-256.

    48 bits tell tokens apart in logs and events while revealing nothing
    useful about the token itself. (``surrogatepass``: text read from
    Redis may hold raw bytes as lone surrogates, ``worker.redisio``; any
    UTF-8 text hashes as its UTF-8 bytes.)
    """
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:12]


_configured = False
_level = logging.INFO


def debug_enabled() -> bool:
    """Whether debug lines are written: for a hot path that would otherwise
    compute a debug line's fields (a fingerprint is a sha256) for nothing.
    ``log.is_enabled_for`` answers the same but, on a module-level logger,
    builds a bound logger on every call."""
    return _level <= logging.DEBUG


class _StdlibHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marker type so reconfiguration replaces exactly our handler on root."""


class _NamedWriteLogger(structlog.WriteLogger):
    """A WriteLogger that knows the name passed to :func:`get_logger`."""

    def __init__(self, file: TextIO, name: str | None = None) -> None:
        super().__init__(file)
        self.name = name


def _add_logger_name(logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    if name := getattr(logger, "name", None):
        event_dict.setdefault("logger", name)
    return event_dict


def _configure_structlog(level: int, fmt: str, out: TextIO | None) -> list[Processor]:
    """Configure structlog; return the processors stdlib records must share."""
    global _configured, _level
    _level = level
    renderer: Processor = structlog.processors.JSONRenderer()
    if fmt == "console":
        isatty = getattr(out, "isatty", None)
        renderer = structlog.dev.ConsoleRenderer(
            colors=bool(isatty and isatty()),
            timestamp_key="ts",
            exception_formatter=structlog.dev.plain_traceback,
        )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")
    # Exceptions and stacks become text first so that redact() sees them.
    tail: list[Processor] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact,
        renderer,
    ]

    def factory(*args: Any) -> _NamedWriteLogger:
        # get_logger(name) hands the name here; None -> follow sys.stderr
        # even when it is swapped later (pytest capture).
        return _NamedWriteLogger(out if out is not None else sys.stderr, *args[:1])

    structlog.configure(
        processors=[merge_contextvars, _add_logger_name, add_log_level, timestamper, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        # Not cached, so that reconfiguration reaches loggers already handed
        # out (module-level proxies). Calls below the level still return at
        # once from a no-op method, before any processor runs.
        cache_logger_on_first_use=False,
    )
    _configured = True
    return [timestamper, *tail]


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send redacted log lines - structlog's and stdlib ``logging``'s - to *stream*.

    *stream* defaults to ``sys.stderr`` so that logs never mix with command
    output on stdout. Safe to call again (tests do, with another stream or
    level): loggers already handed out follow the new configuration.
    """
    try:
        numeric_level = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}") from None
    if fmt not in {"json", "console"}:
        raise ValueError(f"unknown log format {fmt!r}")
    out = stream if stream is not None else sys.stderr
    timestamper, *tail = _configure_structlog(numeric_level, fmt, out)

    # Third-party libraries log through stdlib logging: give them the same
    # tail (exception text -> redact -> renderer) on a handler of our own.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            merge_contextvars,
            add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = _StdlibHandler(out)
    handler.setFormatter(formatter)
    handler.setLevel(max(logging.WARNING, numeric_level))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in _NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    """A structlog logger whose lines carry ``logger=name``.

    If nothing has configured logging yet, a redacting default (JSON, info,
    stderr) is applied first, so that no line is ever written unredacted. It
    leaves stdlib logging alone: importing a module must not install handlers.
    """
    if not _configured:
        _configure_structlog(logging.INFO, "json", None)
    return cast(FilteringBoundLogger, structlog.get_logger(*([name] if name else [])))
