"""Nonces drawn from OS randomness a block at a time: never one twice, not
across threads, not across a fork (``worker.nonces``)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from worker.codec import SecretContext
from worker.keyring import AesGcmCodec, KeyRing
from worker.nonces import NONCE_BYTES, NoncePool

CTX = SecretContext("refreshd:", "credential", "c1", "access_token")


def _nonce_of(codec: AesGcmCodec) -> bytes:
    """The nonce of a freshly sealed value (the record form: mark, key id,
    dot, then the nonce)."""
    sealed = codec.encode_record("token-value", CTX)
    assert isinstance(sealed, bytes)
    return sealed[len(b"\xffk1.") :][:NONCE_BYTES]


def test_a_pool_hands_out_each_slice_once_across_many_blocks() -> None:
    pool = NoncePool()
    taken = [pool.take() for _ in range(5_000)]  # about 15 blocks
    assert {len(n) for n in taken} == {NONCE_BYTES}
    assert len(set(taken)) == len(taken)


def test_threads_taking_at_once_never_get_the_same_nonce() -> None:
    """Threads switching every microsecond (not every 5 ms), so that some
    take a nonce while another is between reading the cursor and moving
    it, or refilling the block."""
    pool = NoncePool()
    out: list[list[bytes]] = [[] for _ in range(8)]
    start = threading.Barrier(len(out))

    def take(mine: list[bytes]) -> None:
        start.wait()
        for _ in range(3_000):
            mine.append(pool.take())

    threads = [threading.Thread(target=take, args=(mine,)) for mine in out]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    every = [n for mine in out for n in mine]
    assert len(set(every)) == len(every) == 24_000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork: POSIX only")
def test_a_forked_child_never_seals_with_its_parents_nonces() -> None:
    """The parent has a block in hand when it forks; without the pool's
    fork hook the child would hand out the very bytes the parent goes on
    to use, under the same key."""
    codec = AesGcmCodec(KeyRing([("k1", bytes(32))]))
    _nonce_of(codec)  # the parent now holds a block with 340 nonces left
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write its next 50 nonces and leave at once
        try:
            os.close(read)
            os.write(write, b"".join(_nonce_of(codec) for _ in range(50)))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    child = {data[i : i + NONCE_BYTES] for i in range(0, len(data), NONCE_BYTES)}
    parent = {_nonce_of(codec) for _ in range(50)}
    assert len(child) == 50
    assert not child & parent
