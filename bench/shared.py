"""Names and seed data shared by the driver and both systems' processes
(standard library only: the arq side runs in its own virtualenv)."""

from __future__ import annotations

import argparse

from bench.endpoint import SEED_PREFIX

__all__ = ["ARQ_CRED", "ARQ_LOCK", "ARQ_QUEUE", "arq_job_id", "positive_int", "seed_tokens"]

ARQ_QUEUE = "arq:queue"  # arq's default queue (a sorted set: job id -> run at, ms)
ARQ_CRED = "alt:cred:"
ARQ_LOCK = "alt:lock:"


def arq_job_id(cred_id: str, version: int) -> str:
    return f"{cred_id}:{version}"


def seed_tokens(i: int, tag: str = "") -> tuple[str, str]:
    """An 800-character access token and a ~100-character refresh token that
    the benchmark's endpoint accepts (once: ``tag`` keeps runs apart)."""
    body = f"{i:010d}" * 80
    refresh = f"{SEED_PREFIX}{tag}.{i:010d}."
    return f"at0.{body}"[:800], refresh + "r" * (100 - len(refresh))


def positive_int(text: str) -> int:
    """An argparse type: a count of runs or credentials (a clear usage
    error for 0, a negative or a non-number, not a traceback later)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value
