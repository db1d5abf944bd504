"""Reading a sealed value the way a consumer in another language does
(README "The format"): what tests check of its payload kind."""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker.codec import SecretContext, split_encrypted
from worker.keyring import _unbase64


def payload_kind(stored: str | bytes, ctx: SecretContext, key: bytes) -> int:
    """The first byte of the plaintext inside ``stored``, in either form
    (the record form as the bytes a script writes, or as read back)."""
    if isinstance(stored, bytes):
        stored = stored.decode("utf-8", "surrogateescape")
    parts = split_encrypted(stored)
    assert parts is not None
    kid, body, record = parts
    raw = body.encode("utf-8", "surrogateescape") if record else _unbase64(body)
    aad = f"e1.{kid}.".encode() + ctx.aad()
    return AESGCM(key).decrypt(raw[:12], raw[12:], aad)[0]
