"""RFC 6749 §6, the refresh_token grant, as one call each way.

The machinery lives in ``worker.strategies`` (requests, for every strategy)
and ``worker.answers`` (reading answers); these are the names for the
standard grant, kept small for callers that only speak plain OAuth.
"""

from __future__ import annotations

from worker.answers import TokenSet, jwt_expiry_ms, read_answer
from worker.profile import Profile
from worker.strategies import basic_credentials, build_request
from worker.transport import HttpAnswer, TokenRequest

__all__ = [
    "TokenSet",
    "basic_credentials",
    "build_refresh_request",
    "jwt_expiry_ms",
    "parse_token_answer",
]


def build_refresh_request(
    profile: Profile, *, refresh_token: str, granted_scope: str
) -> TokenRequest:
    return build_request(profile, secret=refresh_token, granted_scope=granted_scope)


def parse_token_answer(
    answer: HttpAnswer,
    profile: Profile,
    *,
    now_ms: int,
    old_refresh_token: str,
    old_scope: str,
) -> TokenSet:
    return read_answer(
        answer, profile, now_ms=now_ms, old_secret=old_refresh_token, old_scope=old_scope
    )
