"""Encryption at rest: an AES-256-GCM key ring behind the secret codec.

A key ring is a list of 256-bit keys, each with a short key id; the first
(the primary) encrypts every new value, every key in the ring decrypts.
A stored value names its format and key id::

    e1.<kid>.<base64url(nonce || ciphertext || tag)>     (no padding)

(a credential record holds the same bytes unencoded, ``worker.codec``'s
record form) with a fresh random 96-bit nonce per value. The associated data is the
format, the key id and the value's ``SecretContext`` (prefix, record kind,
record id, field), so a ciphertext moved to another record or field, or
relabelled with another key id, fails to decrypt. Inside the ciphertext,
one byte says how the value was packed first: tokens are mostly base64url
text, 6 bits of information per character, and packing wins back what
base64 adds to the ciphertext. Kind 2 packs base64url text 6 bits per
character (a table lookup in C, no compressor state); kind 1, raw deflate
with Huffman codes only, packs any other long value, and whatever a
previous release may read (kind 2 is new: ``AesGcmCodec.allow_compact_forms``).

Keys come from ``REFRESHD_ENCRYPTION_KEYS`` (``kid:base64key`` entries,
comma-separated, primary first) or ``REFRESHD_ENCRYPTION_KEYS_FILE`` (one
entry per line, ``#`` comments; a mounted Kubernetes Secret). A malformed
ring is one ``ConfigError`` line naming the entry, never the key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pybase64
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker.codec import (
    ENCRYPTED_MARK,
    RECORD_MARK,
    PlainCodec,
    SecretCodec,
    SecretContext,
    split_encrypted,
)
from worker.errors import ConfigError, SecretUnreadable
from worker.nonces import NONCE_BYTES
from worker.nonces import nonce as take_nonce

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = [
    "KEY_BYTES",
    "AesGcmCodec",
    "KeyRing",
    "codec_from_settings",
    "generate_key",
    "key_ring_from_settings",
    "parse_key_ring",
]

#: AES-256: every key is 32 bytes (44 characters of base64)
KEY_BYTES: Final = 32
_NONCE: Final = NONCE_BYTES
_TAG: Final = 16
#: values shorter than this are not worth packing (a refresh token often is)
_PACK_MIN: Final = 128
#: how values are deflated: Huffman coding only (no string matching), a
#: small window and memory level. Tokens are random text over a small
#: alphabet, which Huffman codes pack as well as full deflate does, at a
#: fraction of zlib's default cost (a 32 KiB window and 256 KiB of state,
#: allocated afresh for every value).
_WBITS: Final = -10
_MEMLEVEL: Final = 4
#: payload kinds (the plaintext's first byte)
_RAW, _DEFLATED, _BASE64URL = 0, 1, 2
_RAW_BYTE, _DEFLATED_BYTE, _BASE64URL_BYTE = b"\x00", b"\x01", b"\x02"
#: what fills a segment's last group of four characters up, by how many are missing
_FILL: Final = (b"", b"A", b"AA", b"AAA")
#: kind 2 packs base64url characters, in segments between dots (JWTs):
#: ``-_`` become standard base64's ``+/``, and standard base64's own ``+/=``
#: a character that is not base64 at all, which the decoder refuses
_TO_STANDARD: Final = bytes.maketrans(b"-_+/=", b"+/!!!")
_KID = re.compile(r"[A-Za-z0-9_-]{1,16}")


class KeyRing:
    """Key ids and their AES-GCM ciphers, primary first. Its repr shows
    the key ids only; the key bytes are not kept beyond the ciphers."""

    __slots__ = ("_ciphers", "ids")

    def __init__(self, keys: Iterable[tuple[str, bytes]]) -> None:
        self._ciphers: dict[str, AESGCM] = {}
        for kid, key in keys:
            if not _KID.fullmatch(kid):
                raise ValueError("a key id is 1-16 letters, digits, '_' or '-'")
            if kid in self._ciphers:
                raise ValueError(f"key id {kid!r} appears twice")
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {kid!r} is {len(key)} bytes, AES-256 needs {KEY_BYTES}")
            self._ciphers[kid] = AESGCM(key)
        if not self._ciphers:
            raise ValueError("a key ring needs at least one key")
        #: every key id, primary first
        self.ids: tuple[str, ...] = tuple(self._ciphers)

    @property
    def primary(self) -> str:
        """The key id new values are encrypted under."""
        return self.ids[0]

    def cipher(self, kid: str) -> AESGCM | None:
        return self._ciphers.get(kid)

    def __repr__(self) -> str:
        return f"KeyRing(ids={list(self.ids)!r})"


def parse_key_ring(text: str, *, source: str, one_per_line: bool) -> KeyRing:
    """A ring from ``kid:base64key`` entries, primary first: separated by
    commas (or lines) for the variable, one per line for the file, where
    blank lines and ``#`` comments are skipped. ``source`` names the
    setting in the error, which names the entry by position and key id and
    never shows its key."""
    if one_per_line:
        lines = (line.strip() for line in text.splitlines())
        entries = [line for line in lines if line and not line.startswith("#")]
        where = "line"
    else:
        entries = [e.strip() for e in re.split(r"[,\s]+", text) if e.strip()]
        where = "entry"
    keys: list[tuple[str, bytes]] = []
    for n, entry in enumerate(entries, 1):
        kid, sep, encoded = entry.partition(":")
        kid = kid.strip()
        if not sep or not _KID.fullmatch(kid):
            raise ConfigError(
                f"{source}: {where} {n} is not kid:base64key (a key id of 1-16 letters, "
                "digits, '_' or '-', a colon, then the key)"
            )
        try:
            key = base64.b64decode(_standard_b64(encoded.strip()), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{source}: key {kid!r} ({where} {n}) is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise ConfigError(
                f"{source}: key {kid!r} ({where} {n}) is {len(key)} bytes; AES-256 needs "
                f"{KEY_BYTES} (generate one with `refreshd key generate`)"
            )
        if any(kid == seen for seen, _ in keys):
            raise ConfigError(f"{source}: key id {kid!r} appears twice ({where} {n})")
        keys.append((kid, key))
    if not keys:
        raise ConfigError(f"{source}: no key in it (kid:base64key, primary first)")
    return KeyRing(keys)


def _standard_b64(text: str) -> str:
    """Accept base64 and base64url, with or without padding."""
    text = text.replace("-", "+").replace("_", "/")
    return text + "=" * (-len(text) % 4)


def key_ring_from_settings(settings: Settings) -> KeyRing | None:
    """The ring the settings name, or None when encryption is off."""
    if settings.encryption_keys and settings.encryption_keys_file:
        raise ConfigError(
            "set one of REFRESHD_ENCRYPTION_KEYS and REFRESHD_ENCRYPTION_KEYS_FILE, not both"
        )
    if settings.encryption_keys:
        return parse_key_ring(
            settings.encryption_keys, source="REFRESHD_ENCRYPTION_KEYS", one_per_line=False
        )
    if settings.encryption_keys_file:
        path = Path(settings.encryption_keys_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"REFRESHD_ENCRYPTION_KEYS_FILE {path} cannot be read: {exc.strerror or exc}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"REFRESHD_ENCRYPTION_KEYS_FILE {path} is not text") from None
        return parse_key_ring(text, source="REFRESHD_ENCRYPTION_KEYS_FILE", one_per_line=True)
    return None


def codec_from_settings(settings: Settings) -> SecretCodec:
    """The codec every process of an installation uses: AES-GCM over the
    configured ring, or ``PlainCodec`` when none is set."""
    ring = key_ring_from_settings(settings)
    return PlainCodec() if ring is None else AesGcmCodec(ring)


def generate_key() -> str:
    """A new random AES-256 key, base64 (what follows ``kid:`` in a ring)."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


