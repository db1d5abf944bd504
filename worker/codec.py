"""The one codec every token and secret passes through on its way to Redis.

Encryption at rest switches on here without touching anything else: the
store calls ``encode`` before every write of a secret field and ``decode``
after every read, and the Lua scripts only ever move the encoded form
around. ``PlainCodec`` stores secrets as they are; ``worker.keyring``
holds the AES-256-GCM codec and builds the right one from the settings.

Every call names its ``SecretContext`` (key prefix, record kind, record id,
field name). An encrypting codec binds the ciphertext to it (associated
data), so a value copied to another record or field no longer decrypts.

An encrypted value has two forms, the same ciphertext either way:

- the text form, ``e1.<kid>.<base64url(nonce || ciphertext || tag)>``: what
  events, the spool, profiles and non-Python consumers carry (JSON-safe);
- the record form, one ``0xFF`` byte, the key id, a dot, then the raw
  bytes: what a credential record holds, a quarter smaller (a credential
  with 900 bytes of random tokens stays inside one 1 KiB allocation).

Python holds the record form as text decoded with ``surrogateescape``, as
``os.fsdecode`` does for file names: the ``0xFF`` byte (never part of
UTF-8 text) reads as ``"\udcff"``, and every refreshd Redis client reads
and writes with that error handler (``worker.redisio``), so the bytes go
back to Redis exactly as they came.
"""

from __future__ import annotations

import base64
import binascii
from typing import Final, Literal, NamedTuple, Protocol

from worker.errors import SecretUnreadable

__all__ = [
    "ENCRYPTED_MARK",
    "RECORD_MARK",
    "PlainCodec",
    "RecordKind",
    "SecretCodec",
    "SecretContext",
    "looks_encrypted",
    "record_form",
    "split_encrypted",
    "text_form",
]

#: what every value of the encrypted format starts with (``e1.<kid>.<body>``)
ENCRYPTED_MARK: Final = "e1."
#: what the record form starts with: the byte 0xFF as ``surrogateescape`` reads it
RECORD_MARK: Final = "\udcff"
#: the longest key id (``worker.keyring``): where to stop looking for its dot
_KID_MAX: Final = 16

RecordKind = Literal["credential", "profile", "event", "spool"]


class SecretContext(NamedTuple):
    """Where a secret lives: the key prefix of the installation, the kind
    of record, its id (credential or profile id) and the field name. (A
    named tuple: four are made per refresh, at a third of a frozen
    dataclass's cost.)"""

    prefix: str
    kind: RecordKind
    record: str
    field: str

    def aad(self) -> bytes:
        """The associated data: each part's UTF-8 bytes prefixed with their
        count (``9:refreshd:10:credential...``), so that no two contexts give
        the same bytes whatever their ids contain."""
        p, k, r, f = self.prefix, self.kind, self.record, self.field
        if p.isascii() and r.isascii() and f.isascii():  # characters are bytes: one format
            return f"{len(p)}:{p}{len(k)}:{k}{len(r)}:{r}{len(f)}:{f}".encode()
        out = b""
        for part in (p, k, r, f):
            data = part.encode()
            out += b"%d:%s" % (len(data), data)
        return out


def looks_encrypted(stored: str) -> bool:
    """True when ``stored`` has the shape of an encrypted value, in either
    form. A plain value of that shape is read as ciphertext (and fails): an
    OAuth token never starts with ``e1.`` followed by a key id and a dot in
    practice, nor with a byte that UTF-8 text cannot hold."""
    return split_encrypted(stored) is not None


def split_encrypted(stored: str) -> tuple[str, str, bool] | None:
    """``(key id, body, is record form)`` of an encrypted value; None for
    a plain one. The body is base64url text in the text form, the raw
    bytes (as ``surrogateescape`` text) in the record form."""
    if stored.startswith(RECORD_MARK):
        start, record = len(RECORD_MARK), True
    elif stored.startswith(ENCRYPTED_MARK):
        start, record = len(ENCRYPTED_MARK), False
    else:
        return None
    dot = stored.find(".", start, start + _KID_MAX + 1)
    if dot <= start:
        return None
    return stored[start:dot], stored[dot + 1 :], record


