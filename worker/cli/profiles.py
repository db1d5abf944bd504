"""`refreshd profile create|list|get|update|delete`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from worker.app import open_store
from worker.cli.common import add_secret_options, emit, load_settings, read_secret, table
from worker.errors import ConfigError
from worker.profiles import ProfileStore

__all__ = ["register"]

# flag -> profile field, with the type argparse converts to
_KNOBS: list[tuple[str, str, Any, str]] = [
    ("--token-url", "token_url", str, "token endpoint (https://)"),
    ("--client-id", "client_id", str, "OAuth client id"),
    ("--auth-method", "auth_method", str,
     "client_secret_basic (default), client_secret_post or none"),
    ("--basic-form-encode", "basic_form_encode", str,
     "true (default): form-encode id and secret before base64 (RFC 6749 2.3.1)"),
    ("--body-format", "body_format", str, "form (default) or json"),
    ("--scope", "scope", str, "scope to request on refresh (must be within the grant)"),
    ("--rotation", "rotation", str,
     "never, always or maybe (default): does the provider rotate refresh tokens?"),
    ("--reuse-grace", "reuse_grace_s", float,
     "seconds the previous refresh token stays valid after rotation (default 0)"),
    ("--refresh-lead", "refresh_lead_s", float,
     "seconds before expiry to refresh (default: 20%% of lifetime, 60 s to 30 min)"),
    ("--default-lifetime", "default_lifetime_s", float,
     "lifetime when the answer has no expires_in and no JWT exp (default 3600)"),
    ("--timeout", "timeout_s", float, "HTTP timeout in seconds (default 10)"),
    ("--allow-http", "allow_http", str, "true to allow a plain http:// token URL (tests only)"),
    ("--name", "name", str, "display name"),
]  # fmt: skip


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("profile", help="manage provider profiles")
    psub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def knobs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--from-file", metavar="JSON", help="read fields from a JSON file")
        for flag, dest, kind, help_ in _KNOBS:
            p.add_argument(flag, dest=dest, type=kind, help=help_)
        p.add_argument(
            "--extra", action="append", default=[], metavar="NAME=VALUE",
            help="extra body parameter sent on every refresh (repeatable)",
        )  # fmt: skip
        add_secret_options(p, "client_secret")

    p = psub.add_parser("create", help="create a profile")
    p.add_argument("id")
    knobs(p)
    p.set_defaults(handler=_create)

    p = psub.add_parser("update", help="change fields of a profile (others are kept)")
    p.add_argument("id")
    knobs(p)
    p.set_defaults(handler=_update)

    p = psub.add_parser("list", help="list profiles (secrets never shown)")
    p.add_argument("--page", type=int, default=1)
    p.add_argument("--per-page", type=int, default=100)
    p.add_argument("--table", action="store_true")
    p.set_defaults(handler=_list)

    p = psub.add_parser("get", help="show one profile (secret never shown)")
    p.add_argument("id")
    p.set_defaults(handler=_get)

    p = psub.add_parser("delete", help="delete a profile")
    p.add_argument("id")
    p.add_argument("--force", action="store_true", help="also delete credentials using it")
    p.set_defaults(handler=_delete)


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if args.from_file:
        try:
            loaded = json.loads(Path(args.from_file).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read profile JSON from {args.from_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError("the profile JSON file must hold an object")
        data |= loaded
    for _, dest, _, _ in _KNOBS:
        value = getattr(args, dest)
        if value is not None:
            data[dest] = value
    if args.extra:
        extra = dict(data.get("extra_params") or {})
        for item in args.extra:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise ConfigError(f"--extra takes NAME=VALUE, got {item!r}")
            extra[name] = value
        data["extra_params"] = extra
    secret = read_secret(args, "client_secret")
    if secret is not None:
        data["client_secret"] = secret
    return data


async def _create(args: argparse.Namespace) -> int:
    settings = load_settings()
    data = _fields(args) | {"id": args.id}
    async with open_store(settings) as store:
        emit(await ProfileStore(store).create(data))
    return 0


async def _update(args: argparse.Namespace) -> int:
    settings = load_settings()
    async with open_store(settings) as store:
        emit(await ProfileStore(store).update(args.id, _fields(args)))
    return 0


async def _list(args: argparse.Namespace) -> int:
    settings = load_settings()
    async with open_store(settings) as store:
        rows = await ProfileStore(store).list(page=args.page, per_page=args.per_page)
    if args.table:
        table(rows, ["id", "token_url", "auth_method", "rotation", "credentials_count"])
    else:
        emit({"result": rows, "page": args.page, "per_page": args.per_page})
    return 0


async def _get(args: argparse.Namespace) -> int:
    settings = load_settings()
    async with open_store(settings) as store:
        emit(await ProfileStore(store).get(args.id))
    return 0


async def _delete(args: argparse.Namespace) -> int:
    settings = load_settings()
    async with open_store(settings) as store:
        removed = await ProfileStore(store).delete(args.id, force=args.force)
    emit({"deleted": args.id, "credentials_deleted": removed})
    return 0
