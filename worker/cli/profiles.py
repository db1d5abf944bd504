"""`refreshd profile create|list|get|update|delete`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from worker.app import open_store
from worker.cli.common import (
    add_secret_options,
    emit,
    flag_value,
    load_settings,
    read_secret,
    table,
)
from worker.cli.progress import Progress
from worker.errors import ConfigError
from worker.presets import PRESETS
from worker.profiles import ProfileStore
from worker.redisio import guard

__all__ = ["register"]

# flag -> profile field, with the type argparse converts to
_KNOBS: list[tuple[str, str, Any, str]] = [
    ("--preset", "preset", str,
     "start from a built-in preset (see `refreshd profile presets`); on update, apply it "
     "again: its knobs replace the stored ones, the other flags given win"),
    ("--strategy", "strategy", str,
     "oauth2_refresh_token (default), api_token_exchange, secret_rotation, client_credentials"),
    ("--token-url", "token_url", str,
     "token endpoint (https://); {name} placeholders are filled from credential params"),
    ("--method", "method", str, "POST (default), PUT or GET"),
    ("--client-id", "client_id", str, "OAuth client id"),
    ("--auth-method", "auth_method", str,
     "client_secret_basic (default), client_secret_post, none, bearer (Authorization: "
     "Bearer <client secret>, e.g. Workato's developer API token)"),
    ("--basic-form-encode", "basic_form_encode", flag_value,
     "form-encode id and secret before base64 (RFC 6749 2.3.1; default true)"),
    ("--client-id-in-body", "client_id_in_body", flag_value,
     "also send client_id in the body (SmartThings)"),
    ("--body-format", "body_format", str, "form (default), json or query"),
    ("--token-param", "token_param", str,
     "name of the parameter carrying the spent token (refresh_token, api_token)"),
    ("--redirect-uri", "redirect_uri", str, "send redirect_uri on refresh (most need none)"),
    ("--scope", "scope", str, "scope to request on refresh (must be within the grant)"),
    ("--accept", "accept", str, "Accept header (default application/json)"),
    ("--access-token-field", "access_token_field", str,
     "answer field (dotted path) of the access token / new secret"),
    ("--refresh-token-field", "refresh_token_field", str, "answer field of the refresh token"),
    ("--expires-in-field", "expires_in_field", str, "answer field of the lifetime in seconds"),
    ("--answer-root", "answer_root", str,
     "answer field (dotted path) holding the others, e.g. data (Workato v2)"),
    ("--expires-at-field", "expires_at_field", str,
     "answer field of an absolute expiry (epoch s or ms), used when expires_in is absent"),
    ("--refresh-expires-in-field", "refresh_expires_in_field", str,
     "answer field of the refresh token's lifetime (e.g. refresh_token_expires_in)"),
    ("--rotation", "rotation", str,
     "never, always or maybe (default): does the provider rotate refresh tokens?"),
    ("--reuse-grace", "reuse_grace_s", float,
     "seconds the previous refresh token stays valid after rotation (default 0)"),
    ("--refresh-lead", "refresh_lead_s", float,
     "seconds before expiry to refresh (default: 20%% of lifetime, 60 s to 30 min)"),
    ("--default-lifetime", "default_lifetime_s", float,
     "lifetime when the answer has no expiry and no JWT exp (default 3600)"),
    ("--timeout", "timeout_s", float, "HTTP timeout in seconds (default 10)"),
    ("--rate-limit", "rate_limit_per_s", float,
     "most requests per second, across all worker processes (0: no limit)"),
    ("--rate-limit-burst", "rate_limit_burst", int,
     "requests allowed at once after a quiet spell (default: one second's worth)"),
    ("--max-refresh-interval", "max_refresh_interval_s", float,
     "keep-alive: refresh at least every this many seconds (>= 60; 0: off)"),
    ("--give-up-after", "give_up_after_s", float,
     "seconds of retryable failures before needs_reauth/gave_up (default 4 days; 0: never)"),
    ("--max-concurrency", "max_concurrency", int,
     "most refreshes in flight per worker process (0: no limit)"),
    ("--allow-http", "allow_http", flag_value,
     "allow a plain http:// token URL (tests only; needs --allow-private-network)"),
    ("--allow-private-network", "allow_private_network", flag_value,
     "allow a token host on a loopback, private or link-local address"),
    ("--fresh-connection", "fresh_connection", flag_value,
     "a new connection for every refresh, closed after the answer (no keep-alive)"),
    ("--name", "name", str, "display name"),
]  # fmt: skip


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("profile", help="manage provider profiles")
    psub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def knobs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--from-file", metavar="JSON", help="read fields from a JSON file")
        for flag, dest, kind, help_ in _KNOBS:
            if kind is flag_value:  # a yes/no knob: the bare flag is true
                p.add_argument(flag, dest=dest, type=kind, nargs="?", const=True,
                               metavar="true|false", help=help_ + "; bare: true")  # fmt: skip
            else:
                p.add_argument(flag, dest=dest, type=kind, help=help_)
        p.add_argument(
            "--extra", action="append", default=[], metavar="NAME=VALUE",
            help="extra body parameter sent on every refresh (repeatable)",
        )  # fmt: skip
        p.add_argument(
            "--secret-param-env", action="append", default=[], metavar="NAME=VAR",
            help="secret body parameter (e.g. passcode) read from env variable VAR",
        )  # fmt: skip
        p.add_argument(
            "--secret-param-file", action="append", default=[], metavar="NAME=PATH",
            help="secret body parameter read from a file",
        )  # fmt: skip
        p.add_argument(
            "--drop-secret-param", action="append", default=[], metavar="NAME",
            help="remove a secret parameter (update)",
        )  # fmt: skip
        p.add_argument(
            "--keep-field", action="append", default=[], metavar="FIELD",
            help="answer field to keep with the credential (e.g. instance_url; repeatable)",
        )  # fmt: skip
        p.add_argument(
            "--error-rule", action="append", default=[], metavar="JSON",
            help='map an error answer to a class, e.g. \'{"status": 400, "contains": '
            '"AADSTS50196", "class": "throttled"}\' (repeatable)',
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

    p = psub.add_parser("presets", help="list the built-in presets and their knobs")
    p.add_argument("--table", action="store_true")
    p.set_defaults(handler=_presets)

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
            name, value = _pair("--extra", item)
            extra[name] = value
        data["extra_params"] = extra
    if args.keep_field:
        data["keep_fields"] = list(data.get("keep_fields") or []) + args.keep_field
    if args.error_rule:
        rules = list(data.get("error_rules") or [])
        for raw in args.error_rule:
            try:
                rules.append(json.loads(raw))
            except ValueError:
                raise ConfigError(f"--error-rule takes a JSON object, got {raw!r}") from None
        data["error_rules"] = rules
    secret_params = dict(data.get("secret_params") or {})
    for item in args.secret_param_env:
        name, var = _pair("--secret-param-env", item)
        if var not in os.environ:
            raise ConfigError(f"environment variable {var} (for {name}) is not set")
        secret_params[name] = os.environ[var]
    for item in args.secret_param_file:
        name, path = _pair("--secret-param-file", item)
        try:
            secret_params[name] = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {name} from {path}: {exc.strerror}") from None
    for name in args.drop_secret_param:
        secret_params[name] = None  # the store removes it
    if secret_params:
        data["secret_params"] = secret_params
    secret = read_secret(args, "client_secret")
    if secret is not None:
        data["client_secret"] = secret
    return data


def _pair(flag: str, item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise ConfigError(f"{flag} takes NAME=VALUE, got {item!r}")
    return name, value


async def _presets(args: argparse.Namespace) -> int:
    if args.table:
        rows = [
            {"preset": name, "strategy": knobs.get("strategy", "oauth2_refresh_token"),
             "token_url": knobs.get("token_url", "(you give it)"),
             "auth_method": knobs.get("auth_method", ""), "rotation": knobs.get("rotation", "")}
            for name, knobs in sorted(PRESETS.items())
        ]  # fmt: skip
        table(rows, ["preset", "strategy", "token_url", "auth_method", "rotation"])
    else:
        emit(PRESETS)
    return 0


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
    async with open_store(settings, refuse_unsafe=False) as store:
        rows = await ProfileStore(store).list(page=args.page, per_page=args.per_page)
        total: int = await guard(store.client.zcard(store.keys.profiles))
    more = args.page * args.per_page < total
    if args.table:
        table(rows, ["id", "strategy", "token_url", "auth_method", "rotation", "credentials_count"])
        print(f"page {args.page}: {len(rows)} of {total}" + ("; more on the next page" if more
              else ""), file=sys.stderr)  # fmt: skip
    else:
        emit({"result": rows, "page": args.page, "per_page": args.per_page, "total": total,
              "truncated": more})  # fmt: skip
    return 0


async def _get(args: argparse.Namespace) -> int:
    settings = load_settings()
    async with open_store(settings) as store:
        emit(await ProfileStore(store).get(args.id))
    return 0


async def _delete(args: argparse.Namespace) -> int:
    settings = load_settings()
    bar: Progress | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(f"deleting {args.id}'s credentials", total, unit="credentials")
        bar.advance(done)

    async with open_store(settings) as store:
        try:
            removed = await ProfileStore(store).delete(args.id, force=args.force, progress=progress)
        finally:
            if bar is not None:
                bar.close()
    emit({"deleted": args.id, "credentials_deleted": removed})
    return 0
