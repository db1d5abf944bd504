"""The one place settings come from: ``REFRESHD_*`` environment variables.

``Settings.from_env()`` builds a frozen object and fails loudly on bad
input ("REFRESHD_CONCURRENCY is not an integer: 'x'"), so a typo stops the
process at start instead of surfacing at 3 a.m. The object is passed
explicitly; there is no module-level singleton. ``SETTINGS_DOC`` drives both
``--help`` and the README table (a test keeps the README in step).
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from worker.errors import ConfigError
from worker.keyring import key_ring_from_settings

__all__ = ["EVENT_SECRETS", "SETTINGS_DOC", "UNSAFE_REDIS_HAZARDS", "Settings", "default_data_dir"]

#: The names REFRESHD_UNSAFE_REDIS accepts (``worker.serverchecks.Hazard``).
UNSAFE_REDIS_HAZARDS = frozenset({"not_durable", "no_waitaof", "eviction", "policy_unknown"})


#: what REFRESHD_EVENT_SECRETS accepts (``Settings.event_secrets_mode`` resolves auto)
EVENT_SECRETS = ("auto", "encrypted", "omitted", "clear")

#: how SETTINGS_DOC (``--help``, the README table) shows the data directory's default
DATA_DIR_DEFAULT = "$XDG_DATA_HOME/refreshd or ~/.local/share/refreshd"


def default_data_dir(env: Mapping[str, str]) -> Path:
    """One per user and machine, whatever the working directory: a relative
    default started a second, empty server for a command run elsewhere."""
    xdg = env.get("XDG_DATA_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():  # the XDG spec ignores a relative value
        return Path(xdg) / "refreshd"
    home = env.get("HOME", "").strip()
    if not home:
        try:
            home = str(Path.home())
        except (RuntimeError, KeyError):  # a container user with no passwd entry
            home = ""
    if not home or not Path(home).is_absolute():
        # the data dir only matters without REFRESHD_REDIS_URL; still one per user
        return Path(tempfile.gettempdir()) / f"refreshd-{os.getuid()}"
    return Path(home) / ".local" / "share" / "refreshd"


def _doc(env: str, help_: str) -> dict[str, str]:
    return {"env": env, "help": help_}


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str | None = field(
        default=None,
        metadata=_doc(
            "REFRESHD_REDIS_URL",
            "Redis/Valkey URL (redis://, rediss://, unix://, or "
            "redis+sentinel://host:port[,host:port]/service, rediss+sentinel:// for TLS, or "
            "redis+cluster://host:port[,host:port] for a Redis Cluster, rediss+cluster:// "
            "for TLS). Unset: start or join the "
            "embedded Valkey server under REFRESHD_DATA_DIR.",
        ),
    )
    data_dir: Path = field(
        default_factory=lambda: default_data_dir(os.environ),
        metadata=_doc(
            "REFRESHD_DATA_DIR",
            "Directory for the embedded server's data; the default, one per user and "
            "machine, is shared by every refreshd process of the user.",
        ),
    )
    spool_dir: Path | None = field(
        default=None,
        metadata=_doc(
            "REFRESHD_SPOOL_DIR",
            "Directory (created 0700) where new tokens Redis could not take are kept "
            "(files 0600) until a commit lands; the next start replays them before it "
            "claims. Unset: REFRESHD_DATA_DIR/spool.",
        ),
    )
    prefix: str = field(
        default="refreshd:",
        metadata=_doc("REFRESHD_PREFIX", "Prefix of every key and channel name."),
    )
    partitions: int = field(
        default=16,
        metadata=_doc(
            "REFRESHD_PARTITIONS",
            "Number of key partitions (hash-tagged slots). Fixed once data exists. "
            "On a Redis Cluster each partition lives on one primary: use a multiple of "
            "the primaries, at least 8 per primary.",
        ),
    )
    concurrency: int = field(
        default=1024,
        metadata=_doc(
            "REFRESHD_CONCURRENCY",
            "Refreshes in flight at once in one process (most of each one's time is the "
            "wait for the spend's fsync, so this is well above the CPU's share).",
        ),
    )
    max_connections_per_host: int = field(
        default=100,
        metadata=_doc(
            "REFRESHD_MAX_CONNECTIONS_PER_HOST",
            "Most open connections to one token host (0: no cap beyond "
            "REFRESHD_CONCURRENCY), so a catch-up does not flood one provider.",
        ),
    )
    ca_file: str = field(
        default="",
        metadata=_doc(
            "REFRESHD_CA_FILE",
            "PEM file of CA certificates trusted for token endpoints in addition to "
            "the system store (private token hosts).",
        ),
    )
    claim_batch: int = field(
        default=100,
        metadata=_doc("REFRESHD_CLAIM_BATCH", "Most credentials claimed by one claim call."),
    )
    lease_s: float = field(
        default=30.0,
        metadata=_doc(
            "REFRESHD_LEASE_SECONDS",
            "How long a claim is held. A worker that dies leaves its credentials due "
            "again after this long.",
        ),
    )
    spend_margin_s: float = field(
        default=2.0,
        metadata=_doc(
            "REFRESHD_SPEND_MARGIN_SECONDS",
            "Safety margin between an HTTP request's deadline and the end of its lease.",
        ),
    )
    drain_grace_s: float = field(
        default=20.0,
        metadata=_doc(
            "REFRESHD_DRAIN_GRACE_SECONDS",
            "On SIGTERM: how long in-flight refreshes may take before the rest are cancelled; "
            "a request already sent still runs to its answer (at most the profile's timeout_s).",
        ),
    )
    idle_wakeup_s: float = field(
        default=5.0,
        metadata=_doc(
            "REFRESHD_IDLE_WAKEUP_SECONDS",
            "Longest sleep between schedule checks when no wake-up arrives (a safety net; "
            "workers normally wake on the earliest due time or a wake-up message).",
        ),
    )
    http_host: str = field(
        default="127.0.0.1",
        metadata=_doc("REFRESHD_HTTP_HOST", "Bind address of /metrics, /healthz, /readyz."),
    )
    http_port: int = field(
        default=9464,
        metadata=_doc("REFRESHD_HTTP_PORT", "Port of /metrics, /healthz, /readyz (0: off)."),
    )
    durability: str = field(
        default="auto",
        metadata=_doc(
            "REFRESHD_DURABILITY",
            "When a commit counts as durable: 'auto' (WAITAOF when the server has "
            "appendonly on, plus WAIT when it has replicas), 'fsync', 'replica', 'none'.",
        ),
    )
    unsafe_redis: frozenset[str] = field(
        default=frozenset(),
        metadata=_doc(
            "REFRESHD_UNSAFE_REDIS",
            "Empty: refuse to start on a Redis that could send a refresh token twice or lose "
            "credentials. To run anyway, list the hazards you accept (comma-separated): "
            "not_durable (no AOF and no replica), no_waitaof (server older than 7.2), "
            "eviction (maxmemory-policy is not noeviction), policy_unknown (CONFIG GET "
            "refused); each start then logs a warning per hazard.",
        ),
    )
    strict_server: bool = field(
        default=True,
        metadata=_doc(
            "REFRESHD_STRICT_SERVER",
            "Deprecated: refusing an unsafe Redis is the default now. 'true' is accepted and "
            "changes nothing; 'false' is refused (name the hazards in REFRESHD_UNSAFE_REDIS).",
        ),
    )
    lead_min_s: float = field(
        default=60.0,
        metadata=_doc(
            "REFRESHD_LEAD_MIN_SECONDS",
            "Default refresh lead: at least this long before expiry (at most half the "
            "token's lifetime).",
        ),
    )
    lead_fraction: float = field(
        default=0.2,
        metadata=_doc(
            "REFRESHD_LEAD_FRACTION", "Default refresh lead as a fraction of the lifetime."
        ),
    )
    lead_max_s: float = field(
        default=1800.0,
        metadata=_doc("REFRESHD_LEAD_MAX_SECONDS", "Cap on the default refresh lead."),
    )
    backoff_base_s: float = field(
        default=1.0,
        metadata=_doc("REFRESHD_BACKOFF_BASE_SECONDS", "First retry delay bound (full jitter)."),
    )
    backoff_max_s: float = field(
        default=300.0,
        metadata=_doc("REFRESHD_BACKOFF_MAX_SECONDS", "Largest retry delay bound."),
    )
    event_log: bool = field(
        default=True,
        metadata=_doc(
            "REFRESHD_EVENT_LOG",
            "Append every event to the durable event log (one Redis Stream per partition) "
            "in the commit that publishes it, so consumers can resume from a cursor. "
            "false: pub/sub only.",
        ),
    )
    event_log_max_age_s: float = field(
        default=86400.0,
        metadata=_doc(
            "REFRESHD_EVENT_LOG_MAX_AGE_SECONDS",
            "Events older than this are trimmed from the log (approximately: whole "
            "stream nodes at a time, so a few more may stay). 0: no age bound.",
        ),
    )
    event_log_max_length: int = field(
        default=1_000_000,
        metadata=_doc(
            "REFRESHD_EVENT_LOG_MAX_LENGTH",
            "Most events kept in the log over all partitions (each partition keeps its "
            "share, approximately): the memory cap, about 400 bytes per event. 0: no "
            "length bound.",
        ),
    )
    client_cache: int = field(
        default=10_000,
        metadata=_doc(
            "REFRESHD_CLIENT_CACHE",
            "Most tokens worker.client keeps in process memory (least recently used "
            "dropped first), served without a round trip while Redis's invalidation "
            "messages (CLIENT TRACKING) keep them current. 0: every read goes to Redis.",
        ),
    )
    encryption_keys: str = field(
        default="",
        repr=False,
        metadata=_doc(
            "REFRESHD_ENCRYPTION_KEYS",
            "Key ring for encryption at rest: kid:base64key entries (a 32-byte AES-256 key "
            "each), comma-separated, primary first; the primary encrypts, every key "
            "decrypts. Unset (and no _FILE): secrets are stored as they are.",
        ),
    )
    encryption_keys_file: str = field(
        default="",
        metadata=_doc(
            "REFRESHD_ENCRYPTION_KEYS_FILE",
            "File holding the key ring instead (one kid:base64key per line, primary "
            "first, # comments): a mounted secret. Not both.",
        ),
    )
    event_secrets: str = field(
        default="auto",
        metadata=_doc(
            "REFRESHD_EVENT_SECRETS",
            "How events carry the access token (and a rotated secret): 'encrypted' "
            "(under the key ring; worker.client decrypts), 'omitted' (consumers read the "
            "credential), 'clear'. 'auto': encrypted when a key ring is set, else clear.",
        ),
    )
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        metadata=_doc("REFRESHD_WORKER_ID", "Name of this process in logs and lock values."),
    )
    log_level: str = field(
        default="info",
        metadata=_doc("REFRESHD_LOG_LEVEL", "debug, info, warning or error."),
    )
    log_format: str = field(
        default="json",
        metadata=_doc("REFRESHD_LOG_FORMAT", "'json' (one object per line) or 'console'."),
    )

    @property
    def spool_path(self) -> Path:
        """Where pending commits are spooled (``REFRESHD_SPOOL_DIR`` or its default)."""
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.metadata['env']} must be a finite number")
        checks: list[tuple[bool, str]] = [
            (self.partitions >= 1, "REFRESHD_PARTITIONS must be at least 1"),
            (self.partitions <= 16384, "REFRESHD_PARTITIONS must be at most 16384"),
            (
                bool(self.prefix) and not any(c in self.prefix for c in "{} \n\t"),
                "REFRESHD_PREFIX must be non-empty, without braces or spaces",
            ),
            (self.concurrency >= 1, "REFRESHD_CONCURRENCY must be at least 1"),
            (self.claim_batch >= 1, "REFRESHD_CLAIM_BATCH must be at least 1"),
            (
                self.max_connections_per_host >= 0,
                "REFRESHD_MAX_CONNECTIONS_PER_HOST must not be negative",
            ),
            (
                not self.ca_file or Path(self.ca_file).is_file(),
                f"REFRESHD_CA_FILE {self.ca_file} is not a readable file",
            ),
            (self.lease_s >= 5, "REFRESHD_LEASE_SECONDS must be at least 5"),
            (
                0 < self.spend_margin_s < self.lease_s / 2,
                "REFRESHD_SPEND_MARGIN_SECONDS must be positive and under half the lease",
            ),
            (self.drain_grace_s >= 0, "REFRESHD_DRAIN_GRACE_SECONDS must not be negative"),
            (self.idle_wakeup_s > 0, "REFRESHD_IDLE_WAKEUP_SECONDS must be positive"),
            (0 <= self.http_port <= 65535, "REFRESHD_HTTP_PORT must be a port number"),
            (
                self.durability in {"auto", "fsync", "replica", "none"},
                "REFRESHD_DURABILITY must be one of auto, fsync, replica, none",
            ),
            (
                self.unsafe_redis <= UNSAFE_REDIS_HAZARDS,
                "REFRESHD_UNSAFE_REDIS takes a comma-separated list of "
                + ", ".join(sorted(UNSAFE_REDIS_HAZARDS)),
            ),
            (
                self.strict_server,
                "REFRESHD_STRICT_SERVER=false no longer lets refreshd run on an unsafe Redis: "
                "name the hazards you accept in REFRESHD_UNSAFE_REDIS instead",
            ),
            (
                self.event_log_max_age_s >= 0 and self.event_log_max_length >= 0,
                "REFRESHD_EVENT_LOG_MAX_AGE_SECONDS and REFRESHD_EVENT_LOG_MAX_LENGTH "
                "must not be negative",
            ),
            (
                self.event_log_max_length == 0 or self.event_log_max_length >= 2 * self.partitions,
                "REFRESHD_EVENT_LOG_MAX_LENGTH must be 0 or at least 2 per partition "
                "(each partition keeps its share, and at least the newest two events)",
            ),
            (
                not self.event_log or bool(self.event_log_max_age_s or self.event_log_max_length),
                "the event log needs a bound: set REFRESHD_EVENT_LOG_MAX_AGE_SECONDS or "
                "REFRESHD_EVENT_LOG_MAX_LENGTH above 0 (or REFRESHD_EVENT_LOG=false)",
            ),
            (self.client_cache >= 0, "REFRESHD_CLIENT_CACHE must not be negative"),
            (0 < self.lead_fraction < 1, "REFRESHD_LEAD_FRACTION must be between 0 and 1"),
            (self.lead_min_s >= 0, "REFRESHD_LEAD_MIN_SECONDS must not be negative"),
            (self.lead_max_s >= self.lead_min_s, "REFRESHD_LEAD_MAX_SECONDS must be >= min"),
            (self.backoff_base_s > 0, "REFRESHD_BACKOFF_BASE_SECONDS must be positive"),
            (
                self.backoff_max_s >= self.backoff_base_s,
                "REFRESHD_BACKOFF_MAX_SECONDS must be >= the base",
            ),
            (
                self.log_level in {"debug", "info", "warning", "error"},
                "REFRESHD_LOG_LEVEL must be debug, info, warning or error",
            ),
            (self.log_format in {"json", "console"}, "REFRESHD_LOG_FORMAT must be json or console"),
            (
                self.event_secrets in EVENT_SECRETS,
                "REFRESHD_EVENT_SECRETS must be one of " + ", ".join(EVENT_SECRETS),
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        ring = key_ring_from_settings(self)  # one line on a malformed ring, now
        if ring is None and self.event_secrets == "encrypted":
            raise ConfigError(
                "REFRESHD_EVENT_SECRETS=encrypted needs a key ring (REFRESHD_ENCRYPTION_KEYS "
                "or REFRESHD_ENCRYPTION_KEYS_FILE)"
            )

    @property
    def encrypted(self) -> bool:
        """True when a key ring is set (secrets are encrypted at rest)."""
        return bool(self.encryption_keys or self.encryption_keys_file)

    @property
    def event_secrets_mode(self) -> str:
        """``encrypted``, ``omitted`` or ``clear``: ``auto`` resolved."""
        if self.event_secrets == "auto":
            return "encrypted" if self.encrypted else "clear"
        return self.event_secrets

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every ``REFRESHD_*`` variable; unknown ones are an error, since
        a misspelt name would otherwise be silently ignored."""
        env = os.environ if environ is None else environ
        known = {f.metadata["env"] for f in fields(cls)}
        unknown = sorted(k for k in env if k.startswith("REFRESHD_") and k not in known)
        if unknown:
            raise ConfigError(
                f"unknown setting(s): {', '.join(unknown)} (REFRESHD_* names are reserved "
                "for settings; keep secrets in variables with another prefix)"
            )
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.metadata["env"], raw, _PARSERS[f.name])
        values.setdefault("data_dir", default_data_dir(env))
        values.update(overrides)
        return cls(**values)


