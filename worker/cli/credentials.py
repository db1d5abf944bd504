"""`refreshd credential import|get|list|delete|refresh`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import anyio

from worker.app import build_refresher, open_store, schedule_from
from worker.cli.common import bounded, emit, load_settings, table
from worker.cli.progress import Progress
from worker.errors import ConfigError, Conflict, NotFound, RefreshdError
from worker.events import mask_event
from worker.eventsub import EventSubscription
from worker.listing import MAX_PAGE, CredentialFilter, list_credentials
from worker.metrics import Metrics
from worker.models import CredentialInput, Profile, Status
from worker.profiles import ProfileStore
from worker.redisio import guard
from worker.scheduling import Schedule
from worker.store import Store
from worker.transport import make_http_client

__all__ = ["MAX_LINE_BYTES", "bounded_lines", "import_lines", "register"]


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

    p = csub.add_parser(
        "list",
        help="list credentials, sorted by id, filtered over all of them, a page at a time "
        "(tokens never shown)",
    )
    p.add_argument("--limit", type=bounded(int, 1, MAX_PAGE), default=1000,
                   help=f"rows per page (1 to {MAX_PAGE:,}; default 1000)")  # fmt: skip
    p.add_argument(
        "--after", metavar="CURSOR", help="the previous page's next_cursor: the page after it"
    )
    p.add_argument("--status", choices=[s.value for s in Status], help="only this status")
    p.add_argument("--profile", metavar="ID", help="only this profile's credentials")
    p.add_argument("--table", action="store_true",
                   help="a table; the total and the next cursor go to stderr")  # fmt: skip
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


_BATCH = 256
#: longest import line: three 16 KiB secrets and their JSON fit many times
MAX_LINE_BYTES = 256 * 1024


def bounded_lines(stream: BinaryIO | TextIO) -> Iterator[str | bytes]:
    """The stream's lines, each cut to ``MAX_LINE_BYTES + 1``: an overlong
    line (a 5 GB token) is reported by number, never read whole."""
    while True:
        line: str | bytes = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not _ends_line(line):
            while (rest := stream.readline(MAX_LINE_BYTES)) and not _ends_line(rest):
                pass  # the rest of the overlong line
        yield line


def _ends_line(chunk: str | bytes) -> bool:
    return chunk.endswith(b"\n") if isinstance(chunk, bytes) else chunk.endswith("\n")


async def import_lines(
    store: Store,
    lines: Iterable[str | bytes],
    *,
    schedule: Schedule,
    replace: bool,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Import JSON lines; a bad line is reported by number (never by content,
    which holds tokens) and does not stop the others."""
    importer = _Importer(store, schedule, replace=replace)
    batch: dict[str, tuple[int, CredentialInput]] = {}
    for number, raw in enumerate(lines, start=1):
        if progress is not None:
            progress.advance()
        cred = importer.parse(number, raw)
        if cred is None:
            continue
        if cred.id in batch:
            # a repeated id waits for the next batch, so the later line wins
            await importer.apply(list(batch.values()))
            batch.clear()
        batch[cred.id] = (number, cred)
        if len(batch) >= _BATCH:  # bounded batches keep memory flat
            await importer.apply(list(batch.values()))
            batch.clear()
    await importer.apply(list(batch.values()))
    if progress is not None:
        progress.close()
    await guard(store.client.publish(store.keys.wake, "import"))
    return importer.summary()


