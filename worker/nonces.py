"""Random 96-bit AES-GCM nonces, read from the OS a block at a time.

Every value sealed needs a fresh random nonce, two per refresh.
``os.urandom(12)`` for each is a ``getrandom`` system call each, and inside
a busy worker on a virtual machine that call costs many times what it does
in a loop: ``perf`` puts the kernel's random-number path (its locks disable
interrupts) among the larger items of what encryption adds to a refresh.
Reading 4 KiB at once and handing out 12 bytes at a time makes it one call
per 341 nonces. The bytes are the same OS randomness, each handed out once,
so the nonces are exactly as random as before: the birthday bound of
96-bit random nonces (rotate a key before 2^32 values) is unchanged.

A child process must never hand out the bytes its parent will also hand
out: a repeated nonce under one key reveals the XOR of two plaintexts and
lets the GCM authentication key be recovered. ``os.register_at_fork`` drops
the block in the child (and replaces the lock, which another thread may
have held at the fork), so the child reads its own.
"""

from __future__ import annotations

import os
import threading
from typing import Final

__all__ = ["NONCE_BYTES", "NoncePool", "nonce"]

NONCE_BYTES: Final = 12
#: 341 nonces a read: one page
_BLOCK: Final = 4096 // NONCE_BYTES * NONCE_BYTES


class NoncePool:
    """Hands out each 12-byte slice of an OS-random block once."""

    __slots__ = ("_at", "_block", "_lock")

    def __init__(self) -> None:
        self._block = b""
        self._at = 0
        self._lock = threading.Lock()

    def take(self) -> bytes:
        """The next nonce, never one handed out before by this process. The
        lock keeps two threads from taking the same slice."""
        with self._lock:
            at = self._at
            if at == len(self._block):
                self._block, at = os.urandom(_BLOCK), 0
            self._at = at + NONCE_BYTES
            return self._block[at : at + NONCE_BYTES]

    def forget(self) -> None:
        """Drop what is left of the block (in a forked child: the parent
        hands those bytes out)."""
        self._block = b""
        self._at = 0
        self._lock = threading.Lock()


#: the process's pool: every codec draws from it, and one place forgets at a fork
_POOL: Final = NoncePool()
os.register_at_fork(after_in_child=_POOL.forget)
nonce = _POOL.take
