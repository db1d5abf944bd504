"""The event schema consumers rely on: one JSON object per refresh outcome.

Published on ``<prefix>events`` and appended to the partition's event log
(``worker.eventlog``) by the commit script itself, so a stored token and its
event never disagree. Its JSON Schema is docs/events.schema.json; typed
classes for consumers are in ``worker.eventmodel``. Bump ``SCHEMA`` on any incompatible
change; adding a field is compatible (``warnings`` was added so, within
schema 1). The refresh token is never published.

With a key ring (``REFRESHD_EVENT_SECRETS``, ``EventSecrets``), the access
token and every secret kept extra (``id_token``...) are published
encrypted (under the event's own context: its credential id and the field)
or left out, and the event says so in ``secrets``; ``open_event`` turns a
sealed event back into a clear one for a holder of the ring.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import orjson

from worker.codec import SecretCodec, SecretContext

__all__ = ["SCHEMA", "EventSecrets", "EventType", "build_event", "open_event"]

SCHEMA = 1


class EventType(StrEnum):
    REFRESHED = "token.refreshed"
    FAILED = "token.failed"
    NEEDS_REAUTH = "credential.needs_reauth"
    QUARANTINED = "credential.quarantined"


def _secret_key(name: str) -> bool:
    """The same judgement as every printing command (``worker.masking``):
    an extra that ``watch`` would mask (``idToken``, ``mfa_passcode``,
    ``signing_key``...) is never published in clear either."""
    from worker.masking import looks_secret

    return looks_secret(name)


def _context(prefix: str, credential_id: str, field: str) -> SecretContext:
    """The access token is bound to the credential's own field: the event
    carries the very ciphertext the record stores (one encryption, not
    two). A kept extra, one JSON value in the record, is sealed per name."""
    if field == "access_token":
        return SecretContext(prefix, "credential", credential_id, field)
    return SecretContext(prefix, "event", credential_id, field)


class EventSecrets:
    """How a ``token.refreshed`` event carries its secrets: the access
    token (for ``secret_rotation`` profiles, the rotated secret) and each
    kept extra whose name says secret. ``clear``: as they are;
    ``encrypted``: each through the codec, bound to the event's credential
    and field (the access token exactly as its record stores it;
    ``extra.<name>`` for an extra); ``omitted``: left out, the
    consumer reads the credential. Every event not clear names its mode in
    ``secrets``."""

    __slots__ = ("codec", "mode", "prefix")

    def __init__(
        self, mode: str = "clear", codec: SecretCodec | None = None, prefix: str = ""
    ) -> None:
        if mode not in ("clear", "encrypted", "omitted"):
            raise ValueError(f"event secrets mode {mode!r}")
        if mode == "encrypted" and (codec is None or not codec.encrypting):
            raise ValueError("encrypted event secrets need an encrypting codec")
        self.mode = mode
        self.codec = codec
        self.prefix = prefix

    def apply(self, body: dict[str, Any]) -> None:
        """Seal or drop the secrets of one event body, in place."""
        if self.mode == "clear":
            return
        credential_id = body["credential_id"]
        extra: dict[str, str] | None = body.get("extra")
        if self.mode == "omitted":
            body.pop("access_token", None)
            if extra:
                body["extra"] = {k: v for k, v in extra.items() if not _secret_key(k)}
        else:
            assert self.codec is not None
            encode, prefix = self.codec.encode, self.prefix
            body["access_token"] = encode(
                body["access_token"] or "", _context(prefix, credential_id, "access_token")
            )
            if extra:
                body["extra"] = {
                    k: encode(v, _context(prefix, credential_id, f"extra.{k}"))
                    if _secret_key(k)
                    else v
                    for k, v in extra.items()
                }
        if body.get("extra") == {}:
            del body["extra"]
        body["secrets"] = self.mode


def open_event(body: dict[str, Any], codec: SecretCodec, prefix: str) -> dict[str, Any]:
    """A copy of an event body with its encrypted secrets decrypted (and
    ``secrets`` gone), or the body itself when nothing is sealed. Raises
    ``SecretUnreadable`` when a value does not decrypt with ``codec``."""
    if body.get("secrets") != "encrypted":
        return body
    out = dict(body)
    del out["secrets"]
    credential_id = str(out.get("credential_id", ""))
    token = out.get("access_token")
    if isinstance(token, str):
        out["access_token"] = codec.decode(token, _context(prefix, credential_id, "access_token"))
    extra = out.get("extra")
    if isinstance(extra, dict):
        out["extra"] = {
            k: codec.decode(v, _context(prefix, credential_id, f"extra.{k}"))
            if _secret_key(k) and isinstance(v, str)
            else v
            for k, v in extra.items()
        }
    return out


def build_event(
    kind: EventType,
    *,
    credential_id: str,
    profile: str,
    version: int,
    ts_ms: int,
    access_token: str | None = None,
    token_type: str = "",
    expires_at_ms: int | None = None,
    scope: str = "",
    reason: str = "",
    retry_at_ms: int | None = None,
    failures: int | None = None,
    extra: dict[str, str] | None = None,
    warnings: Sequence[str] = (),
    detail: str = "",
    secrets: EventSecrets | None = None,
) -> str:
    """One event as compact JSON. ``warnings`` (any type, only when there
    are some): the fallbacks applied to an odd provider answer, from the
    fixed vocabulary of ``worker.answer_fields``. Keep ``schema`` and
    ``type`` the first two keys: commit.lua reads them by position for the
    log entry's ``v`` and ``type`` fields instead of decoding the event.
    ``secrets``: how a ``token.refreshed`` event carries its secrets
    (default: clear)."""
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "type": kind.value,
        "credential_id": credential_id,
        "profile": profile,
        "version": version,
        "ts": ts_ms,
    }
    if kind is EventType.REFRESHED:
        body |= {
            "access_token": access_token,
            "token_type": token_type,
            "expires_at": expires_at_ms,
            "scope": scope,
        }
        if extra:
            body["extra"] = extra
        if secrets is not None:
            secrets.apply(body)
    else:
        body["reason"] = reason
        if failures is not None:
            body["failures"] = failures
        if retry_at_ms is not None:
            body["retry_at"] = retry_at_ms
        if detail:  # refreshd's own words (a certificate problem), never provider text
            body["detail"] = detail
    if warnings:
        body["warnings"] = list(warnings)
    return orjson.dumps(body).decode()  # compact; non-ASCII as UTF-8, not \u escapes
