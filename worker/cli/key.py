"""`refreshd key generate|status|rotate`: the key ring's keys and the records under them."""

from __future__ import annotations

import argparse
import secrets
import sys
import time

from worker.app import open_store
from worker.cli.common import bounded, emit, fail, load_settings
from worker.cli.progress import Progress
from worker.errors import ConfigError
from worker.keyops import key_status, record_count, rotate
from worker.keyring import KEY_BYTES, KeyRing, generate_key

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "key",
        help="encryption keys: `generate` prints a new kid:base64key line for the key ring "
        "(the only command that prints key material), `status` counts the records under each "
        "key id, `rotate` re-encrypts every record under the primary key, online",
    )
    ksub = p.add_subparsers(dest="key_command", required=True, metavar="{generate,status,rotate}")

    g = ksub.add_parser("generate", help="print a new key ring line: kid:base64key (AES-256)")
    g.add_argument(
        "--kid",
        help="the key id (1-16 letters, digits, '_' or '-'); default: k<UTC date>-<4 hex>, "
        "so ids sort by age and two keys made the same day differ",
    )
    g.set_defaults(handler=_generate)

    s = ksub.add_parser(
        "status",
        help="how many credential and profile records have a secret under each key id (or "
        "'plain'), how many a rotation would rewrite, key ids missing from the ring",
    )
    s.set_defaults(handler=_status)

    r = ksub.add_parser(
        "rotate",
        help="re-encrypt every credential and profile not entirely under the primary key "
        "(plain ones too), while workers run; resumable: run it again after an interruption",
    )
    r.add_argument(
        "--busy-wait",
        type=bounded(float, 0, 3600),
        default=30.0,
        metavar="SECONDS",
        help="how long to keep retrying credentials that are being refreshed (default 30)",
    )
    r.add_argument(
        "--compact",
        action="store_true",
        help="first let credential records hold encrypted secrets as bytes, a quarter "
        "smaller, which the previous release cannot read: only once every worker and "
        "application runs this release (a database this release created already does)",
    )
    r.set_defaults(handler=_rotate)


async def _generate(args: argparse.Namespace) -> int:
    """No settings, no Redis: it runs where the Secret is made. The line
    goes to stdout only (redirect it into the Secret's file); nothing is
    logged."""
    kid = args.kid or time.strftime("k%Y%m%d-", time.gmtime()) + secrets.token_hex(2)
    try:
        KeyRing([(kid, bytes(KEY_BYTES))])  # the worker's own rules for a key id
    except ValueError as exc:
        raise ConfigError(f"--kid {kid[:40]!r}: {exc}") from None
    line = f"{kid}:{generate_key()}"
    sys.stdout.write(line + "\n")
    if sys.stdout.isatty():
        print(
            "refreshd: put this line first in the key ring to make it the primary key; keep "
            "the old keys below it until `refreshd key rotate` has finished",
            file=sys.stderr,
        )
    return 0


async def _status(args: argparse.Namespace) -> int:
    settings = load_settings()
    async with open_store(settings, refuse_unsafe=False) as store:
        status = await key_status(store)
    emit(status.to_json())
    for kid in status.unknown_keys:
        creds = status.credentials.by_key.get(kid, 0)
        profiles = status.profiles.by_key.get(kid, 0)
        print(
            f"refreshd: {creds} credential(s) and {profiles} profile(s) are encrypted under key "
            f"id {kid!r}, which is not in the key ring: they cannot be read until it is added back",
            file=sys.stderr,
        )
    return 0


async def _rotate(args: argparse.Namespace) -> int:
    settings = load_settings()
    if not settings.encrypted:
        raise ConfigError(
            "key rotate encrypts under the key ring's primary key, and no ring is set "
            "(REFRESHD_ENCRYPTION_KEYS or REFRESHD_ENCRYPTION_KEYS_FILE)"
        )
    async with open_store(settings) as store:
        if args.compact:
            await store.allow_secrets_as_bytes()
        progress = Progress("re-encrypting", await record_count(store), unit="records")
        try:
            result = await rotate(store, progress=progress.advance, busy_wait_s=args.busy_wait)
        finally:
            progress.close()
    emit(result.to_json())
    if result.unreadable:
        reasons = ", ".join(f"{n} {what}" for what, n in sorted(result.unreadable.items()))
        return fail(
            f"not rotated, cannot be read with this key ring: {reasons}; add the missing key "
            "back to the ring (after the primary) and run `refreshd key rotate` again"
        )
    if result.busy:
        return fail(
            f"{len(result.busy)} credential(s) were being refreshed throughout "
            f"(--busy-wait {args.busy_wait:g}s); run `refreshd key rotate` again"
        )
    return 0
