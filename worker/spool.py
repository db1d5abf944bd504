"""A local spool for commits Redis could not take: new tokens outlive a stop.

Once a provider has answered, its tokens exist only in this process until
the commit lands. While Redis is away the refresher keeps retrying; it also
writes each such commit here at its first failed attempt, so that a worker
stopped (or crashed) during the outage does not take the tokens with it.
The next start replays every entry **before it claims anything**, through
the same commit script: the spend intent the commit names is still open
(or was recovered as ambiguous with the version unchanged), so the tokens
land; an entry that already landed is refused as ``stale`` by the script,
recognised as landed, and removed. Replaying twice is therefore harmless.

Format: one file per pending commit, ``commit-<scope>-<32 hex>.json``
(``scope``: 8 hex digits of a hash of the key prefix, so that deployments
sharing a data directory - the default one is per user - never replay each
other's entries; then a hash of the credential id and claim token), a JSON
object::

    {"format": "refreshd-spool-1", "credential_id": str, "claim_token": str,
     "version": str, "outcome": str, "next_due": int | "", "reason": str,
     "received_ms": int, "fields": {name: str | int}, "event": str}

``fields`` holds what the commit writes into the credential record; its
secret fields (``worker.store.SECRET_FIELDS``) and the whole ``event``
(which carries the access token) pass through the store's secret codec,
so encryption at rest covers the spool as soon as it covers Redis. Files
are written atomically (temporary file, fsync, rename, directory fsync)
with mode 0600 in a directory created 0700. An entry is removed only once
its commit is durable (or provably landed, or can never apply).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import anyio

from worker.codec import SecretCodec, SecretContext
from worker.errors import NotFound, RefreshdError, SecretUnreadable
from worker.logs import fingerprint, get_logger
from worker.metrics import Metrics
from worker.models import Claimed
from worker.store import SECRET_FIELDS, CommitResult, Outcome, Store

__all__ = ["SPOOL_FORMAT", "PendingCommit", "Spool", "SpoolError", "replay_spool"]

log = get_logger("refreshd.spool")

SPOOL_FORMAT = "refreshd-spool-1"
_OUTCOMES = frozenset({"refreshed", "retry", "needs_reauth", "quarantined"})
#: where the field/value pairs start in the commit script's ARGV (ARGV[9..])
_PAIRS_AT = 11  # after the eight named ones and the event log's three


class SpoolError(RefreshdError):
    """A spool file that cannot be read or written."""


@dataclass(frozen=True, slots=True)
class PendingCommit:
    """Everything ``Store.commit`` needs to apply one outcome again."""

    credential_id: str
    claim_token: str
    version: str
    outcome: Outcome
    next_due: int | Literal[""]
    fields: Mapping[str, str | int] = field(repr=False)
    event: str = field(repr=False)
    reason: str
    received_ms: int

    @classmethod
    def of(
        cls,
        c: Claimed,
        outcome: Outcome,
        next_due: int | Literal[""],
        fields: Mapping[str, str | int],
        event: str,
        reason: str,
    ) -> PendingCommit:
        return cls(c.id, c.token, c.version, outcome, next_due, dict(fields), event, reason,
                   int(time.time() * 1000))  # fmt: skip

    @classmethod
    def from_commit_args(cls, args: Sequence[Any], store: Store) -> PendingCommit | None:
        """The commit a commit script call (``Store.commit_call``'s ARGV)
        was making, its secret fields decoded; None for a release, which
        carries nothing to keep."""
        token, version, outcome, next_due, _channel, event, cred_id, reason = args[:8]
        if outcome not in _OUTCOMES:
            return None
        flat = args[_PAIRS_AT:]
        fields = {
            str(name): store.decode(str(cred_id), str(name), _stored(value))
            if name in SECRET_FIELDS
            else value
            for name, value in zip(flat[0::2], flat[1::2], strict=True)
        }
        return cls(str(cred_id), str(token), str(version), outcome, next_due, fields, str(event),
                   str(reason), int(time.time() * 1000))  # fmt: skip

    @property
    def refresh_token(self) -> str:
        return str(self.fields.get("refresh_token", ""))

    def claimed(self, store: Store) -> Claimed:
        """The claim this commit belongs to, as far as the commit script reads it."""
        return Claimed(
            id=self.credential_id,
            partition=store.keys.partition_of(self.credential_id).index,
            token=self.claim_token,
            due_ms=0,
            profile="",
            refresh_token="",
            token_type="",
            scope="",
            expires_at_ms=0,
            version=self.version,
            failures=0,
            ambiguous_at_ms=None,
            recovered=False,
            claimed_at_ms=0,
        )

    async def apply(self, store: Store, *, wait_durable: bool = True) -> CommitResult:
        return await store.commit(
            self.claimed(store),
            self.outcome,
            next_due=self.next_due,
            fields=self.fields,
            event=self.event,
            reason=self.reason,
            wait_durable=wait_durable,
        )

    async def landed(self, store: Store) -> bool:
        """Did this commit already land (its reply lost, or an earlier replay)?
        Only a commit of new tokens can tell: the stored record then holds
        exactly its refresh token at a later version."""
        if self.outcome != "refreshed":
            return False
        try:
            stored = await store.get(self.credential_id)
        except (NotFound, SecretUnreadable):  # gone, or not what this commit wrote
            return False
        return stored.version > int(self.version) and stored.refresh_token == self.refresh_token


class Spool:
    """One directory of pending commits, one file each."""

    def __init__(self, directory: Path, codec: SecretCodec, *, scope: str = "") -> None:
        """``scope``: the key prefix. Another prefix's entries in the same
        directory are neither replayed nor touched (its commits are not
        this store's to apply)."""
        self.directory = directory
        self.codec = codec
        self.scope = scope
        self.tag = hashlib.sha256(scope.encode()).hexdigest()[:8]

    def path_for(self, commit: PendingCommit) -> Path:
        name = f"{commit.credential_id}\0{commit.claim_token}".encode()
        digest = hashlib.sha256(name).hexdigest()[:32]
        return self.directory / f"commit-{self.tag}-{digest}.json"

    def prepare(self) -> str | None:
        """Create the directory (0700) now, at start: a spool that cannot be
        written is better found before an outage than during one. Returns
        what is wrong, or None."""
        try:
            self._ensure_directory()
            probe = self.directory / f".probe.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            # a write cut short by a crash: incomplete, and it holds secrets
            for tmp in self.directory.glob(".commit-*.tmp"):
                if time.time() - tmp.stat().st_mtime > 60:
                    tmp.unlink(missing_ok=True)
        except OSError as exc:
            return f"{exc.strerror or exc}"
        return None

    def entries(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob(f"commit-{self.tag}-*.json"))

    # ----------------------------------------------------------- writing

    def write(self, commit: PendingCommit) -> Path:
        """Atomically write ``commit``; returns its path. Blocking (fsync):
        call it from a worker thread."""
        doc = {
            "format": SPOOL_FORMAT,
            "credential_id": commit.credential_id,
            "claim_token": commit.claim_token,
            "version": commit.version,
            "outcome": commit.outcome,
            "next_due": commit.next_due,
            "reason": commit.reason,
            "received_ms": commit.received_ms,
            "fields": {
                k: self._encode(commit.credential_id, k, str(v)) if k in SECRET_FIELDS else v
                for k, v in commit.fields.items()
            },
            "event": self._encode(commit.credential_id, "event", commit.event),
        }
        data = json.dumps(doc, sort_keys=True).encode()
        path = self.path_for(commit)
        try:
            self._ensure_directory()
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.fchmod(fd, 0o600)  # an old leftover of the same name keeps its mode
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._sync_directory()
        except OSError as exc:
            raise SpoolError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return path

    def _context(self, credential_id: str, field: str) -> SecretContext:
        return SecretContext(self.scope, "spool", credential_id, field)

    def _encode(self, credential_id: str, field: str, plaintext: str) -> str:
        return self.codec.encode(plaintext, self._context(credential_id, field))

    def _decode(self, credential_id: str, field: str, stored: str) -> str:
        return self.codec.decode(stored, self._context(credential_id, field))

    def _ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = self.directory.stat().st_mode & 0o777
        if mode & 0o077:
            try:
                self.directory.chmod(0o700)
            except OSError:
                # a mount point we do not own: the files themselves stay 0600
                log.warning("spool.directory_open", path=str(self.directory), mode=oct(mode))

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, path: Path) -> None:
        """Forget an entry whose commit is durable (another process may
        have removed it first: replays are idempotent)."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            self._sync_directory()

    def set_aside(self, path: Path) -> Path:
        """Keep an entry that can never apply, out of the replay's way: its
        tokens may still be the only valid ones, for an operator to recover."""
        target = path.with_suffix(".refused")
        os.replace(path, target)
        self._sync_directory()
        return target

    # ----------------------------------------------------------- reading

    def load(self, path: Path) -> PendingCommit:
        try:
            return self._parse(json.loads(path.read_bytes()))
        except (OSError, ValueError, KeyError, TypeError, SecretUnreadable) as exc:
            raise SpoolError(f"cannot read {path}: {exc}") from exc

    def _parse(self, doc: Any) -> PendingCommit:
        """Strict: a spool file is only ever written by ``write``. (No error
        text quotes a value: the file holds secrets.)"""
        if not isinstance(doc, dict) or doc.get("format") != SPOOL_FORMAT:
            raise ValueError(f"not a {SPOOL_FORMAT} file")
        fields, outcome, next_due = doc["fields"], doc["outcome"], doc["next_due"]
        if outcome not in _OUTCOMES or not isinstance(fields, dict):
            raise ValueError("bad outcome or fields")
        if not (next_due == "" or type(next_due) is int):
            raise ValueError("bad next_due")
        cred_id = _text(doc["credential_id"])
        decoded: dict[str, str | int] = {
            str(k): self._decode(cred_id, str(k), _text(v)) if k in SECRET_FIELDS else _scalar(v)
            for k, v in fields.items()
        }
        return PendingCommit(
            credential_id=cred_id,
            claim_token=_text(doc["claim_token"]),
            version=_text(doc["version"]),
            outcome=cast(Outcome, outcome),
            next_due=next_due,
            fields=decoded,
            event=self._decode(cred_id, "event", _text(doc["event"])),
            reason=_text(doc["reason"]),
            received_ms=int(doc["received_ms"]),
        )


def _stored(value: str | bytes) -> str:
    """A secret field of a commit's ARGV as the store reads it back (the
    record form travels as bytes, ``SecretCodec.encode_record``)."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _scalar(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError("expected a string or an integer")
    return value