class AesGcmCodec:
    """AES-256-GCM over a key ring (the module docstring has the format)."""

    __slots__ = (
        "_aad_heads",
        "_aad_last",
        "_aad_marks",
        "_ciphers",
        "_compact",
        "_kid",
        "_last",
        "_mark",
        "_primary",
        "_record_mark",
        "ring",
    )

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring
        self._kid = ring.primary
        primary = ring.cipher(self._kid)
        assert primary is not None
        self._primary = primary
        self._mark = f"{ENCRYPTED_MARK}{ring.primary}."
        self._record_mark = f"{RECORD_MARK}{ring.primary}.".encode("utf-8", "surrogateescape")
        #: what each key id's associated data starts with (format and key id)
        self._aad_marks = {kid: f"{ENCRYPTED_MARK}{kid}.".encode() for kid in ring.ids}
        #: (key id, prefix, record kind) -> the associated data's start, as
        #: text (``_aad``): a few entries, one per kind of record a process
        #: seals; and the last one used, which a worker's calls all share
        self._aad_heads: dict[tuple[str, str, str], str] = {}
        self._aad_last: tuple[str, str, str, str] = ("", "", "", "")
        self._ciphers = {kid: ring.cipher(kid) for kid in ring.ids}
        #: the last long value sealed: (the plaintext, by identity; its
        #: context; nonce, ciphertext and tag). A refresh writes its access
        #: token twice, into its event (text form) and into the record
        #: (record form), under the same context: the second is the same
        #: ciphertext, not a second one (nor a second associated data).
        self._last: tuple[str, SecretContext | None, bytes] = ("", None, b"")
        #: payload kind 2 allowed (no process of the previous release reads
        #: this database: ``allow_compact_forms``)
        self._compact = False

    @property
    def encrypting(self) -> bool:
        return True

    @property
    def primary_key_id(self) -> str | None:
        return self.ring.primary

    def allow_compact_forms(self, allowed: bool) -> None:
        """Whether new values may use payload kind 2, which the previous
        release does not read: the store says so from the database's layout
        (where it allows the record form), before any value is sealed."""
        if allowed != self._compact:
            self._compact = allowed
            self._last = ("", None, b"")

    def clone(self) -> SecretCodec:
        """The same ring, this codec's own memo and word on kind 2."""
        return AesGcmCodec(self.ring)

    def encode(self, plaintext: str, ctx: SecretContext) -> str:
        if not plaintext:
            return ""
        body = pybase64.b64encode_as_string(self._seal(plaintext, ctx), altchars=b"-_")
        return self._mark + body.rstrip("=")

    def encode_record(self, plaintext: str, ctx: SecretContext) -> str | bytes:
        if not plaintext:
            return ""
        return self._record_mark + self._seal(plaintext, ctx)

    def _seal(self, plaintext: str, ctx: SecretContext) -> bytes:
        """Nonce, ciphertext and tag of ``plaintext`` under the primary key."""
        last = self._last
        if plaintext is last[0] and ctx == last[1]:
            return last[2]
        payload = _payload(plaintext, self._compact)
        nonce = take_nonce()
        sealed = nonce + self._primary.encrypt(nonce, payload, self._aad(self._kid, ctx))
        if payload[0] != _RAW:  # a short value is cheap to seal again, and must not evict it
            self._last = (plaintext, ctx, sealed)
        return sealed

    def decode(self, stored: str, ctx: SecretContext) -> str:
        parts = split_encrypted(stored)
        if parts is None:
            return stored  # written before encryption was on: `key rotate` rewrites it
        kid, body, record = parts
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise SecretUnreadable(
                "unknown_key",
                f"{_where(ctx)} is encrypted under key id {kid[:32]!r}, which is not in the "
                f"key ring ({', '.join(self.ring.ids)})",
            )
        try:
            raw = body.encode("utf-8", "surrogateescape") if record else _unbase64(body)
            return _open(cipher, raw, self._aad(kid, ctx))
        except (InvalidTag, binascii.Error, ValueError, zlib.error):
            raise SecretUnreadable(
                "undecryptable",
                f"{_where(ctx)} does not decrypt with key {kid!r}: altered, or copied from "
                "another record or field",
            ) from None

    def key_id(self, stored: str) -> str | None:
        parts = split_encrypted(stored)
        return None if parts is None else parts[0]

    def _aad(self, kid: str, ctx: SecretContext) -> bytes:
        """``e1.<kid>.`` and ``ctx.aad()``: the same bytes, with the part
        every value of a key, prefix and record kind shares made once (as
        text: UTF-8 reads it back to the same bytes, and ASCII ids add as
        many bytes as characters, so one encode makes the whole)."""
        prefix, kind, record, field = ctx
        last = self._aad_last
        if kid == last[0] and prefix == last[1] and kind == last[2]:
            head = last[3]
        else:
            head = self._aad_heads.get((kid, prefix, kind), "")
            if not head:
                start = self._aad_marks[kid] + SecretContext(prefix, kind, "", "").aad()[:-4]
                head = self._aad_heads[(kid, prefix, kind)] = start.decode()
            self._aad_last = (kid, prefix, kind, head)
        if record.isascii() and field.isascii():
            return f"{head}{len(record)}:{record}{len(field)}:{field}".encode()
        return self._aad_marks[kid] + ctx.aad()  # a non-ASCII id: rare, made whole

    def __repr__(self) -> str:
        return f"AesGcmCodec({self.ring!r})"


