"""What a readable answer writes: the record's fields, the next due time and the event.

Three shapes of answer land (``worker.answers.read_answer``):

- a full token set: the tokens, due before the new expiry, ``token.refreshed``;
- a new refresh token without an access token: the refresh token is stored
  (the grant lives in it) while the stored access token and its expiry stay;
  the credential is due again after the usual failure backoff (so a provider
  that keeps doing it is not hammered) and a ``token.failed`` event with
  reason ``access_token_missing`` says the access token did not change;
- a usable access token whose refresh token a rotating provider did not
  replace: the tokens are stored and the old refresh token is marked as
  sent without an answer for it (``ambiguous_at``), so the unknown-outcome
  rule decides before it goes out again: inside the profile's reuse grace
  it is due again after a short backoff, within the window; otherwise it is due now and the
  next claim quarantines the credential without sending anything.

A rotation records the spent token's fingerprint (``spent_rt``), so that an
import can never write it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from worker.answers import TokenSet
from worker.events import EventSecrets, EventType, build_event
from worker.logs import fingerprint
from worker.models import Claimed, Profile, Rotation
from worker.scheduling import Schedule

__all__ = ["PARTIAL_REASON", "Landing", "plan_landing", "spent_fingerprint"]

#: commit reason (and event reason) of an answer without an access token
PARTIAL_REASON = "access_token_missing"


def spent_fingerprint(refresh_token: str) -> str:
    """What the record keeps of a spent refresh token (``spent_rt``): 8 hex
    digits (32 bits) of its SHA-256, enough to tell it from a fresh token."""
    return fingerprint(refresh_token)[:8]


@dataclass(frozen=True, slots=True)
class Landing:
    fields: dict[str, str | int]
    next_due_ms: int
    event: str
    reason: str  # "" or PARTIAL_REASON: the commit's failure reason


def plan_landing(
    c: Claimed,
    profile: Profile,
    tokens: TokenSet,
    schedule: Schedule,
    now_ms: int,
    secrets: EventSecrets | None = None,
) -> Landing:
    """``secrets``: how the event carries the new access token (clear by default)."""
    fields: dict[str, str | int] = {"refresh_token": tokens.refresh_token, "scope": tokens.scope}
    if tokens.rotated and c.refresh_token:
        fields["spent_rt"] = spent_fingerprint(c.refresh_token)
    if tokens.extra:
        fields["extra"] = json.dumps(tokens.extra, sort_keys=True)
    if tokens.refresh_expires_at_ms:
        fields["refresh_expires_at"] = tokens.refresh_expires_at_ms
    version = int(c.version) + 1
    if not tokens.access_token:
        failures = c.failures + 1
        next_due = schedule.retry_due_ms(
            now_ms=now_ms, failures=failures, expires_at_ms=c.expires_at_ms
        )
        fields |= {"failures": failures, "last_error": PARTIAL_REASON, "last_error_at": now_ms}
        if not c.failures:
            fields["failing_since"] = now_ms
        event = build_event(
            EventType.FAILED,
            credential_id=c.id,
            profile=c.profile,
            version=version,
            ts_ms=now_ms,
            reason=PARTIAL_REASON,
            failures=failures,
            retry_at_ms=next_due,
            warnings=tokens.warnings,
        )
        return Landing(fields, next_due, event, PARTIAL_REASON)
    fields |= {
        "access_token": tokens.access_token,
        "token_type": tokens.token_type,
        "expires_at": tokens.expires_at_ms,
    }
    if c.failures:
        fields["failing_since"] = ""  # the streak is over
    next_due = schedule.next_due_ms(
        now_ms=now_ms,
        expires_at_ms=tokens.expires_at_ms,
        profile_lead_s=profile.refresh_lead_s,
        max_interval_s=profile.max_refresh_interval_s,
        refresh_expires_at_ms=tokens.refresh_expires_at_ms or c.refresh_expires_at_ms,
    )
    if tokens.refresh_unconfirmed:
        first_send = c.ambiguous_at_ms or c.claimed_at_ms
        fields["ambiguous_at"] = first_send
        retry = schedule.retry_due_ms(
            now_ms=now_ms, failures=c.failures + 1, expires_at_ms=tokens.expires_at_ms
        )
        next_due = _unconfirmed_due(profile, first_send, now_ms, retry)
    event = build_event(
        EventType.REFRESHED,
        credential_id=c.id,
        profile=c.profile,
        version=version,
        ts_ms=now_ms,
        access_token=tokens.access_token,
        token_type=tokens.token_type,
        expires_at_ms=tokens.expires_at_ms,
        scope=tokens.scope,
        extra=tokens.extra,
        warnings=tokens.warnings,
        secrets=secrets,
    )
    return Landing(fields, next_due, event, "")


def _unconfirmed_due(profile: Profile, first_send_ms: int, now_ms: int, due_ms: int) -> int:
    """``due_ms`` (a backoff retry) if it falls inside the reuse grace
    window (counted from the first send, less the request's timeout and a
    second), else the window's end; now when there is no window: the claim
    then quarantines without sending."""
    if profile.rotation is Rotation.NEVER or profile.reuse_grace_s <= 0:
        return now_ms
    latest = first_send_ms + int((profile.reuse_grace_s - profile.timeout_s) * 1000) - 1000
    return max(min(due_ms, latest), now_ms + 50)
