"""`refreshd credential import|get|list|delete|refresh`."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

from worker.app import build_refresher, open_store, schedule_from
from worker.cli.common import emit, load_settings, table
from worker.errors import ConfigError, NotFound, RefreshdError
from worker.events import mask_event
from worker.metrics import Metrics
from worker.models import CredentialInput, Profile, Status
from worker.profiles import ProfileStore
from worker.redisio import guard
from worker.scheduling import Schedule
from worker.store import Store
from worker.transport import make_http_client

__all__ = ["import_lines", "register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("credential", help="manage credentials")
    csub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = csub.add_parser("import", help="import credentials from a JSON Lines file ('-': stdin)")
    p.add_argument("file", help='one object per line: {"id", "profile", "access_token", '
                   '"refresh_token", "expires_in" | "expires_at", "scope"?}')  # fmt: skip
    p.add_argument("--replace", action="store_true", help="overwrite existing credentials")
    p.set_defaults(handler=_import)

    p = csub.add_parser("get", help="show one credential (tokens hidden unless --reveal)")
    p.add_argument("id")
    p.add_argument("--reveal", action="store_true", help="print the tokens too")
    p.set_defaults(handler=_get)

    p = csub.add_parser("list", help="list credentials (tokens never shown)")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--status", choices=[s.value for s in Status], help="only this status")
    p.add_argument("--table", action="store_true")
    p.set_defaults(handler=_list)

    p = csub.add_parser("delete", help="delete a credential")
    p.add_argument("id")
    p.add_argument("--force", action="store_true", help="even while a refresh is in flight")
    p.set_defaults(handler=_delete)

    p = csub.add_parser(
        "resume",
        help="put a needs_reauth or quarantined credential back in service (due now); "
        "for quarantined ones only once you know its refresh token was not used",
    )
    p.add_argument("id")
    p.set_defaults(handler=_resume)

    p = csub.add_parser(
        "refresh", help="refresh now, through the same lock (waits if one is in flight)"
    )
    p.add_argument("id")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for an outcome")
    p.set_defaults(handler=_refresh)


async def import_lines(
    store: Store, lines: Any, *, schedule: Schedule, replace: bool, progress: bool = False
) -> dict[str, Any]:
    """Import JSON lines; a bad line is reported by number (never by content,
    which holds tokens) and does not stop the others."""
    profiles = ProfileStore(store)
    known: dict[str, Profile | None] = {}
    errors: list[dict[str, Any]] = []
    created = replaced = 0

    async def one(number: int, line: str) -> None:
        nonlocal created, replaced
        try:
            data = json.loads(line)
        except ValueError:
            errors.append({"line": number, "error": "not valid JSON"})
            return
        try:
            cred = CredentialInput.from_json(data, now_ms=int(time.time() * 1000))
            if cred.profile not in known:
                try:
                    known[cred.profile] = await profiles.load(cred.profile)
                except NotFound:
                    known[cred.profile] = None
            profile = known[cred.profile]
            if profile is None:
                raise ConfigError(f"unknown profile {cred.profile!r}")
            cred.check_against(profile)
            due = schedule.next_due_ms(
                now_ms=int(time.time() * 1000),
                expires_at_ms=cred.expires_at_ms,
                profile_lead_s=profile.refresh_lead_s,
            )
            if await store.upsert(cred, due_ms=due, replace=replace):
                created += 1
            else:
                replaced += 1
        except RefreshdError as exc:
            errors.append({"line": number, "error": str(exc)})

    total = 0
    chunk: list[tuple[int, str]] = []

    async def flush() -> None:
        # bounded batches keep memory flat on files of millions of lines
        async with anyio.create_task_group() as tg:
            for number, line in chunk:
                tg.start_soon(one, number, line)
        chunk.clear()
        if progress:
            print(f"\rimported {created + replaced} of {total} lines", end="", file=sys.stderr)

    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if line:
            total += 1
            chunk.append((number, line))
            if len(chunk) >= 256:
                await flush()
    await flush()
    if progress:
        print(file=sys.stderr)
    await guard(store.client.publish(store.keys.wake, "import"))
    errors.sort(key=lambda e: e["line"])
    return {
        "lines": total,
        "created": created,
        "replaced": replaced,
        "failed": len(errors),
        "errors": errors[:1000],
    }


async def _import(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.file == "-":
        stream = sys.stdin
    else:
        try:
            # a CLI reading a local file: buffered reads cost microseconds, the
            # loop has nothing else to serve meanwhile
            stream = Path(args.file).open(encoding="utf-8")  # noqa: SIM115, ASYNC230
        except OSError as exc:
            raise ConfigError(f"cannot open {args.file}: {exc.strerror}") from None
    try:
        async with open_store(settings) as store:
            summary = await import_lines(
                store, stream, schedule=schedule_from(settings), replace=args.replace,
                progress=sys.stderr.isatty(),
            )  # fmt: skip
    finally:
        if stream is not sys.stdin:
            stream.close()
    emit(summary)
    return 1 if summary["failed"] else 0


async def _get(args: argparse.Namespace) -> int:
    settings = load_settings()
    async with open_store(settings) as store:
        emit((await store.get(args.id)).public(reveal=args.reveal))
    return 0


async def _list(args: argparse.Namespace) -> int:
    settings = load_settings()
    async with open_store(settings) as store:
        rows = [(await store.get(i)).public() for i in await store.list_ids(limit=args.limit)]
    if args.status:
        rows = [row for row in rows if row["status"] == args.status]
    if args.table:
        table(rows, ["id", "profile", "status", "version", "expires_at_ms", "failures"])
    else:
        emit({"result": rows})
    return 0


async def _delete(args: argparse.Namespace) -> int:
    settings = load_settings()
    async with open_store(settings) as store:
        await store.delete(args.id, force=args.force)
    emit({"deleted": args.id})
    return 0


async def _resume(args: argparse.Namespace) -> int:
    settings = load_settings()
    async with open_store(settings) as store:
        previous = await store.resume(args.id)
    emit({"resumed": args.id, "previous_status": previous})
    return 0


async def _refresh(args: argparse.Namespace) -> int:
    """Claim this one credential and refresh it here; if another process
    holds it, wait for that refresh's event instead of starting another."""
    settings = load_settings()
    async with open_store(settings) as store, make_http_client(max_connections=4) as http:
        cred = await store.get(args.id)
        if cred.status is not Status.ACTIVE:
            raise ConfigError(f"credential {args.id} is {cred.status.value}; re-import it first")
        async with store.client.pubsub() as pubsub:
            await pubsub.subscribe(store.keys.events)
            part = store.keys.partition_of(args.id)
            token = f"cli:{uuid.uuid4().hex}"
            _, _, claimed = await store.claim(
                part, limit=1, lease_ms=int(settings.lease_s * 1000), token=token, ids=[args.id]
            )
            if claimed:
                refresher = build_refresher(settings, store, http, Metrics())
                outcome = await refresher.refresh(claimed[0])
                emit({"credential_id": args.id, "outcome": outcome,
                      "credential": (await store.get(args.id)).public()})  # fmt: skip
                return 0 if outcome == "refreshed" else 1
            with anyio.move_on_after(args.wait):
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is None:
                        continue
                    event = mask_event(message["data"])
                    if event.get("credential_id") == args.id:
                        emit({"credential_id": args.id, "outcome": "in_flight_elsewhere",
                              "event": event})  # fmt: skip
                        return 0 if event["type"] == "token.refreshed" else 1
    raise RefreshdError(f"a refresh of {args.id} is in flight elsewhere; no outcome within "
                        f"{args.wait:g}s")  # fmt: skip