async def replay_spool(spool: Spool, store: Store, metrics: Metrics) -> int:
    """Apply every spooled commit again, before the worker claims anything
    (a claim would read an expired intent as an unknown outcome). Returns
    how many entries are left. ``StoreUnavailable`` propagates: the entries
    stay for the next start."""
    problem = await anyio.to_thread.run_sync(spool.prepare)
    if problem is not None:
        log.warning(
            "spool.unavailable",
            path=str(spool.directory),
            error=problem,
            note="tokens received during a Redis outage would be lost if the worker stops "
            "before Redis is back; set REFRESHD_SPOOL_DIR to a writable directory",
        )
    for path in spool.entries():
        try:
            pending = spool.load(path)
        except SpoolError as exc:
            metrics.spool_replays.labels("unreadable").inc()
            log.error("spool.unreadable", path=str(path), error=str(exc))  # noqa: TRY400 (expected)
            continue
        result = await pending.apply(store)
        rt_fp = fingerprint(pending.refresh_token) if pending.refresh_token else None
        context = {"credential_id": pending.credential_id, "outcome": pending.outcome}
        if result.ok and not result.durable:
            metrics.spool_replays.labels("not_durable").inc()
            log.warning("spool.replay_not_durable", **context)  # kept: replayed next start
            continue
        if result.ok:
            label = "landed"
        elif await pending.landed(store):
            label = "already_landed"
        elif pending.outcome == "refreshed" and result.reason == "stale":
            metrics.spool_replays.labels("refused").inc()
            kept = spool.set_aside(path)
            log.error("spool.replay_refused", **context, refresh_token_fp=rt_fp, kept=str(kept))
            continue
        else:  # credential deleted, or a failure outcome overtaken: nothing to keep
            label = "superseded"
        spool.remove(path)
        metrics.spool_replays.labels(label).inc()
        log.info("spool.replayed", **context, result=label, refresh_token_fp=rt_fp)
    left = len(spool.entries())
    if left:
        log.warning("spool.entries_left", entries=left, path=str(spool.directory))
    return left
