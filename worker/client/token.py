"""The token a consumer receives, and the record view it is cut from."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from worker.models import Status

if TYPE_CHECKING:
    from worker.store import Store

__all__ = ["AccessToken"]

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class AccessToken:
    """One credential's current access token, as a consumer may see it.

    Never carries the refresh token: only refreshd spends it. ``version``
    increases with every stored token set (events carry the same number);
    ``extra`` holds the answer fields the profile keeps (``keep_fields``,
    e.g. a Salesforce ``instance_url``). For a ``secret_rotation`` profile
    the access token is the current secret, which is what its API takes."""

    credential_id: str
    profile: str
    access_token: str = field(repr=False)
    token_type: str
    expires_at_ms: int
    scope: str
    version: int
    status: Status
    extra: Mapping[str, str] = field(default_factory=lambda: _EMPTY, repr=False, hash=False)

    @property
    def expires_at(self) -> dt.datetime:
        """The expiry as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.expires_at_ms / 1000, tz=dt.UTC)

    def expires_in(self, now: float | None = None) -> float:
        """Seconds of validity left (negative once expired), by this host's clock."""
        return self.expires_at_ms / 1000 - (time.time() if now is None else now)

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value, e.g. ``Bearer eyJ...``."""
        return f"{self.token_type or 'Bearer'} {self.access_token}"


@dataclass(frozen=True, slots=True)
class RecordView:
    """What ``token.lua`` returned: the token, plus what the waiting logic
    needs (failures, reason, due time, the request's outcome)."""

    token: AccessToken
    failures: int
    reason: str
    refreshed_at_ms: int
    due_ms: int | None
    action: str
    receivers: int

    def valid_for(self, seconds: float, now: float | None = None) -> bool:
        return self.token.expires_in(now) > seconds

    def still_valid(self) -> AccessToken | None:
        """The token while it has not expired (for ``TokenUnavailable.current``)."""
        return self.token if self.token.expires_in() > 0 else None


def parse_view(credential_id: str, reply: Sequence[Any], store: Store) -> RecordView:
    """``reply`` is token.lua's list (all text, as the script sends it);
    ``store`` decodes its secret fields."""
    (status, profile, version, access, token_type, expires_at, scope, extra, failures, reason,
     refreshed_at, due, action, receivers) = reply  # fmt: skip
    raw_extra = store.decode(credential_id, "extra", extra) if extra else ""
    kept = json.loads(raw_extra) if raw_extra else {}
    token = AccessToken(
        credential_id=credential_id,
        profile=profile,
        access_token=store.decode(credential_id, "access_token", access) if access else "",
        token_type=token_type,
        expires_at_ms=int(float(expires_at)),
        scope=scope,
        version=int(float(version)),
        status=Status(status),
        extra=MappingProxyType({str(k): str(v) for k, v in kept.items()})
        if isinstance(kept, dict) and kept
        else _EMPTY,
    )
    return RecordView(
        token=token,
        failures=int(float(failures)),
        reason=reason,
        refreshed_at_ms=int(float(refreshed_at)) if refreshed_at else 0,
        due_ms=int(float(due)) if due else None,
        action=action,
        receivers=int(receivers),
    )