def _parse(name: str, raw: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(raw.strip())
    except ValueError:
        label = {int: "an integer", float: "a number", _bool: "a boolean"}.get(kind, "valid")
        raise ConfigError(f"{name} is not {label}: {raw!r}") from None


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(raw)


def _names(raw: str) -> frozenset[str]:
    """A comma-separated list; the values are checked in ``__post_init__``."""
    return frozenset(item.strip() for item in raw.split(",") if item.strip())


_PARSERS: dict[str, Callable[[str], Any]] = {
    "redis_url": str,
    "data_dir": Path,
    "spool_dir": Path,
    "prefix": str,
    "partitions": int,
    "concurrency": int,
    "max_connections_per_host": int,
    "ca_file": str,
    "claim_batch": int,
    "lease_s": float,
    "spend_margin_s": float,
    "drain_grace_s": float,
    "idle_wakeup_s": float,
    "http_host": str,
    "http_port": int,
    "durability": str,
    "unsafe_redis": _names,
    "strict_server": _bool,
    "lead_min_s": float,
    "lead_fraction": float,
    "lead_max_s": float,
    "backoff_base_s": float,
    "backoff_max_s": float,
    "event_log": _bool,
    "event_log_max_age_s": float,
    "event_log_max_length": int,
    "client_cache": int,
    "encryption_keys": str,
    "encryption_keys_file": str,
    "event_secrets": str,
    "worker_id": str,
    "log_level": str,
    "log_format": str,
}

SETTINGS_DOC: list[tuple[str, str, str]] = [
    (
        f.metadata["env"],
        ""
        if f.name in {"worker_id", "unsafe_redis"}
        else DATA_DIR_DEFAULT
        if f.name == "data_dir"
        else str(f.default if f.default is not None else ""),
        f.metadata["help"],
    )
    for f in fields(Settings)
]
