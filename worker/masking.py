"""What the printing commands hide: every field whose name looks secret.

Log redaction (``worker.logs``) knows the names refreshd itself uses. What
an operator's command prints also carries names chosen by providers and
users: kept extras (``keep_fields``: ``id_token``, ``idToken``,
``signing_key``, ``client_assertion``...), credential ``params``, a
profile's ``extra_params``. Those are judged by the words in the name, in
any case or separator style, and when in doubt hidden: a masked harmless
value costs a ``--reveal``, a printed secret cannot be taken back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from worker.logs import fingerprint

__all__ = ["HIDDEN", "looks_secret", "mask_event", "mask_fields"]

#: what ``credential get/list`` and ``profile get/list`` show instead of a secret
HIDDEN = "[hidden]"

# Words that make a name secret wherever they appear in it ("idtoken",
# "mfa_passcode", "private_key", "client_assertion", "x-api-key").
_SECRET_WORDS = re.compile(
    r"token|secret|passw|passwd|passcode|passphrase|pwd|key|assertion|credential|cookie"
    r"|authori[sz]ation|signature|session|jwt|otp|private"
)
# Whole names that are secret on their own (an authorization code, a PIN).
_SECRET_NAMES = frozenset({"code", "pin", "auth", "bearer", "sig"})
# Names that contain a word above but are never secret (top-level event and
# record fields refreshd defines itself; ``secrets`` is a sealed event's
# mode, ``encrypted`` or ``omitted``).
_PLAIN_NAMES = frozenset({"tokentype", "credentialid", "keyid", "kid", "secrets"})


# Endings that make a name metadata about a secret, not the secret
# (``refresh_token_expires_in``, ``issued_token_type``).
_PLAIN_ENDS = ("expiresin", "expiresat", "expiry", "expiration", "type", "ttl")


def looks_secret(name: str) -> bool:
    """Whether a field called ``name`` may hold a secret: case, ``-``, ``_``
    and ``.`` do not matter (``idToken``, ``ID-TOKEN`` and ``id_token`` are
    the same name)."""
    flat = re.sub(r"[^a-z0-9]", "", name.lower())
    if flat in _PLAIN_NAMES or flat.endswith(_PLAIN_ENDS):
        return False
    return flat in _SECRET_NAMES or _SECRET_WORDS.search(flat) is not None


def mask_fields(values: Mapping[str, Any], replacement: str = HIDDEN) -> dict[str, Any]:
    """A copy with every non-empty value under a secret-looking name replaced."""
    return {
        k: replacement if looks_secret(k) and v not in ("", None) else v for k, v in values.items()
    }


def mask_event(raw: str | Mapping[str, Any]) -> dict[str, Any]:
    """For display (``refreshd watch``, ``credential refresh``): the access
    token, each kept extra and any other field whose name looks secret
    become a short fingerprint (``[1a2b3c4d]``: two lines can still be
    compared) unless the operator asks to reveal them. A refresh token never
    reaches an event, but one would be masked all the same; an encrypted
    field is masked like a clear one."""

    def masked(value: Any) -> Any:
        if isinstance(value, str):
            return f"[{fingerprint(value)}]" if value else value
        if value is None or isinstance(value, bool | int | float):
            return value
        return f"[{fingerprint(json.dumps(value, sort_keys=True))}]"  # a nested secret

    body: dict[str, Any] = json.loads(raw) if isinstance(raw, str) else dict(raw)
    for name in list(body):
        if name != "extra" and looks_secret(name):
            body[name] = masked(body[name])
    extra = body.get("extra")
    if isinstance(extra, Mapping):
        body["extra"] = {
            k: masked(v) if looks_secret(k) else _deep(v, masked) for k, v in extra.items()
        }
    elif extra is not None:
        body["extra"] = masked(extra)  # not the shape refreshd writes: hide it whole
    return body


def _deep(value: Any, masked: Any) -> Any:
    """Kept extras are strings; a provider's nested object is masked inside too."""
    if isinstance(value, Mapping):
        return {k: masked(v) if looks_secret(k) else _deep(v, masked) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep(v, masked) for v in value]
    return value
