"""Honest credential listings: filtered over all credentials, then paged.

A listing used to take the first 1,000 ids SCAN returned and only then
filter, so ``--status needs_reauth`` could print nothing while ``status``
counted one. Here every partition is scanned, the filter runs server-side
(``filter.lua``, one call per batch of ids of one partition, so only the
matching ids come back), the matches are sorted by id (a stable order), and
only then is a page cut: after a cursor (the last id of the previous page),
at most ``limit`` rows, with the total and whether more follow.

Each call reads every credential key once: about 0.2 s per 20,000
credentials, fine for an operator's command, never for a hot path.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from redis.commands.core import AsyncScript

from worker.errors import ConfigError, NotFound
from worker.keys import Partition
from worker.models import Credential, Status
from worker.redisio import guard, load_script
from worker.store import Store

__all__ = ["MAX_PAGE", "CredentialFilter", "CredentialPage", "list_credentials", "matching_ids"]

#: the largest page one call returns
MAX_PAGE = 10_000
_BATCH = 500  # ids per filter call: one script call stays well under a millisecond per 100


@dataclass(frozen=True, slots=True)
class CredentialFilter:
    """Which credentials a listing covers (None: any)."""

    status: Status | None = None
    profile: str | None = None

    @property
    def any(self) -> bool:
        return self.status is None and self.profile is None


@dataclass(frozen=True, slots=True)
class CredentialPage:
    """One page of a listing. ``next_cursor`` is passed back as ``after`` for
    the next page; it is None on the last page."""

    rows: list[Credential] = field(repr=False)
    total: int  # matching credentials over all pages
    next_cursor: str | None

    @property
    def truncated(self) -> bool:
        """More credentials match than this page holds."""
        return self.next_cursor is not None


async def matching_ids(
    store: Store,
    where: CredentialFilter,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Every matching credential id, sorted. ``progress`` hears how many
    keys each scanned batch held."""
    script = load_script(store.client, "filter")
    found: list[str] = []
    for part in store.keys.all_partitions():
        batch: list[str] = []
        skip = len(part.base) + len("cred:")
        async for key in store.node_of(part).scan_iter(match=part.cred_pattern, count=1000):
            batch.append(key[skip:])
            if len(batch) >= _BATCH:
                found += await _keep(store, script, part, batch, where)
                if progress is not None:
                    progress(len(batch))
                batch = []
        if batch:
            found += await _keep(store, script, part, batch, where)
            if progress is not None:
                progress(len(batch))
    # SCAN may return a key twice (a rehash during the scan)
    return sorted(set(found))


async def _keep(
    store: Store, script: AsyncScript, part: Partition, ids: list[str], where: CredentialFilter
) -> list[str]:
    if where.any:
        return ids
    keys = [part.cred(cred_id) for cred_id in ids]
    status = where.status.value if where.status is not None else ""
    kept: list[str] = await guard(script(keys=keys, args=[status, where.profile or "", *ids]))
    return kept


async def list_credentials(
    store: Store,
    where: CredentialFilter,
    *,
    after: str | None = None,
    limit: int = 1000,
) -> CredentialPage:
    """The page of matching credentials after ``after`` (None: from the start)."""
    if not 1 <= limit <= MAX_PAGE:
        raise ConfigError(f"limit must be between 1 and {MAX_PAGE:,}")
    ids = await matching_ids(store, where)
    start = bisect.bisect_right(ids, after) if after is not None else 0
    page_ids = ids[start : start + limit]
    more = start + limit < len(ids)
    rows = await _read_rows(store, page_ids)
    return CredentialPage(
        rows=rows,
        total=len(ids),
        next_cursor=page_ids[-1] if more and page_ids else None,
    )


async def _read_rows(store: Store, ids: list[str]) -> list[Credential]:
    """The records, read 32 at a time; one deleted since the scan is left out."""
    found: dict[str, Credential] = {}

    async def one(cred_id: str) -> None:
        with contextlib.suppress(NotFound):
            found[cred_id] = await store.get(cred_id)

    for first in range(0, len(ids), 32):
        async with anyio.create_task_group() as tg:
            for cred_id in ids[first : first + 32]:
                tg.start_soon(one, cred_id)
    return [found[cred_id] for cred_id in ids if cred_id in found]