def _payload(plaintext: str, compact: bool) -> bytes:
    """What is encrypted: one byte for the payload kind, then the value,
    packed when it is long enough for that to pay and it does; kind 2 only
    where ``compact``."""
    data = plaintext.encode()
    if len(data) < _PACK_MIN:
        return _RAW_BYTE + data
    if compact:
        packed = _pack_base64url(data)
        if packed is not None:
            return packed
    deflate = zlib.compressobj(1, zlib.DEFLATED, _WBITS, _MEMLEVEL, zlib.Z_HUFFMAN_ONLY)
    packed = deflate.compress(data) + deflate.flush()
    if len(packed) < len(data):
        return _DEFLATED_BYTE + packed
    return _RAW_BYTE + data


def _pack_base64url(data: bytes) -> bytes | None:
    """Kind 2, its byte first: for each segment between dots, its length
    in characters (two bytes, big-endian), then its characters 6 bits
    each, the last group of four filled up with ``A`` (zero bits), so that
    any length and any last character packs exactly. None for a value with
    any other character, or a segment too long to count in two bytes.

    The translation makes every character that is not base64url one the
    decoder refuses, so that one pass over the value both converts it and
    rejects any other value."""
    out = [_BASE64URL_BYTE]
    for segment in data.translate(_TO_STANDARD).split(b"."):
        n = len(segment)
        fill = -n % 4
        try:
            packed = pybase64.b64decode(segment + _FILL[fill] if fill else segment, validate=True)
            out += (n.to_bytes(2, "big"), packed)
        except (binascii.Error, OverflowError):
            return None
    return b"".join(out)