class _Importer:
    def __init__(self, store: Store, schedule: Schedule, *, replace: bool) -> None:
        self.store = store
        self.profiles = ProfileStore(store)
        self.schedule = schedule
        self.replace = replace
        self.errors: list[dict[str, Any]] = []
        self.created = 0
        self.replaced = 0
        self.lines = 0

    def fail(self, number: int, message: str) -> None:
        self.errors.append({"line": number, "error": message})

    def parse(self, number: int, raw: str | bytes) -> CredentialInput | None:
        if len(raw) > MAX_LINE_BYTES:
            self.lines += 1
            self.fail(number, f"line is longer than {MAX_LINE_BYTES:,} bytes")
            return None
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                self.lines += 1
                self.fail(number, "not valid UTF-8")
                return None
        line = raw.lstrip("\ufeff").strip()  # a byte-order mark is not content
        if not line:
            return None
        self.lines += 1
        try:
            data = json.loads(line)
        except ValueError:
            self.fail(number, "not valid JSON")
            return None
        except RecursionError:  # 100,000 nested arrays: a line, not the import, fails
            self.fail(number, "JSON nested too deeply")
            return None
        try:
            return CredentialInput.from_json(data, now_ms=int(time.time() * 1000))
        except RefreshdError as exc:
            self.fail(number, str(exc))
            return None

    async def apply(self, batch: list[tuple[int, CredentialInput]]) -> None:
        if not batch:
            return
        known: dict[str, Profile | None] = {}
        for name in {cred.profile for _, cred in batch}:
            try:
                known[name] = await self.profiles.load(name)
            except NotFound:
                known[name] = None
        written: list[tuple[int, CredentialInput, bool]] = []

        async def one(number: int, cred: CredentialInput) -> None:
            try:
                profile = known[cred.profile]
                if profile is None:
                    raise ConfigError(f"unknown profile {cred.profile!r}")
                cred.check_against(profile)
                due = self.schedule.next_due_ms(
                    now_ms=int(time.time() * 1000),
                    expires_at_ms=cred.expires_at_ms,
                    profile_lead_s=profile.refresh_lead_s,
                )
                new = await self.store.upsert(cred, due_ms=due, replace=self.replace)
                if new:
                    self.created += 1
                else:
                    self.replaced += 1
                written.append((number, cred, new))
            except RefreshdError as exc:
                self.fail(number, str(exc))

        async with anyio.create_task_group() as tg:
            for number, cred in batch:
                tg.start_soon(one, number, cred)
        await self._undo_orphans(written)

    async def _undo_orphans(self, written: list[tuple[int, CredentialInput, bool]]) -> None:
        """A profile deleted while this batch was written would leave its
        credentials behind: take them out again and report their lines."""
        gone = {
            name
            for name in {cred.profile for _, cred, _ in written}
            if not await self.profiles.exists(name)
        }
        for number, cred, new in written:
            if cred.profile in gone:
                with contextlib.suppress(NotFound):
                    await self.store.delete(cred.id, force=True)
                if new:
                    self.created -= 1
                else:
                    self.replaced -= 1
                self.fail(number, f"unknown profile {cred.profile!r} (deleted during the import)")

    def summary(self) -> dict[str, Any]:
        self.errors.sort(key=lambda e: e["line"])
        return {
            "lines": self.lines,
            "created": self.created,
            "replaced": self.replaced,
            "failed": len(self.errors),
            "errors": self.errors[:1000],
        }


async def _import(args: argparse.Namespace) -> int:
    settings = load_settings()
    stream: BinaryIO | TextIO
    if args.file == "-":
        stream = getattr(sys.stdin, "buffer", sys.stdin)
    else:
        try:
            # a CLI reading a local file: buffered reads cost microseconds, the
            # loop has nothing else to serve meanwhile; bytes, so that one line
            # of bad UTF-8 is reported by number instead of ending the import
            stream = Path(args.file).open("rb")  # noqa: SIM115, ASYNC230
        except OSError as exc:
            raise ConfigError(f"cannot open {args.file}: {exc.strerror}") from None
    total = None if args.file == "-" else _count_lines(stream)
    try:
        async with open_store(settings) as store:
            summary = await import_lines(
                store, bounded_lines(stream), schedule=schedule_from(settings),
                replace=args.replace,
                progress=Progress("importing", total, unit="lines"),
            )  # fmt: skip
    finally:
        if args.file != "-":
            stream.close()
    emit(summary)
    return 1 if summary["failed"] else 0


def _count_lines(stream: BinaryIO | TextIO) -> int | None:
    """The file's line count, for a progress total (a 1 GB file takes about
    a second); None where the stream cannot be rewound."""
    try:
        start = stream.tell()
        count, last = 0, b""
        while chunk := stream.read(1 << 20):
            data = chunk.encode() if isinstance(chunk, str) else chunk
            count += data.count(b"\n")
            last = data[-1:]
        stream.seek(start)
    except (OSError, ValueError):
        return None
    return count + (1 if last and last != b"\n" else 0)


async def _get(args: argparse.Namespace) -> int:
    settings = load_settings()
    async with open_store(settings) as store:
        emit((await store.get(args.id)).public(reveal=args.reveal))
    return 0


async def _list(args: argparse.Namespace) -> int:
    settings = load_settings()
    where = CredentialFilter(
        status=Status(args.status) if args.status else None, profile=args.profile
    )
    async with open_store(settings, refuse_unsafe=False) as store:
        page = await list_credentials(store, where, after=args.after, limit=args.limit)
    rows = [cred.public() for cred in page.rows]
    if args.table:
        table(rows, ["id", "profile", "status", "version", "expires_at_ms", "failures"])
        more = f"; next page: --after {page.next_cursor}" if page.truncated else ""
        print(f"{len(rows)} of {page.total}{more}", file=sys.stderr)
    else:
        emit({"result": rows, "total": page.total, "truncated": page.truncated,
              "next_cursor": page.next_cursor})  # fmt: skip
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
            raise Conflict(
                f"credential {args.id} is {cred.status.value}; fix the cause, then "
                f"`refreshd credential resume {args.id}` (or re-import it)"
            )
        part = store.keys.partition_of(args.id)
        async with EventSubscription(store.client, store.keys, [part]) as events:
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
                    data = await events.get(1)
                    if data is None:
                        continue
                    event = mask_event(data)
                    if event.get("credential_id") == args.id:
                        emit({"credential_id": args.id, "outcome": "in_flight_elsewhere",
                              "event": event})  # fmt: skip
                        return 0 if event["type"] == "token.refreshed" else 1
    raise RefreshdError(f"a refresh of {args.id} is in flight elsewhere; no outcome within "
                        f"{args.wait:g}s")  # fmt: skip