def record_form(stored: str) -> str:
    """An encrypted value as a credential record holds it (a plain or
    undecodable value is returned as it is)."""
    parts = split_encrypted(stored)
    if parts is None or parts[2]:
        return stored
    kid, body, _ = parts
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        return stored  # not ours to repair: decoding it reports it
    return f"{RECORD_MARK}{kid}.{raw.decode('utf-8', 'surrogateescape')}"


def text_form(stored: str) -> str:
    """An encrypted value in its text form, what events and JSON carry (a
    plain value is returned as it is)."""
    parts = split_encrypted(stored)
    if parts is None or not parts[2]:
        return stored
    kid, body, _ = parts
    raw = body.encode("utf-8", "surrogateescape")
    return f"{ENCRYPTED_MARK}{kid}.{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}"


class SecretCodec(Protocol):
    """What the store, the client library, the CLI and the spool call.

    ``encode``: plaintext to the stored form, in its text form (``""``
    stays ``""``: an empty value is "no value" in a record);
    ``encode_record``: the same in the record form, as the bytes a script
    writes into a credential record (a plain codec's is the plaintext). ``decode``:
    the stored form back, in either form, accepting plain values too (a
    database written before encryption was switched on); raises ``SecretUnreadable`` when the value
    is encrypted and cannot be read. ``key_id``: the key id a stored value
    is encrypted under, None for a plain (or empty) value.
    ``allow_compact_forms``: whether new values may use the forms the
    previous release cannot read (the store passes on the layout's word);
    ``clone``: a codec with the same keys and its own state, which is how
    each store gets one (the layout's word is one database's).
    """

    @property
    def encrypting(self) -> bool:
        """True when ``encode`` encrypts."""
        ...

    @property
    def primary_key_id(self) -> str | None:
        """The key id new writes use; None for a codec that does not encrypt."""
        ...

    def encode(self, plaintext: str, ctx: SecretContext) -> str: ...

    def encode_record(self, plaintext: str, ctx: SecretContext) -> str | bytes: ...

    def decode(self, stored: str, ctx: SecretContext) -> str: ...

    def key_id(self, stored: str) -> str | None: ...

    def allow_compact_forms(self, allowed: bool) -> None: ...

    def clone(self) -> SecretCodec: ...


class PlainCodec:
    """Stores secrets as they are: protect Redis with ACLs and TLS, or set
    a key ring (README "Encryption at rest"). It refuses to read an
    encrypted value rather than hand ciphertext on as if it were a token
    (a worker started without the ring would send it to the provider)."""

    @property
    def encrypting(self) -> bool:
        return False

    @property
    def primary_key_id(self) -> str | None:
        return None

    def encode(self, plaintext: str, ctx: SecretContext) -> str:
        return plaintext

    def encode_record(self, plaintext: str, ctx: SecretContext) -> str | bytes:
        return plaintext

    def decode(self, stored: str, ctx: SecretContext) -> str:
        parts = split_encrypted(stored)
        if parts is not None:
            kid = parts[0]
            raise SecretUnreadable(
                "unknown_key",
                f"{ctx.kind} {ctx.record} field {ctx.field} is encrypted under key id "
                f"{kid!r} and no key ring is set (REFRESHD_ENCRYPTION_KEYS[_FILE])",
            )
        return stored

    def key_id(self, stored: str) -> str | None:
        parts = split_encrypted(stored)
        return None if parts is None else parts[0]

    def allow_compact_forms(self, allowed: bool) -> None:
        pass  # plaintext has one form

    def clone(self) -> SecretCodec:
        return self  # no state