def _unpack_base64url(data: bytes) -> bytes:
    segments = []
    at, end = 0, len(data)
    while at < end:
        if at + 2 > end:
            raise ValueError("a truncated segment length")
        n = int.from_bytes(data[at : at + 2], "big")
        size = (n + 3) // 4 * 3
        chunk = data[at + 2 : at + 2 + size]
        if len(chunk) != size:
            raise ValueError("a truncated segment")
        segments.append(pybase64.b64encode(chunk, altchars=b"-_")[:n])
        at += 2 + size
    return b".".join(segments)


def _unbase64(body: str) -> bytes:
    return pybase64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)


def _open(cipher: AESGCM, raw: bytes, aad: bytes) -> str:
    """Decrypt and unpack one value's bytes (nonce, ciphertext, tag);
    ValueError (or the cipher's InvalidTag) when it is not one this ring
    sealed for ``aad``."""
    if len(raw) <= _NONCE + _TAG:
        raise ValueError("too short")
    plain = cipher.decrypt(raw[:_NONCE], raw[_NONCE:], aad)
    kind, data = plain[0], plain[1:]
    if kind == _BASE64URL:
        data = _unpack_base64url(data)
    elif kind == _DEFLATED:
        data = zlib.decompress(data, -15)  # any window: the format says raw deflate
    elif kind != _RAW:
        raise ValueError("unknown payload kind")
    return data.decode()


def _where(ctx: SecretContext) -> str:
    return f"{ctx.kind} {ctx.record!r} field {ctx.field}"
