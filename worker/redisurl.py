"""What the ``redis+cluster://`` and ``redis+sentinel://`` URLs share: hosts, auth, options, TLS.

Both URLs name several servers (``host:port,host:port``), carry the same
``user:password@`` credentials and the same ``ssl*`` options, and must
refuse the same mistakes (an unknown option, a TLS option on a plain URL:
a silently ignored ``ssl=true`` would send the password in clear). One
parser serves both so that a fix to one cannot miss the other; each caller
says which kind of URL it is (``what``) so the error names it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import SplitResult, parse_qs, unquote

from worker.errors import ConfigError

__all__ = ["TLS_OPTIONS", "parse_auth", "parse_hosts", "parse_options", "tls_options"]

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = ("required", "optional", "none")
TLS_OPTIONS = frozenset({"ssl", *_TLS_FILES, "ssl_cert_reqs", "ssl_check_hostname"})
"""The query options both URLs accept for TLS."""


def parse_hosts(
    hostlist: str, *, default_port: str, bad: Callable[[str], str], check_range: bool
) -> list[tuple[str, int]]:
    """``host[:port][,host[:port]...]`` as (host, port) pairs, IPv6 brackets
    stripped; ``bad(item)`` is the error for an item that is not host:port.
    ``check_range`` also refuses ports outside 1-65535 (the cluster URL
    does; the sentinel URL leaves that to the connection)."""
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item, "", default_port)
        if not host or not port.isdigit() or (check_range and not 0 < int(port) < 65536):
            raise ConfigError(bad(item))
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def parse_auth(creds: str) -> dict[str, str]:
    """``user:password`` (either part may be empty, both percent-decoded)
    as redis-py's ``username``/``password`` keyword arguments."""
    auth: dict[str, str] = {}
    if creds:
        user, _, password = creds.partition(":")
        if user:
            auth["username"] = unquote(user)
        if password:
            auth["password"] = unquote(password)
    return auth


def parse_options(parts: SplitResult, known: frozenset[str], what: str) -> dict[str, str]:
    """The URL's query (the last value of a repeated option wins); an option
    not in ``known`` is a ConfigError rather than silently ignored."""
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - known)
    if unknown:
        raise ConfigError(
            f"unknown option(s) in the {what} URL: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )
    return query


def tls_options(scheme: str, query: dict[str, str], *, what: str) -> dict[str, Any]:
    """redis-py's TLS keyword arguments from the ``ssl*`` options: empty for
    a plain URL, an error if a plain URL carries a TLS option or a TLS
    scheme (``rediss+<what>``) says ``ssl=false``."""
    tls_scheme = f"rediss+{what}"
    ssl = scheme.lower() == tls_scheme
    if "ssl" in query:
        raw = query["ssl"].lower()
        if raw not in _TRUE | _FALSE:
            raise ConfigError(f"ssl= in the {what} URL is true or false, not {query['ssl']!r}")
        if ssl and raw in _FALSE:
            raise ConfigError(f"{tls_scheme}:// is TLS; ssl=false contradicts it")
        ssl = raw in _TRUE
    given = sorted(k for k in query if k.startswith("ssl_"))
    if not ssl:
        if given:
            raise ConfigError(
                f"{', '.join(given)} in a plain {what} URL: use {tls_scheme}:// for TLS"
            )
        return {}
    tls: dict[str, Any] = {"ssl": True}
    tls.update({k: query[k] for k in _TLS_FILES if k in query})
    if "ssl_cert_reqs" in query:
        if query["ssl_cert_reqs"] not in _CERT_REQS:
            raise ConfigError(f"ssl_cert_reqs is one of {', '.join(_CERT_REQS)}")
        tls["ssl_cert_reqs"] = query["ssl_cert_reqs"]
    if "ssl_check_hostname" in query:
        raw = query["ssl_check_hostname"].lower()
        if raw not in _TRUE | _FALSE:
            raise ConfigError("ssl_check_hostname is true or false")
        tls["ssl_check_hostname"] = raw in _TRUE
    return tls
