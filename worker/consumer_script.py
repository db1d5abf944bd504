"""The token script as a consumer outside Python loads it (SCRIPT LOAD, EVALSHA).

A non-Python application reads tokens, and asks for min-TTL refreshes,
through the same Lua script as ``worker.client`` (``worker/scripts/token.lua``
behind ``record.lua``; its contract header documents KEYS, ARGV and the
reply, with ``"json"`` as the fourth argument for a JSON object).
``token_script_source()`` is the exact text the Python client registers, so
its SHA1 is the one the Python client uses; ``refreshd consumer script``
prints it.
"""

from __future__ import annotations

import hashlib

from worker.redisio import script_source

__all__ = ["token_script_sha", "token_script_source"]


def token_script_source() -> str:
    """The token script exactly as the Python client sends it."""
    return script_source("token")


def token_script_sha() -> str:
    """SHA1 of ``token_script_source()``: what EVALSHA takes after SCRIPT LOAD.
    It changes with the refreshd version, so load the source at start rather
    than hard-coding the SHA."""
    return hashlib.sha1(token_script_source().encode()).hexdigest()  # noqa: S324 - Redis's script id
