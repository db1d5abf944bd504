"""The one codec every token and secret passes through on its way to Redis.

Encryption at rest switches on here without touching anything else: the
store calls ``encode`` before every write of a secret field and ``decode``
after every read, and the Lua scripts only ever move the encoded form
around. ``PlainCodec`` stores secrets as they are; ``worker.keyring``
holds the AES-256-GCM codec and builds the right one from the settings.

Every call names its ``SecretContext`` (key prefix, record kind, record id,
field name). An encrypting codec binds the ciphertext to it (associated
data), so a value copied to another record or field no longer decrypts.
"""

from __future__ import annotations

from typing import Final, Literal, NamedTuple, Protocol

from worker.errors import SecretUnreadable

__all__ = [
    "ENCRYPTED_MARK",
    "PlainCodec",
    "RecordKind",
    "SecretCodec",
    "SecretContext",
    "looks_encrypted",
]

#: what every value of the encrypted format starts with (``e1.<kid>.<body>``)
ENCRYPTED_MARK: Final = "e1."

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
    """True when ``stored`` has the encrypted format's shape. A plain value
    of that shape is read as ciphertext (and fails): an OAuth token never
    starts with ``e1.`` followed by a key id and a dot in practice."""
    return stored.startswith(ENCRYPTED_MARK) and stored.find(".", len(ENCRYPTED_MARK)) > 0


class SecretCodec(Protocol):
    """What the store, the client library, the CLI and the spool call.

    ``encode``: plaintext to the stored form (``""`` stays ``""``: an
    empty value is "no value" in a record). ``decode``: the stored form
    back, accepting plain values too (a database written before
    encryption was switched on); raises ``SecretUnreadable`` when the value
    is encrypted and cannot be read. ``key_id``: the key id a stored value
    is encrypted under, None for a plain (or empty) value.
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

    def decode(self, stored: str, ctx: SecretContext) -> str: ...

    def key_id(self, stored: str) -> str | None: ...


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

    def decode(self, stored: str, ctx: SecretContext) -> str:
        if looks_encrypted(stored):
            kid = stored[len(ENCRYPTED_MARK) :].split(".", 1)[0]
            raise SecretUnreadable(
                "unknown_key",
                f"{ctx.kind} {ctx.record} field {ctx.field} is encrypted under key id "
                f"{kid!r} and no key ring is set (REFRESHD_ENCRYPTION_KEYS[_FILE])",
            )
        return stored

    def key_id(self, stored: str) -> str | None:
        return stored[len(ENCRYPTED_MARK) :].split(".", 1)[0] if looks_encrypted(stored) else None
