"""The one codec every token and secret passes through on its way to Redis.

Encryption at rest (AES-GCM with a key ring and key ids) switches on here
without touching anything else: the store calls ``encode`` before every
write of a secret field and ``decode`` after every read, and the Lua scripts
only ever move the encoded form around.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["PlainCodec", "SecretCodec"]


class SecretCodec(Protocol):
    def encode(self, plaintext: str) -> str: ...

    def decode(self, stored: str) -> str: ...


class PlainCodec:
    """Stores secrets as they are: protect Redis with ACLs and TLS."""

    def encode(self, plaintext: str) -> str:
        return plaintext

    def decode(self, stored: str) -> str:
        return stored
