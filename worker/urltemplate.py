"""Token URL templates: ``{name}`` placeholders filled from a credential's params.

A small explicit parser instead of ``str.format``: a placeholder is a plain
name, a whole path segment or a whole query value, never in the scheme,
host, port or fragment, so a credential's params can choose which account
a request is about but never where the client secret goes. Format specs,
conversions, attribute and index access (``{a.b}``, ``{x:>300000000}``,
``{x!r}``, ``{x[0]}``) are refused when the profile is written; filling is
plain concatenation of percent-encoded values, so no value can climb a
path segment (``..``) or add one (``/`` becomes ``%2F``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote

from worker.errors import ConfigError

__all__ = ["UrlTemplate", "check_param_value", "parse_url_template"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_-]{1,100})\}")
_AUTHORITY = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class UrlTemplate:
    """``literals`` and ``names`` alternate: literal, name, literal, ...,
    literal (one more literal than names)."""

    literals: tuple[str, ...]
    names: tuple[str, ...]

    @property
    def placeholders(self) -> frozenset[str]:
        return frozenset(self.names)

    def fill(self, params: Mapping[str, str]) -> str:
        """The URL with each placeholder replaced by its percent-encoded
        value. A missing param or an unsafe value is a ``ConfigError``."""
        if not self.names:
            return self.literals[0]
        parts = [self.literals[0]]
        for name, literal in zip(self.names, self.literals[1:], strict=True):
            if name not in params:
                missing = sorted(set(self.names) - set(params))
                raise ConfigError(f"credential params lack {', '.join(missing)}")
            value = params[name]
            check_param_value(name, value)
            parts.append(quote(value, safe=""))
            parts.append(literal)
        return "".join(parts)


def check_param_value(name: str, value: str) -> None:
    """A value that would change which resource a URL names is refused: the
    dot segments ``.``/``..`` (which servers and proxies resolve), an empty
    value (``//`` merges segments), and control characters."""
    if value in {"", ".", ".."}:
        raise ConfigError(f"param {name} may not be empty, '.' or '..' (used in the token URL)")
    if _CONTROL.search(value):
        raise ConfigError(f"param {name} may not contain control characters")


@lru_cache(maxsize=256)  # asked per profile load; a handful of URLs
def parse_url_template(url: str) -> UrlTemplate:
    """Parse ``url`` once; every misuse is a ``ConfigError`` naming the rule."""
    pieces = _PLACEHOLDER.split(url)
    literals = tuple(pieces[0::2])
    names = tuple(pieces[1::2])
    if any("{" in s or "}" in s for s in literals):
        raise ConfigError(
            "token_url placeholders are {name} with a plain name (letters, digits, _ and -); "
            "format specs, conversions, attributes, indexes and stray braces are refused"
        )
    if names:
        _check_positions(url)
    return UrlTemplate(literals, names)


def _check_positions(url: str) -> None:
    authority = _AUTHORITY.match(url)
    authority_end = authority.end() if authority else len(url)
    hash_at = url.find("#")
    fragment_at = hash_at if hash_at >= 0 else len(url)
    query_at = url.find("?", 0, fragment_at)
    path_end = query_at if query_at >= 0 else fragment_at
    for match in _PLACEHOLDER.finditer(url):
        start, end = match.span()
        name = match.group(1)
        if start < authority_end:
            raise ConfigError(
                f"token_url placeholder {{{name}}} may not be in the scheme, host or port"
            )
        if start >= fragment_at:
            raise ConfigError(f"token_url placeholder {{{name}}} may not be in the fragment")
        if end <= path_end:
            whole = url[start - 1] == "/" and (end == len(url) or url[end] in "/?#")
            if not whole:
                raise ConfigError(
                    f"token_url placeholder {{{name}}} must be a whole path segment (/{{{name}}}/)"
                )
            continue
        pair_start = max(url.rfind("&", 0, start), url.rfind("?", 0, start)) + 1
        key = url[pair_start:start]
        whole = (
            len(key) > 1
            and key.endswith("=")
            and "=" not in key[:-1]
            and (end == len(url) or url[end] in "&#")
        )
        if not whole:
            raise ConfigError(
                f"token_url placeholder {{{name}}} must be a whole query value (?key={{{name}}})"
            )
