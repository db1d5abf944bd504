"""Credentials in Redis: registration, the claim/spend/commit cycle, counts.

Fields of a credential record (``{prefix N}:cred:<id>``)::

    profile, access_token*, refresh_token*, token_type, scope, expires_at (ms),
    params, extra*, refresh_expires_at,
    granted_scope   the grant's original scope, set at import and kept by
                    refreshes (``scope`` is the latest answer's); the most
                    a refresh may ask for
    version (+1 per commit of new tokens), status, failures, last_error,
    last_error_at (both cleared by a success), reason, created_at, updated_at, refreshed_at,
    failing_since   when the current streak of failures began (give-up)
    intent, intent_rt, intent_deadline, intent_at   (open spend intent)
    ambiguous_token, ambiguous_at                   (unanswered request)
    spent_rt        fingerprints of the last two refresh tokens a rotation
                    replaced (an import may not write them back)

The record is one packed value, not a hash (``worker/scripts/record.lua``
says why and how); only the Lua scripts read or write it, so this list is
the whole contract. Fields marked * pass through the secret codec. All
writes that must agree with each other happen inside one Lua script.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from worker.batcher import ScriptBatcher, execute_scripts
from worker.cluster import router_of
from worker.clusterbatch import ClusterBatcher, Read, run_by_node
from worker.codec import SecretCodec, SecretContext
from worker.errors import Conflict, NotFound, SecretUnreadable, StoreUnavailable
from worker.eventlog import Retention
from worker.keys import Keyspace, Partition
from worker.logs import fingerprint, get_logger
from worker.models import Claimed, Credential, CredentialInput, Status
from worker.redisio import Scripts, guard, load_scripts
from worker.redisio import run_script as run_one_script

__all__ = ["RECORD_FORMAT", "SECRET_FIELDS", "CommitResult", "Durability", "SpendResult", "Store"]

log = get_logger("refreshd.store")

#: the credential record format (``worker/scripts/record.lua``), kept in the layout hash
RECORD_FORMAT = "packed-1"

#: credential record fields that pass through the secret codec
SECRET_FIELDS = frozenset({"access_token", "refresh_token", "extra"})


def _json_map(raw: str) -> dict[str, str]:
    if not raw:
        return {}
    value = json.loads(raw)
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


Outcome = Literal["refreshed", "retry", "needs_reauth", "quarantined", "release"]


@dataclass(frozen=True, slots=True)
class Durability:
    """What a commit waits for before it counts (see ``Store.commit``)."""

    fsync: bool = False
    replicas: int = 0
    timeout_ms: int = 2000


@dataclass(frozen=True, slots=True)
class SpendResult:
    ok: bool
    reason: str = ""
    server_now_ms: int = 0
    deadline_ms: int = 0


@dataclass(frozen=True, slots=True)
class CommitResult:
    ok: bool
    reason: str = ""
    lease_lost: bool = False
    durable: bool = True
    server_now_ms: int = 0


class Store:
    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keyspace,
        codec: SecretCodec,
        durability: Durability | None = None,
        retention: Retention | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        #: its own codec: which forms it may write is this database's word
        #: (``check_layout``), which another store sharing the codec (a
        #: client library given one codec for two databases) may not share
        self.codec = codec.clone()
        self.durability = durability or Durability()
        self.retention = retention or Retention()
        self._log_args = self.retention.commit_args(keys.partitions)
        self.scripts: Scripts = load_scripts(client)
        self.batcher: ScriptBatcher | ClusterBatcher | None = None  # set by a running worker
        #: a cluster's per-node routing (None on one server, Sentinel)
        self.router = router_of(client)
        #: on a cluster under REFRESHD_DURABILITY=auto, what each primary's
        #: batches wait for (``host:port`` -> its own replicas and AOF: a
        #: failover leaves one shard without a replica, not all of them)
        self.node_durability: dict[str, Durability] = {}
        #: records may hold encrypted secrets as bytes (the layout says so:
        #: ``check_layout``); until then the text form, which every release reads
        self.secrets_as_bytes = False

    # ------------------------------------------------------------ secrets

    def secret_context(self, credential_id: str, field: str) -> SecretContext:
        """Where a credential's secret field lives (the codec binds it)."""
        return SecretContext(self.keys.prefix, "credential", credential_id, field)

    def encode(self, credential_id: str, field: str, plaintext: str) -> str | bytes:
        """A credential's secret field as a script writes it into the record
        (``SECRET_FIELDS``): encrypted, the codec's record form as bytes, or
        its text form while the layout says older processes may read it."""
        # secret_context's tuple, built here: three calls a refresh (read at
        # claim, two writes at commit) need no extra frame each
        ctx = SecretContext(self.keys.prefix, "credential", credential_id, field)
        if self.secrets_as_bytes:
            return self.codec.encode_record(plaintext, ctx)
        return self.codec.encode(plaintext, ctx)

    def decode(self, credential_id: str, field: str, stored: str) -> str:
        """The plaintext of a stored secret field; raises
        ``SecretUnreadable`` when it does not decrypt with this ring."""
        ctx = SecretContext(self.keys.prefix, "credential", credential_id, field)  # as in encode
        return self.codec.decode(stored, ctx)

    # ------------------------------------------------------------ layout

    def _compact_secrets(self, allowed: bool) -> None:
        """The layout's word on the forms only this release reads: the
        record form here, the codec's compact payload in every value."""
        self.secrets_as_bytes = allowed
        self.codec.allow_compact_forms(allowed)

    async def allow_secrets_as_bytes(self) -> None:
        """From now on, records may hold encrypted secrets in the record form
        (raw bytes, ``worker.codec``), which the previous release cannot
        read: ``refreshd key rotate --compact`` calls it once every process
        runs this release. A database created by this release starts so."""
        await guard(self.client.hset(self.keys.layout, "secrets", "bytes"))
        self._compact_secrets(True)

    async def check_layout(self) -> None:
        """Record the partition count and the record format on first use;
        refuse different ones later, since credentials would be looked up in
        the wrong partition or read in the wrong format. Also learn whether
        records may hold encrypted secrets as bytes (``secrets_as_bytes``)."""
        key = self.keys.layout
        if await guard(self.client.hsetnx(key, "partitions", self.keys.partitions)):
            # a new database: no older process reads it, secrets may be bytes
            await guard(
                self.client.hset(key, mapping={"record": RECORD_FORMAT, "secrets": "bytes"})
            )
        stored, record, secrets = await guard(
            self.client.hmget(key, ["partitions", "record", "secrets"])
        )
        self._compact_secrets(secrets == "bytes")
        if stored is not None and int(stored) != self.keys.partitions:
            raise Conflict(
                f"this Redis holds data written with {stored} partitions; "
                f"set REFRESHD_PARTITIONS={stored}"
            )
        if record != RECORD_FORMAT:
            raise Conflict(
                f"this Redis holds credentials in another record format ({record or 'hash'}, "
                f"written by an earlier refreshd) than this one reads ({RECORD_FORMAT}); "
                "start on an empty REFRESHD_PREFIX and import the credentials again"
            )

    # ------------------------------------------------------- credentials

    async def upsert(self, cred: CredentialInput, *, due_ms: int, replace: bool) -> bool:
        """Register ``cred``; returns True when it was new."""
        part = self.keys.partition_of(cred.id)
        fields: list[str | bytes | int] = [
            "access_token", self.encode(cred.id, "access_token", cred.access_token),
            "refresh_token", self.encode(cred.id, "refresh_token", cred.refresh_token),
            "token_type", cred.token_type,
            "scope", cred.scope,
            "granted_scope", cred.scope,
            "expires_at", cred.expires_at_ms,
            "params", json.dumps(dict(cred.params), sort_keys=True) if cred.params else "",
        ]  # fmt: skip
        res = await self.run_script(
            self.scripts.upsert,
            keys=[part.cred(cred.id), part.due, part.stats],
            args=[
                cred.id,
                "replace" if replace else "create",
                due_ms,
                cred.profile,
                fingerprint(cred.refresh_token) if cred.refresh_token else "",
                *fields,
            ],
        )
        if res[0] == "spent":
            raise Conflict(
                f"credential {cred.id}: this refresh_token was already spent (a refresh "
                "replaced it); import the credential's current tokens or re-authorize"
            )
        if res[0] == "exists":
            raise Conflict(
                f"credential {cred.id} already exists (import with --replace to overwrite)"
            )
        if res[0] == "busy":
            raise Conflict(f"credential {cred.id} is being refreshed right now; try again")
        return bool(res[1])

    async def get(self, credential_id: str, *, secrets: bool = True) -> Credential:
        """The credential, its secrets decoded (``SecretUnreadable`` when
        one does not decrypt). ``secrets=False`` is for callers that only
        show ``public()`` (listings, status checks): the token fields keep
        their stored form, unread, and kept extras that do not decrypt are
        left out, so one damaged record cannot break a listing."""
        raw, due, locked = await self._read(credential_id)
        if not raw:
            raise NotFound(f"no credential {credential_id!r}")
        return self._credential(credential_id, raw, due, locked, secrets=secrets)

    async def raw_fields(self, credential_id: str) -> dict[str, str]:
        """The stored record, field by field, as written (secrets encoded):
        for tools and tests that check what is at rest. {} when missing."""
        return (await self._read(credential_id))[0]

    async def many_raw_fields(self, ids: Sequence[str]) -> list[dict[str, str]]:
        """``raw_fields`` of several credentials in one round trip (tools,
        tests and the benchmark read thousands while workers race)."""
        calls = []
        for credential_id in ids:
            part = self.keys.partition_of(credential_id)
            keys = [part.cred(credential_id), part.due, part.lock(credential_id)]
            calls.append((self.scripts.get, keys, [credential_id]))
        out: list[dict[str, str]] = []
        for reply in await execute_scripts(self.client, Durability(), calls):
            if isinstance(reply, Exception):
                raise reply
            res = reply[0]
            flat = res[0] if res else []
            out.append(dict(zip(flat[0::2], flat[1::2], strict=True)))
        return out

    async def _read(self, credential_id: str) -> tuple[dict[str, str], float | None, bool]:
        part = self.keys.partition_of(credential_id)
        res = await self.run_script(
            self.scripts.get,
            keys=[part.cred(credential_id), part.due, part.lock(credential_id)],
            args=[credential_id],
        )
        if not res:
            return {}, None, False
        flat, due, locked = res
        fields = dict(zip(flat[0::2], flat[1::2], strict=True))
        return fields, None if due is None else float(due), bool(locked)

    def _credential(
        self,
        credential_id: str,
        raw: Mapping[str, str],
        due: float | None,
        locked: bool,
        *,
        secrets: bool = True,
    ) -> Credential:
        def num(name: str) -> int:
            return int(float(raw.get(name) or 0))

        def secret(name: str) -> str:
            return (
                self.decode(credential_id, name, raw.get(name, ""))
                if secrets
                else raw.get(name, "")
            )

        try:
            extra = _json_map(self.decode(credential_id, "extra", raw.get("extra", "")))
        except SecretUnreadable:
            if secrets:
                raise
            extra = {}

        return Credential(
            id=credential_id,
            profile=raw.get("profile", ""),
            status=Status(raw.get("status", "active")),
            version=num("version"),
            access_token=secret("access_token"),
            refresh_token=secret("refresh_token"),
            token_type=raw.get("token_type", ""),
            scope=raw.get("scope", ""),
            expires_at_ms=num("expires_at"),
            failures=num("failures"),
            last_error=raw.get("last_error", ""),
            due_at_ms=None if due is None else int(due),
            created_at_ms=num("created_at"),
            updated_at_ms=num("updated_at"),
            refreshed_at_ms=num("refreshed_at") or None,
            in_flight=locked or bool(raw.get("intent")),
            last_error_at_ms=num("last_error_at") or None,
            refresh_expires_at_ms=num("refresh_expires_at") or None,
            params=_json_map(raw.get("params", "")),
            extra=extra,
            granted_scope=raw.get("granted_scope", ""),
        )

    async def delete(self, credential_id: str, *, force: bool = False) -> None:
        part = self.keys.partition_of(credential_id)
        res = await self.run_script(
            self.scripts.delete,
            keys=[part.cred(credential_id), part.lock(credential_id), part.due, part.stats],
            args=[credential_id, "1" if force else "0"],
        )
        if res[0] == "missing":
            raise NotFound(f"no credential {credential_id!r}")
        if res[0] == "busy":
            raise Conflict(f"credential {credential_id} is being refreshed; retry or use --force")

    async def resume(self, credential_id: str) -> str:
        """Operator action: back to active and due now; returns the old status."""
        part = self.keys.partition_of(credential_id)
        res = await self.run_script(
            self.scripts.resume,
            keys=[part.cred(credential_id), part.due, part.stats],
            args=[credential_id],
        )
        if res[0] == "missing":
            raise NotFound(f"no credential {credential_id!r}")
        if res[0] == "active":
            raise Conflict(f"credential {credential_id} is already active")
        if res[0] == "busy":
            raise Conflict(f"credential {credential_id} is being refreshed; try again")
        await guard(self.client.publish(self.keys.wake, credential_id))
        return str(res[1])

    async def list_ids(self, *, limit: int = 1000) -> list[str]:
        """Operator listing (SCAN per partition): fine for a CLI, never on a hot path."""
        ids: list[str] = []
        for part in self.keys.all_partitions():
            skip = len(part.base) + len("cred:")
            async for key in self.node_of(part).scan_iter(match=part.cred_pattern, count=1000):
                if len(ids) >= limit:
                    return sorted(ids)
                ids.append(key[skip:])
        return sorted(ids)

    def partitions_by_node(self) -> dict[str, int] | None:
        """On a cluster, how many partitions each primary holds now (a
        partition is one slot: CRC16 of its hash tag decides); None elsewhere."""
        if self.router is None:
            return None
        spread = dict.fromkeys(self.router.primaries(), 0)
        for part in self.keys.all_partitions():
            address = self.router.address_of(part.due)
            spread[address] = spread.get(address, 0) + 1
        return spread

    def node_of(self, part: Partition) -> aioredis.Redis:
        """The client to SCAN a partition's keys with: on a cluster, the
        node owning its slot (a cluster client would scan every primary
        for every partition); elsewhere the one client."""
        return self.router.client_for(part.due) if self.router is not None else self.client

    async def set_due(self, credential_id: str, due_ms: int) -> bool:
        """Move an active credential's next refresh (``refresh now``)."""
        part = self.keys.partition_of(credential_id)
        [changed] = await self._read_partitions(
            [Read("zadd", part.due, ({credential_id: due_ms},), {"xx": True})]
        )
        return changed is not None

    # ------------------------------------------------- claim/spend/commit

    async def claim(
        self,
        part: Partition,
        *,
        limit: int,
        lease_ms: int,
        token: str,
        ids: Sequence[str] = (),
    ) -> tuple[int, int, list[Claimed]]:
        """Lease up to ``limit`` due credentials (or exactly ``ids``).
        Returns (server now ms, contended count, claimed)."""
        res = await self.run_script(
            self.scripts.claim,
            keys=[part.due, part.stats],
            args=[part.base, limit, lease_ms, token, "\n".join(ids)],
        )
        return int(res[0]), int(res[1]), self._claimed(part, token, res)

    def _claimed(self, part: Partition, token: str, res: list[Any]) -> list[Claimed]:
        now_ms = int(res[0])
        return [self._claimed_one(part, token, now_ms, item) for item in res[2:]]

    def _claimed_one(self, part: Partition, token: str, now_ms: int, item: list[Any]) -> Claimed:
        """One claimed credential. A refresh token that does not decrypt
        (altered, moved, or under a key not in the ring) is not an error of
        the claim: the credential carries it (``unreadable``) and the
        refresher stops it without sending anything."""
        unreadable: SecretUnreadable | None = None
        try:
            refresh_token = self.decode(item[0], "refresh_token", item[3])
        except SecretUnreadable as exc:
            refresh_token, unreadable = "", exc
        return Claimed(
            id=item[0],
            partition=part.index,
            token=token,
            due_ms=int(float(item[1])),
            profile=item[2],
            refresh_token=refresh_token,
            token_type=item[4],
            scope=item[5],
            expires_at_ms=int(float(item[6])),
            version=item[7],
            failures=int(item[8]),
            ambiguous_at_ms=int(item[9]) if item[9] else None,
            recovered=item[10] == "1",
            claimed_at_ms=now_ms,
            params=_json_map(item[11]),
            granted_scope=item[12],
            failing_since_ms=int(item[13]) if item[13] else None,
            refresh_expires_at_ms=int(float(item[14])) if item[14] else None,
            unreadable=unreadable,
        )

    async def claim_many(
        self, requests: Sequence[tuple[Partition, int, str]], *, lease_ms: int
    ) -> list[tuple[int, list[Claimed]]]:
        """Several partitions' claims, (partition, limit, token) each, in one
        round trip: a worker short of work asks every partition with
        something due at once. Returns (contended, claimed) per request."""
        if not requests:
            return []
        calls = [
            (self.scripts.claim, [part.due, part.stats], [part.base, limit, lease_ms, token, ""])
            for part, limit, token in requests
        ]
        out: list[tuple[int, list[Claimed]]] = []
        unavailable: list[tuple[int, StoreUnavailable]] = []
        # no durability wait: a lease forgotten by a failover only frees the work
        for (part, _, token), reply in zip(
            requests, await execute_scripts(self.client, Durability(), calls), strict=True
        ):
            if isinstance(reply, StoreUnavailable):
                unavailable.append((part.index, reply))
                continue
            if isinstance(reply, Exception):  # a script error: the others stand
                log.error("claim.failed", partition=part.index, error=str(reply))
                continue
            res = reply[0]
            out.append((int(res[1]), self._claimed(part, token, res)))
        if unavailable and not out:
            raise unavailable[0][1]
        if unavailable:
            # On a cluster one node can be down while the others answered:
            # their claims hold leases, so they are worked now rather than
            # left until the lease runs out.
            log.warning("claim.partitions_unavailable",
                        partitions=[index for index, _ in unavailable],
                        error=str(unavailable[0][1]))  # fmt: skip
        return out

    async def spend(
        self, c: Claimed, *, timeout_ms: int, margin_ms: int, rt_hash: str, grace_ms: int = -1
    ) -> SpendResult:
        """Record the spend intent. It must be durable before the request
        leaves: a server restart or failover that forgot it would let
        another worker send the same refresh token."""
        part = self.keys.partition(c.partition)
        res, durable = await self._run_durably(
            self.scripts.spend,
            keys=[part.cred(c.id), part.lock(c.id), part.due],
            args=[c.token, c.version, timeout_ms, margin_ms, rt_hash, c.id, grace_ms],
        )
        if res[0] != "ok":
            return SpendResult(False, res[0])
        if not durable:
            await self.commit(c, "release", next_due="now", fields={}, event="")
            return SpendResult(False, "not_durable")
        return SpendResult(True, server_now_ms=int(res[1]), deadline_ms=int(res[2]))

    async def commit(
        self,
        c: Claimed,
        outcome: Outcome,
        *,
        next_due: int | Literal["now", ""],
        fields: Mapping[str, str | int],
        event: str,
        reason: str = "",
        wait_durable: bool = False,
    ) -> CommitResult:
        """Apply an outcome atomically with its event (published, and
        appended to the partition's event log unless it is off). When durability is
        configured, the same round trip waits for the fsync (WAITAOF) and/or
        a replica (WAIT); ``durable=False`` tells the caller to keep the new
        tokens and re-apply them. Inside a running worker the batch owns
        that wait and the re-apply, and the call returns with the result,
        unless ``wait_durable`` asks for the acknowledgement itself (a
        pending commit that must not be forgotten before it is durable)."""
        keys, args = self.commit_call(
            c, outcome, next_due=next_due, fields=fields, event=event, reason=reason
        )
        res, durable = await self._run_durably(
            self.scripts.commit, wait_durable=wait_durable, keys=keys, args=args
        )
        if res[0] != "ok":
            return CommitResult(False, res[0])
        return CommitResult(
            True, lease_lost=res[1] == 1, durable=durable, server_now_ms=int(res[2])
        )

    def commit_call(
        self,
        c: Claimed,
        outcome: Outcome,
        *,
        next_due: int | Literal["now", ""],
        fields: Mapping[str, str | int],
        event: str,
        reason: str = "",
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the commit script (``worker/scripts/commit.lua``);
        ``worker.spool`` reads the ARGV back, so keep the two in step."""
        part = self.keys.partition(c.partition)
        flat: list[Any] = []
        for name, value in fields.items():
            if name in SECRET_FIELDS:
                flat += [name, self.encode(c.id, name, str(value))]
            else:
                flat += [name, value]
        keys = [part.cred(c.id), part.lock(c.id), part.due, part.stats, part.log]
        channel = self.event_channel(part)
        args = [c.token, c.version, outcome, next_due, channel, event, c.id, reason,
                *self._log_args, *flat]  # fmt: skip
        return keys, args

    async def run_script(self, script: AsyncScript, *, keys: list[str], args: list[Any]) -> Any:
        """One script call (the store's, or ``worker.client``'s token script):
        on one server, on one pooled connection (``redisio.run_script``); on
        a cluster, to its node's blocking pool (the cluster client's own
        pools refuse a burst, such as an import, with MaxConnectionsError),
        redirections followed (``worker.clusterbatch``)."""
        if self.router is None:
            return await run_one_script(self.client, script, keys, args)
        [outcome] = await execute_scripts(self.client, Durability(), [(script, keys, args)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome[0]

    def durability_at(self, address: str) -> Durability:
        """What a batch on the primary at ``address`` waits for."""
        return self.node_durability.get(address, self.durability)

    def event_channel(self, part: Partition) -> str:
        """Where a commit publishes its event: the installation's channel
        (PUBLISH) on one server; on a cluster the partition's shard channel
        (SPUBLISH), so an event costs only its own shard (``worker.eventsub``)."""
        return part.events if self.router is not None else self.keys.events

    async def _run_durably(
        self,
        script: AsyncScript,
        *,
        keys: list[str],
        args: list[Any],
        wait_durable: bool = True,
    ) -> tuple[list[Any], bool]:
        """Run a script and, in the same round trip, wait for what the
        durability setting asks: WAITAOF (fsync on the primary) and/or WAIT
        (replicas). Returns (result, durable). Inside a running worker the
        call joins a batch (``worker.batcher``): same result, shared cost,
        and with ``wait_durable=False`` the batch takes over the durability
        wait (and the re-apply, should the server go away before it)."""
        if self.batcher is not None and self.batcher.running:
            return await self.batcher.call(script, keys, args, wait_durable=wait_durable)
        d = self.durability
        if not (d.fsync or d.replicas):
            return await self.run_script(script, keys=keys, args=args), True
        (outcome,) = await execute_scripts(self.client, d, [(script, keys, args)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    # ------------------------------------------------------------ counts

    async def partition_earliest(self) -> dict[int, int]:
        """Earliest due time (ms) of every non-empty partition, one round trip."""
        parts = self.keys.all_partitions()
        results = await self._read_partitions(
            [Read("zrange", p.due, (0, 0), {"withscores": True}) for p in parts]
        )
        return {p.index: int(r[0][1]) for p, r in zip(parts, results, strict=True) if r}

    async def earliest_due(self) -> int | None:
        return min((await self.partition_earliest()).values(), default=None)

    async def schedule_stats(self, now_ms: int) -> tuple[int, int, int | None]:
        """(due now, scheduled in all, earliest due time in ms or None) over
        every partition, in one round trip."""
        calls: list[Read] = []
        for p in self.keys.all_partitions():
            calls += [
                Read("zcount", p.due, ("-inf", now_ms)),
                Read("zcard", p.due),
                Read("zrange", p.due, (0, 0), {"withscores": True}),
            ]
        results = await self._read_partitions(calls)
        earliest = [int(r[0][1]) for r in results[2::3] if r]
        return sum(results[0::3]), sum(results[1::3]), min(earliest, default=None)

    async def counters(self) -> dict[str, int]:
        """Sum of the partition counters (``status:<s>``, ``profile:<id>``)."""
        parts = self.keys.all_partitions()
        totals: dict[str, int] = {}
        calls = [Read("hgetall", p.stats) for p in parts]
        for stats in await self._read_partitions(calls):
            for name, value in stats.items():
                totals[name] = totals.get(name, 0) + int(value)
        return totals

    async def _read_partitions(self, calls: list[Read]) -> list[Any]:
        """The commands in one round trip: one pipeline here, one per node
        on a cluster (``worker.clusterbatch.run_by_node``: a slot being
        migrated redirects its own commands, reliably)."""
        if self.router is not None:
            return await run_by_node(self.router, calls)
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            call.queue(pipe)
        return list(await guard(pipe.execute()))

    async def ping(self) -> bool:
        try:
            return bool(await guard(self.client.ping()))
        except StoreUnavailable:
            return False
