"""`python -m bench.codec_cost`: what encryption at rest adds to one refresh, in a loop.

The calls a refresh makes to the secret codec with a key ring, on a real
``Store`` and ``EventSecrets`` (no Redis round trip: none of these calls
makes one): read the claimed refresh token, seal the new access token
for the event, then the new refresh and access tokens for the record (the
latter is the event's ciphertext again). Tokens as the benchmark endpoint
issues them (an 800-character access token ``at.<n>.<base64url>``, a
100-character refresh token). Each payload kind the layout can choose is
timed: kind 1 (Huffman codes: a database the previous release reads) and
kind 2 (base64url packed 6 bits a character: the default). Run alongside
``bench.encryption_ab``, which measures the same work inside a worker.

    python -m bench.codec_cost --rounds 9
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import timeit
from collections.abc import Callable

import redis.asyncio

from bench.shared import positive_int
from worker.events import EventSecrets
from worker.keyring import AesGcmCodec, KeyRing
from worker.keys import Keyspace
from worker.store import Store

__all__ = ["per_refresh"]


def per_refresh(compact: bool) -> tuple[Callable[[], None], Store]:
    """One refresh's codec calls, under payload kind 2 when ``compact``,
    and the store they go through."""
    store = Store(redis.asyncio.Redis(), Keyspace("refreshd:", 16),
                  AesGcmCodec(KeyRing([("b1", bytes(32))])))  # fmt: skip
    store._compact_secrets(compact)  # what check_layout learns from the layout
    events = EventSecrets("encrypted", store.codec, store.keys.prefix)
    body = base64.urlsafe_b64encode(os.urandom(600)).decode()
    access = f"at.{12345:012d}.{body}"[:800]
    refresh = f"rt.{12345:012d}.{body[:84]}"
    cred = "cred-0000012345"
    stored = store.encode(cred, "refresh_token", refresh)
    claimed = stored.decode("utf-8", "surrogateescape") if isinstance(stored, bytes) else stored

    def refresh_once() -> None:
        assert store.decode(cred, "refresh_token", claimed) == refresh
        new_access = access[:-1] + access[-1]  # a new string, as each answer is
        event = {"credential_id": cred, "access_token": new_access}
        events.apply(event)
        store.encode(cred, "refresh_token", refresh)
        store.encode(cred, "access_token", new_access)

    return refresh_once, store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=9, help="timed rounds per kind")
    parser.add_argument("--calls", type=positive_int, default=10_000, help="refreshes per round")
    args = parser.parse_args(argv)
    runs = {"kind_1": per_refresh(False)[0], "kind_2": per_refresh(True)[0]}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):  # the kinds in turn: the machine's speed drifts
        for name, run in runs.items():
            times[name].append(timeit.timeit(run, number=args.calls) / args.calls * 1e6)
    out = {f"{name}_us_per_refresh": round(statistics.median(t), 2) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name}: {statistics.median(t):.1f} µs per refresh (median of {args.rounds} rounds,"
              f" {min(t):.1f}-{max(t):.1f})")  # fmt: skip
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
