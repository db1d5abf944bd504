"""Which token hosts a profile may name: the write-time half of the egress guard.

Kept apart from ``worker.egress`` (the run-time half, an aiohttp connector)
so that validating a profile or a credential, as ``worker.client.put`` does,
needs no HTTP library. ``worker.egress`` re-exports both names.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from worker.errors import ConfigError

__all__ = ["HINT", "check_token_host", "refused_address"]

_METADATA = {
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, ...
    ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    ipaddress.ip_address("192.0.0.192"),  # Oracle Cloud
}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_PRIVATE_SUFFIXES = (
    ".localhost", ".svc", ".cluster.local", ".local", ".internal", ".home.arpa", ".lan",
)  # fmt: skip
HINT = "set allow_private_network: true on the profile if this endpoint is really yours"


@lru_cache(maxsize=4096)
def refused_address(address: str) -> str | None:
    """The kind of a non-public address (``loopback``, ``private``, ...), or
    None for a public one. IPv4 inside IPv6 (mapped, 6to4, NAT64) is judged
    as the IPv4 address it carries."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "unparsable"
    if isinstance(ip, ipaddress.IPv6Address):
        # an IPv4 address carried inside IPv6 is judged as that address
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    if ip in _METADATA:
        return "cloud metadata"
    kinds = (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
        ("shared (CGNAT)", isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved or not ip.is_global),
    )
    return next((kind for kind, hit in kinds if hit), None)


def check_token_host(host: str) -> None:
    """Refuse, when a profile is written, a token host that is obviously not
    a public provider. The connector checks the real address at run time."""
    host = host.lower().rstrip(".")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        kind = refused_address(host)
        if kind is not None:
            raise ConfigError(f"token_url host {host} is a {kind} address; {HINT}")
        return
    last_label = host.rsplit(".", 1)[-1]
    if last_label.isdigit() or last_label.startswith("0x"):
        raise ConfigError(
            f"token_url host {host} is an IP address in a non-canonical form; write a DNS name "
            f"or a dotted address ({HINT})"
        )
    if host in {"localhost", "metadata", "metadata.google.internal"} or host.endswith(
        _PRIVATE_SUFFIXES
    ):
        raise ConfigError(f"token_url host {host} is a local or cluster-internal name; {HINT}")
    if "." not in host:
        raise ConfigError(
            f"token_url host {host} is a single-label name (a cluster's DNS search path "
            f"would complete it); {HINT}"
        )
