"""Which certificate authorities a token request trusts.

Private token endpoints (an in-house Keycloak, a gateway behind a company
CA) need a CA the system store lacks. ``REFRESHD_CA_FILE`` adds one for
every profile and a profile's ``ca_pem`` adds one for that profile; both
add to the system store, never replace it, so public providers keep
working. Contexts are built once per distinct set of CAs (building one
reads the system store: milliseconds).
"""

from __future__ import annotations

import ssl
from functools import lru_cache

from worker.errors import ConfigError

__all__ = ["check_pem", "trust_context"]

_MAX_PEM_BYTES = 64 * 1024


def check_pem(pem: str) -> None:
    """A profile's ``ca_pem`` must hold at least one readable certificate."""
    if len(pem.encode()) > _MAX_PEM_BYTES:
        raise ConfigError("ca_pem is larger than 64 KiB")
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError("ca_pem must hold PEM certificates (-----BEGIN CERTIFICATE-----)")
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"ca_pem is not a readable certificate: {exc}") from None


@lru_cache(maxsize=64)
def trust_context(ca_file: str = "", ca_pem: str = "") -> ssl.SSLContext | None:
    """The system store plus ``ca_file`` and ``ca_pem``; None when neither is
    set (aiohttp's own default context then applies)."""
    if not ca_file and not ca_pem:
        return None
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"REFRESHD_CA_FILE {ca_file}: {exc}") from None
    if ca_pem:
        try:
            context.load_verify_locations(cadata=ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"ca_pem is not a readable certificate: {exc}") from None
    return context
