"""The Lua contracts behind "a refresh token is never sent twice", through
``worker.store.Store`` on a real Valkey/Redis server.

claim: due credentials only, locked and re-scored to now + lease; an open
spend intent blocks every claim until its deadline, and an expired one comes
back as an unknown outcome. spend: only with our lock and the version read at
claim. commit: only with our intent (or, for new tokens, our intent recovered
by someone else), atomically with its event. upsert/delete keep the counters
right and never overwrite tokens while a request is out.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from redis.asyncio.client import PubSub
from redis.client import NEVER_DECODE

from tests.harness import make_settings
from tests.redis_server import RedisServer
from worker.app import open_store
from worker.codec import RECORD_MARK, PlainCodec
from worker.errors import Conflict, NotFound
from worker.keyring import AesGcmCodec, KeyRing
from worker.keys import Keyspace, Partition
from worker.landing import spent_fingerprint
from worker.models import Claimed, CredentialInput, Status
from worker.redisio import connect
from worker.store import Durability, Outcome, SpendResult, Store

pytestmark = pytest.mark.anyio

HOUR_MS = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    async with open_store(make_settings(redis_url)) as s:
        yield s


def MarkedCodec() -> AesGcmCodec:
    """The encrypting codec, to prove the store encodes on the way in and
    decodes on the way out."""
    return AesGcmCodec(KeyRing([("k1", bytes(range(32)))]))


async def create(
    store: Store,
    cred_id: str,
    *,
    due_ms: int = 0,
    profile: str = "p",
    access_token: str = "at-0",  # noqa: S107 - test data
    refresh_token: str = "rt-0",  # noqa: S107 - test data
    expires_at_ms: int | None = None,
    scope: str = "read write",
    replace: bool = False,
) -> bool:
    cred = CredentialInput(
        id=cred_id,
        profile=profile,
        access_token=access_token,
        refresh_token=refresh_token,
        expires_at_ms=expires_at_ms if expires_at_ms is not None else now_ms() + HOUR_MS,
        token_type="Bearer",
        scope=scope,
    )
    return await store.upsert(cred, due_ms=due_ms, replace=replace)


def part(store: Store, cred_id: str) -> Partition:
    return store.keys.partition_of(cred_id)


async def claim_due(
    store: Store, cred_id: str, token: str, *, lease_ms: int = 5000, limit: int = 100
) -> tuple[int, int, list[Claimed]]:
    """Claim what is due in ``cred_id``'s partition."""
    return await store.claim(part(store, cred_id), limit=limit, lease_ms=lease_ms, token=token)


async def claim_id(
    store: Store, cred_id: str, token: str, *, lease_ms: int = 5000
) -> Claimed | None:
    """Claim exactly ``cred_id`` ("refresh now"), whatever its due time."""
    _, _, items = await store.claim(
        part(store, cred_id), limit=1, lease_ms=lease_ms, token=token, ids=[cred_id]
    )
    return items[0] if items else None


async def claimed(store: Store, cred_id: str, token: str, *, lease_ms: int = 5000) -> Claimed:
    c = await claim_id(store, cred_id, token, lease_ms=lease_ms)
    assert c is not None, f"{token} could not claim {cred_id}"
    return c


async def lock_owner(store: Store, cred_id: str) -> str | None:
    owner = await store.client.get(part(store, cred_id).lock(cred_id))
    return None if owner is None else str(owner)


async def lock_ttl_ms(store: Store, cred_id: str) -> int:
    ttl: int = await store.client.pttl(part(store, cred_id).lock(cred_id))
    return ttl


async def due_score(store: Store, cred_id: str) -> float | None:
    score: float | None = await store.client.zscore(part(store, cred_id).due, cred_id)
    return score


async def spent(store: Store, c: Claimed, *, timeout_ms: int = 5000, margin_ms: int = 500) -> int:
    """Spend for ``c``; returns the intent deadline."""
    result = await store.spend(c, timeout_ms=timeout_ms, margin_ms=margin_ms, rt_hash="fp")
    assert result.ok, result.reason
    return result.deadline_ms


async def abandoned_spend(store: Store, cred_id: str) -> tuple[Claimed, SpendResult]:
    """Token "A" claimed ``cred_id``, recorded its intent, sent, and was never
    heard from again: its lease ran out (the credential is due again) and its
    request deadline passed. The lock is removed by hand rather than waited
    for, so a slow machine cannot turn the spend itself into "lost"."""
    a = await claimed(store, cred_id, "A")
    spend = await store.spend(a, timeout_ms=100, margin_ms=20, rt_hash="fp")
    assert spend.ok
    await store.client.delete(part(store, cred_id).lock(cred_id))
    await store.set_due(cred_id, 0)
    await anyio.sleep(0.15)  # past the deadline: now + 100 + 20 ms
    return a, spend


def same_partition_ids(store: Store, count: int) -> list[str]:
    ids = (f"cred-{n}" for n in range(10_000))
    chosen = [i for i in ids if store.keys.partition_of(i).index == 0]
    return chosen[:count]


NEW_TOKENS: dict[str, str | int] = {
    "access_token": "at-1",
    "refresh_token": "rt-1",
    "token_type": "Bearer",
    "scope": "read",
    "expires_at": 1_900_000_000_000,
}


@asynccontextmanager
async def subscribed(store: Store) -> AsyncIterator[PubSub]:
    async with store.client.pubsub() as pubsub:
        await pubsub.subscribe(store.keys.events)
        # wait for the confirmation: nothing published after it can be missed
        confirmation = await pubsub.get_message(timeout=2.0)
        assert confirmation is not None
        assert confirmation["type"] == "subscribe"
        yield pubsub


async def published(pubsub: PubSub, *, quiet_s: float = 0.2) -> list[str]:
    """Every message until the channel has been quiet for ``quiet_s``."""
    messages: list[str] = []
    while True:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=quiet_s)
        if message is None:
            return messages
        messages.append(message["data"])


# ----------------------------------------------------------------- claim


async def test_claim_returns_only_due_credentials_up_to_the_limit(store: Store) -> None:
    now = now_ms()
    ids = same_partition_ids(store, 7)
    for n, cred_id in enumerate(ids[:5]):
        await create(store, cred_id, due_ms=now - 10_000 + n)  # due, oldest first
    for cred_id in ids[5:]:
        await create(store, cred_id, due_ms=now + 60_000)  # not yet

    server_now, contended, first = await claim_due(store, ids[0], "A", limit=3)
    assert abs(server_now - now) < 5_000
    assert contended == 0
    assert [c.id for c in first] == ids[:3]  # the most overdue first
    _, _, rest = await claim_due(store, ids[0], "B", limit=10)
    assert [c.id for c in rest] == ids[3:5]
    _, _, nothing = await claim_due(store, ids[0], "C", limit=10)
    assert nothing == []


async def test_claim_decodes_what_the_codec_encoded(store: Store) -> None:
    coded = Store(store.client, store.keys, MarkedCodec(), store.durability)
    await coded.check_layout()  # a database this release created: secrets as bytes
    expires = now_ms() + HOUR_MS
    await create(
        coded,
        "c1",
        due_ms=1234,
        access_token="at-secret",
        refresh_token="rt-secret",
        expires_at_ms=expires,
        scope="read",
    )
    raw = await store.raw_fields("c1")
    assert raw["access_token"].startswith(RECORD_MARK + "k1.")
    assert coded.codec.key_id(raw["access_token"]) == "k1"
    assert "rt-secret" not in raw.values()
    key = part(store, "c1").cred("c1")
    record = await store.client.execute_command("GET", key, **{NEVER_DECODE: True})  # type: ignore[no-untyped-call]
    assert b"secret" not in record  # not even inside the packed value

    _, _, items = await claim_due(coded, "c1", "A")
    assert len(items) == 1
    c = items[0]
    assert (c.id, c.partition, c.token) == ("c1", part(store, "c1").index, "A")
    assert c.refresh_token == "rt-secret"
    assert not hasattr(c, "access_token")  # about to be replaced: never read
    assert (c.profile, c.token_type, c.scope) == ("p", "Bearer", "read")
    assert c.expires_at_ms == expires
    assert c.due_ms == 1234
    assert (c.version, c.failures) == ("0", 0)
    assert (c.ambiguous_at_ms, c.recovered) == (None, False)


async def test_a_claim_locks_and_rescores_to_now_plus_lease(store: Store) -> None:
    await create(store, "c1")
    server_now, _, items = await claim_due(store, "c1", "A", lease_ms=4000)
    assert [c.id for c in items] == ["c1"]
    assert await lock_owner(store, "c1") == "A"
    assert 3000 < await lock_ttl_ms(store, "c1") <= 4000
    assert await due_score(store, "c1") == server_now + 4000
    assert (await store.get("c1")).in_flight is True


async def test_a_locked_credential_is_contended_not_claimed(store: Store) -> None:
    await create(store, "c1")
    await claimed(store, "c1", "A", lease_ms=4000)

    assert await claim_id(store, "c1", "B") is None
    await store.set_due("c1", 0)  # due again while A still holds it
    server_now, contended, items = await claim_due(store, "c1", "B")
    assert (contended, items) == (1, [])
    assert await lock_owner(store, "c1") == "A"
    # pushed back to when A's lease ends, so B does not spin on it
    score = await due_score(store, "c1")
    assert score is not None
    assert server_now + 3000 < score <= server_now + 4000


async def test_claim_by_id_counts_contention_too(store: Store) -> None:
    await create(store, "c1")
    await claimed(store, "c1", "A")
    _, contended, items = await store.claim(
        part(store, "c1"), limit=1, lease_ms=5000, token="B", ids=["c1"]
    )
    assert (contended, items) == (1, [])


async def test_claim_by_id_ignores_the_due_time(store: Store) -> None:
    await create(store, "c1", due_ms=now_ms() + HOUR_MS)
    _, _, items = await claim_due(store, "c1", "A")
    assert items == []
    c = await claimed(store, "c1", "A")
    assert c.id == "c1"


async def test_after_the_lease_another_token_can_claim(store: Store) -> None:
    await create(store, "c1")
    first = await claimed(store, "c1", "A", lease_ms=150)
    await anyio.sleep(0.25)
    _, contended, items = await claim_due(store, "c1", "B")
    assert contended == 0
    assert [c.token for c in items] == ["B"]
    assert items[0].version == first.version
    assert items[0].recovered is False
    assert await lock_owner(store, "c1") == "B"


# ----------------------------------------------------------------- spend


async def test_spend_records_an_intent_with_a_deadline(store: Store) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A", lease_ms=20_000)
    result = await store.spend(c, timeout_ms=1000, margin_ms=100, rt_hash="fp")
    assert result.ok
    assert result.deadline_ms == result.server_now_ms + 1000 + 100
    # a long lease is never shortened
    assert await lock_ttl_ms(store, "c1") > 15_000


async def test_spend_renews_a_short_lease_past_the_request_deadline(store: Store) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A", lease_ms=1000)
    result = await store.spend(c, timeout_ms=3000, margin_ms=500, rt_hash="fp")
    assert result.ok
    assert result.deadline_ms == result.server_now_ms + 3500
    # the lock cannot lapse while the request is in flight
    assert await lock_ttl_ms(store, "c1") > result.deadline_ms - now_ms()
    score = await due_score(store, "c1")
    assert score is not None
    assert score >= result.deadline_ms


async def test_spend_is_lost_when_the_lock_is_not_ours(store: Store) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A")
    intruder = dataclasses.replace(c, token="intruder")
    result = await store.spend(intruder, timeout_ms=1000, margin_ms=100, rt_hash="fp")
    assert (result.ok, result.reason) == (False, "lost")


async def test_spend_is_lost_after_the_lease_passed_to_another_worker(store: Store) -> None:
    await create(store, "c1")
    a = await claimed(store, "c1", "A", lease_ms=150)
    await anyio.sleep(0.25)
    await claimed(store, "c1", "B")
    result = await store.spend(a, timeout_ms=1000, margin_ms=100, rt_hash="fp")
    assert (result.ok, result.reason) == (False, "lost")
    assert await lock_owner(store, "c1") == "B"


async def test_spend_is_stale_when_the_version_moved(store: Store) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A")
    old = dataclasses.replace(c, version="7")
    result = await store.spend(old, timeout_ms=1000, margin_ms=100, rt_hash="fp")
    assert (result.ok, result.reason) == (False, "stale")


async def test_one_claim_spends_once(store: Store) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A")
    await spent(store, c)
    again = await store.spend(c, timeout_ms=1000, margin_ms=100, rt_hash="fp")
    assert (again.ok, again.reason) == (False, "busy")


async def test_a_recovered_token_is_resent_only_inside_the_reuse_grace(store: Store) -> None:
    """The last gate before an unanswered refresh token goes out again: the
    spend refuses unless the whole new request ends inside the provider's
    reuse window, counted on Redis time from the first send."""
    await create(store, "c1")
    _, first = await abandoned_spend(store, "c1")
    b = await claimed(store, "c1", "B")
    assert b.ambiguous_at_ms == first.server_now_ms

    too_late = await store.spend(b, timeout_ms=1000, margin_ms=100, rt_hash="fp", grace_ms=1000)
    assert (too_late.ok, too_late.reason) == (False, "grace_over")
    assert (await store.get("c1")).in_flight is True  # still B's claim: nothing recorded
    inside = await store.spend(b, timeout_ms=1000, margin_ms=100, rt_hash="fp", grace_ms=60_000)
    assert inside.ok


async def test_a_non_rotating_token_may_always_be_resent(store: Store) -> None:
    await create(store, "c1")
    await abandoned_spend(store, "c1")
    b = await claimed(store, "c1", "B")
    assert b.recovered
    again = await store.spend(b, timeout_ms=1000, margin_ms=100, rt_hash="fp", grace_ms=-1)
    assert again.ok


async def test_an_open_intent_blocks_every_claim_even_after_the_lock_is_gone(
    store: Store,
) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A")
    deadline = await spent(store, c, timeout_ms=5000, margin_ms=100)
    # the lock vanishes (expired, evicted, lost in a failover): the intent still holds
    await store.client.delete(part(store, "c1").lock("c1"))
    await store.set_due("c1", 0)

    _, contended, items = await claim_due(store, "c1", "B")
    assert (contended, items) == (1, [])
    assert await due_score(store, "c1") == deadline  # next look: when it may be decided
    assert await claim_id(store, "c1", "C") is None
    cred = await store.get("c1")
    assert cred.in_flight is True
    assert cred.refresh_token == "rt-0"


async def test_an_intent_past_its_deadline_comes_back_as_an_unknown_outcome(
    store: Store,
) -> None:
    await create(store, "c1")
    a = await claimed(store, "c1", "A", lease_ms=1000)
    spend = await store.spend(a, timeout_ms=100, margin_ms=20, rt_hash="fp")
    assert spend.ok
    await anyio.sleep(1.1)  # lock expired, deadline passed, nothing committed

    _, contended, items = await claim_due(store, "c1", "B", lease_ms=200)
    assert contended == 0
    [b] = items
    assert b.recovered is True
    assert b.ambiguous_at_ms == spend.server_now_ms  # when the unanswered request left
    assert b.version == a.version
    assert b.refresh_token == "rt-0"  # nothing was learnt: the rotation rule decides
    # the recovering worker has no intent of its own: it cannot commit new tokens
    refused = await store.commit(b, "refreshed", next_due="", fields=NEW_TOKENS, event="")
    assert (refused.ok, refused.reason) == (False, "stale")


async def test_the_unknown_outcome_survives_a_crashed_recoverer(store: Store) -> None:
    await create(store, "c1")
    _, spend = await abandoned_spend(store, "c1")
    await claimed(store, "c1", "B", lease_ms=150)  # recovers, then dies silently
    await anyio.sleep(0.25)

    c = await claimed(store, "c1", "C")
    assert c.ambiguous_at_ms == spend.server_now_ms
    assert c.refresh_token == "rt-0"


# ---------------------------------------------------------------- commit


async def test_refreshed_needs_our_intent(store: Store) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A")
    # the lock alone is not enough: nothing was spent, so nothing can be new
    result = await store.commit(c, "refreshed", next_due="", fields=NEW_TOKENS, event="")
    assert (result.ok, result.reason) == (False, "stale")
    await spent(store, c)
    other = dataclasses.replace(c, token="B")
    result = await store.commit(other, "refreshed", next_due="", fields=NEW_TOKENS, event="")
    assert (result.ok, result.reason) == (False, "stale")
    assert (await store.get("c1")).refresh_token == "rt-0"


async def test_a_late_answer_does_not_override_a_replacement(store: Store) -> None:
    """The version read at claim still guards a late answer: once an operator
    has replaced the credential, the old claim's tokens are stale."""
    await create(store, "c1")
    a, _ = await abandoned_spend(store, "c1")
    assert (await claimed(store, "c1", "B")).recovered
    await create(store, "c1", refresh_token="rt-reauthorized", replace=True)
    late = await store.commit(a, "refreshed", next_due="", fields=NEW_TOKENS, event="")
    assert (late.ok, late.reason) == (False, "stale")
    cred = await store.get("c1")
    assert (cred.refresh_token, cred.version) == ("rt-reauthorized", 1)


async def test_refreshed_writes_tokens_once(store: Store) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A")
    await spent(store, c)
    next_due = now_ms() + HOUR_MS
    result = await store.commit(c, "refreshed", next_due=next_due, fields=NEW_TOKENS, event="")
    assert result.ok
    assert result.lease_lost is False
    cred = await store.get("c1")
    assert (cred.access_token, cred.refresh_token, cred.scope) == ("at-1", "rt-1", "read")
    assert cred.expires_at_ms == NEW_TOKENS["expires_at"]
    assert cred.version == 1
    assert cred.status is Status.ACTIVE
    assert cred.due_at_ms == next_due
    assert cred.in_flight is False  # lock and intent are gone
    assert cred.refreshed_at_ms == result.server_now_ms
    # a second commit of the same claim is refused: the version moved
    again = await store.commit(
        c, "refreshed", next_due="", fields={"refresh_token": "rt-X"}, event=""
    )
    assert (again.ok, again.reason) == (False, "stale")
    assert (await store.get("c1")).refresh_token == "rt-1"


async def test_a_late_commit_lands_after_another_claim_recovered_its_intent(
    store: Store,
) -> None:
    """Redis was unreachable when A's answer came back; by the time A's commit
    retry gets through, B has recovered A's intent as an unknown outcome. A's
    tokens are the only valid ones now: they must land."""
    await create(store, "c1")
    a, _ = await abandoned_spend(store, "c1")
    b = await claimed(store, "c1", "B")
    assert b.recovered

    next_due = now_ms() + HOUR_MS
    late = await store.commit(a, "refreshed", next_due=next_due, fields=NEW_TOKENS, event="")
    assert late.ok
    assert late.lease_lost is True  # counted as an alarm, but the tokens are kept
    cred = await store.get("c1")
    assert (cred.refresh_token, cred.version, cred.status) == ("rt-1", 1, Status.ACTIVE)
    assert cred.due_at_ms == next_due
    assert await lock_owner(store, "c1") == "B"  # B's lock is not A's to delete
    # B read the old version: it can never send the old refresh token now
    refused = await store.spend(b, timeout_ms=1000, margin_ms=100, rt_hash="fp")
    assert (refused.ok, refused.reason) == (False, "stale")
    # whatever B decides on its older snapshot is stale, but its lock is freed
    released = await store.commit(b, "release", next_due="now", fields={}, event="")
    assert (released.ok, released.reason) == (False, "stale")
    assert await lock_owner(store, "c1") is None
    # and the unknown outcome is settled: nothing is ambiguous any more
    c = await claimed(store, "c1", "C")
    assert (c.recovered, c.ambiguous_at_ms, c.refresh_token) == (False, None, "rt-1")


@pytest.mark.parametrize("outcome", ["quarantined", "needs_reauth", "retry"])
async def test_a_recovering_claim_cannot_stop_a_credential_refreshed_since(
    store: Store, outcome: Outcome
) -> None:
    """Found by this suite: commit.lua used to check the version for
    'refreshed' only, so the recovering claim's quarantine landed on top of
    the late answer's fresh tokens and stopped a healthy credential."""
    await create(store, "c1")
    a, _ = await abandoned_spend(store, "c1")
    b = await claimed(store, "c1", "B")  # rotation rule: the outcome is unknown
    assert b.recovered
    next_due = now_ms() + HOUR_MS
    late = await store.commit(a, "refreshed", next_due=next_due, fields=NEW_TOKENS, event="")
    assert late.ok
    # B decided on version 0; the credential is at version 1 with good tokens
    async with subscribed(store) as pubsub:
        stop = await store.commit(
            b, outcome, next_due="", fields={"last_error": "unknown_outcome"}, event="stop"
        )
        assert (stop.ok, stop.reason) == (False, "stale")
        assert await published(pubsub) == []
    cred = await store.get("c1")
    assert (cred.status, cred.failures, cred.refresh_token) == (Status.ACTIVE, 0, "rt-1")
    assert cred.due_at_ms == next_due
    assert await lock_owner(store, "c1") is None  # B's request is over either way


@pytest.mark.parametrize("after_spend", [True, False], ids=["after-spend", "lock-only"])
@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        ("retry", Status.ACTIVE),
        ("needs_reauth", Status.NEEDS_REAUTH),
        ("quarantined", Status.QUARANTINED),
    ],
)
async def test_failure_outcomes(
    store: Store, outcome: Outcome, status: Status, after_spend: bool
) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A")
    if after_spend:
        await spent(store, c)
    next_due = now_ms() + 60_000
    result = await store.commit(
        c, outcome, next_due=next_due, fields={"last_error": "boom"}, event="", reason="boom"
    )
    assert result.ok
    assert result.lease_lost is False
    cred = await store.get("c1")
    assert cred.status is status
    assert (cred.failures, cred.last_error, cred.version) == (1, "boom", 0)
    assert (cred.access_token, cred.refresh_token) == ("at-0", "rt-0")
    assert cred.in_flight is False
    counters = await store.counters()
    assert counters.get("status:active", 0) == (1 if status is Status.ACTIVE else 0)
    assert counters.get(f"status:{status.value}", 0) == 1
    assert counters.get("profile:p", 0) == 1
    if status is Status.ACTIVE:
        assert cred.due_at_ms == next_due
    else:
        assert cred.due_at_ms is None  # stopped: never claimed again
        await store.set_due("c1", 0)
        assert await claim_id(store, "c1", "B") is None


@pytest.mark.parametrize("outcome", ["retry", "needs_reauth", "quarantined", "release"])
async def test_other_outcomes_need_our_claim(store: Store, outcome: Outcome) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A")
    stranger = dataclasses.replace(c, token="B")
    result = await store.commit(stranger, outcome, next_due="now", fields={}, event="")
    assert (result.ok, result.reason) == (False, "stale")
    assert (await store.get("c1")).status is Status.ACTIVE
    assert await lock_owner(store, "c1") == "A"


async def test_failures_accumulate_and_a_refresh_resets_them(store: Store) -> None:
    await create(store, "c1")
    for token in ("A", "B"):
        c = await claimed(store, "c1", token)
        await spent(store, c)
        result = await store.commit(
            c, "retry", next_due="now", fields={}, event="", reason="server_error"
        )
        assert result.ok
    assert (await store.get("c1")).failures == 2
    assert (await store.counters()).get("failing:server_error", 0) == 1

    c = await claimed(store, "c1", "C")
    assert c.failures == 2
    await spent(store, c)
    assert (await store.commit(c, "refreshed", next_due="", fields=NEW_TOKENS, event="")).ok
    assert (await store.get("c1")).failures == 0
    assert (await store.counters()).get("failing:server_error", 0) == 0


async def test_release_hands_the_credential_back_due_now(store: Store) -> None:
    await create(store, "c1", due_ms=now_ms() + HOUR_MS)
    c = await claimed(store, "c1", "A")
    await spent(store, c)  # spent, but (say) not durable: nothing was sent
    result = await store.commit(c, "release", next_due="now", fields={}, event="")
    assert result.ok
    assert await due_score(store, "c1") == result.server_now_ms
    assert await lock_owner(store, "c1") is None
    cred = await store.get("c1")
    assert (cred.in_flight, cred.failures, cred.version) == (False, 0, 0)
    _, _, items = await claim_due(store, "c1", "B")
    assert [(i.token, i.recovered) for i in items] == [("B", False)]


async def test_a_commit_of_a_deleted_credential_is_gone(store: Store) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A")
    await store.delete("c1", force=True)
    result = await store.commit(c, "retry", next_due="now", fields={}, event="")
    assert (result.ok, result.reason) == (False, "gone")


# ---------------------------------------------------------------- events


async def test_a_commit_publishes_exactly_its_event_and_only_when_it_lands(
    store: Store,
) -> None:
    await create(store, "c1")
    await create(store, "c2")
    event = '{"schema":1,"type":"token.refreshed","credential_id":"c1","version":1}'
    async with subscribed(store) as pubsub:
        c = await claimed(store, "c1", "A")
        refused = await store.commit(c, "refreshed", next_due="", fields=NEW_TOKENS, event=event)
        assert not refused.ok
        assert await published(pubsub) == []

        await spent(store, c)
        assert (await store.commit(c, "refreshed", next_due="", fields=NEW_TOKENS, event=event)).ok
        assert await published(pubsub) == [event]

        d = await claimed(store, "c2", "B")
        assert (await store.commit(d, "retry", next_due="now", fields={}, event="")).ok
        assert await published(pubsub) == []


# ---------------------------------------------------------------- upsert


async def test_create_refuses_an_existing_credential(store: Store) -> None:
    assert await create(store, "c1") is True
    with pytest.raises(Conflict):
        await create(store, "c1", refresh_token="rt-other")
    assert (await store.get("c1")).refresh_token == "rt-0"
    assert (await store.counters()).get("status:active") == 1


async def test_replace_overwrites_and_bumps_the_version(store: Store) -> None:
    await create(store, "c1", due_ms=now_ms() + HOUR_MS)
    due = now_ms() + 5000
    assert await create(store, "c1", refresh_token="rt-new", due_ms=due, replace=True) is False
    cred = await store.get("c1")
    assert (cred.refresh_token, cred.version, cred.due_at_ms) == ("rt-new", 1, due)
    assert (await store.counters()).get("status:active") == 1


async def test_replace_reactivates_and_moves_the_counters(store: Store) -> None:
    await create(store, "c1", profile="old")
    c = await claimed(store, "c1", "A")
    await spent(store, c)
    assert (await store.commit(c, "needs_reauth", next_due="", fields={}, event="")).ok
    before = await store.counters()
    assert (before.get("status:needs_reauth"), before.get("status:active")) == (1, 0)

    await create(store, "c1", profile="new", refresh_token="rt-reauthorized", replace=True)
    cred = await store.get("c1")
    assert (cred.status, cred.failures, cred.profile) == (Status.ACTIVE, 0, "new")
    counters = await store.counters()
    assert counters.get("status:needs_reauth", 0) == 0
    assert counters.get("status:active", 0) == 1
    assert counters.get("profile:old", 0) == 0
    assert counters.get("profile:new", 0) == 1


async def test_replace_is_refused_while_a_spend_intent_is_open(store: Store) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A")
    await spent(store, c)
    with pytest.raises(Conflict):
        await create(store, "c1", refresh_token="rt-operator", replace=True)
    # the request in flight can still land its rotated tokens
    assert (await store.commit(c, "refreshed", next_due="", fields=NEW_TOKENS, event="")).ok
    assert (await store.get("c1")).refresh_token == "rt-1"


async def test_replace_before_the_spend_makes_the_claim_stale(store: Store) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A")
    await create(store, "c1", refresh_token="rt-operator", replace=True)
    result = await store.spend(c, timeout_ms=1000, margin_ms=100, rt_hash="fp")
    assert (result.ok, result.reason) == (False, "stale")  # the old token is never sent


async def test_replace_refuses_the_last_two_spent_refresh_tokens(store: Store) -> None:
    """A rotation records the spent token's fingerprint (``spent_rt``), and
    an import may not write it back; the record keeps the last two (a few
    bytes), and only once a credential has rotated."""
    await create(store, "c1", refresh_token="rt-0")
    assert "spent_rt" not in await store.raw_fields("c1")
    for n in range(1, 4):  # rt-0 -> rt-1 -> rt-2 -> rt-3
        c = await claimed(store, "c1", f"T{n}")
        await spent(store, c)
        fields = {"refresh_token": f"rt-{n}", "spent_rt": spent_fingerprint(f"rt-{n - 1}")}
        assert (await store.commit(c, "refreshed", next_due="", fields=fields, event="")).ok
    assert len((await store.raw_fields("c1"))["spent_rt"]) == 16
    for old in ("rt-1", "rt-2"):
        with pytest.raises(Conflict, match=r"credential c1: this refresh_token was already spent"):
            await create(store, "c1", refresh_token=old, replace=True)
    cred = await store.get("c1")
    assert (cred.refresh_token, cred.version) == ("rt-3", 3)
    # the current token, or a new one, may be written
    assert await create(store, "c1", refresh_token="rt-3", replace=True) is False
    assert await create(store, "c1", refresh_token="rt-reauthorized", replace=True) is False
    assert (await store.get("c1")).refresh_token == "rt-reauthorized"


async def test_a_spent_fingerprint_is_kept_once_and_survives_a_replace(store: Store) -> None:
    await create(store, "c1", refresh_token="rt-0")
    for token in ("A", "B"):  # the same spent token reported twice (a late commit)
        c = await claimed(store, "c1", token)
        await spent(store, c)
        fields = {"refresh_token": "rt-1", "spent_rt": spent_fingerprint("rt-0")}
        assert (await store.commit(c, "refreshed", next_due="", fields=fields, event="")).ok
    assert (await store.raw_fields("c1"))["spent_rt"] == spent_fingerprint("rt-0")
    await create(store, "c1", refresh_token="rt-new", replace=True)
    with pytest.raises(Conflict):
        await create(store, "c1", refresh_token="rt-0", replace=True)


# ---------------------------------------------------------------- delete


async def test_delete_removes_everything_and_fixes_the_counters(store: Store) -> None:
    await create(store, "c1", profile="p")
    await create(store, "c2", profile="q")
    c = await claimed(store, "c1", "A")
    with pytest.raises(Conflict):
        await store.delete("c1")  # locked: a refresh may be about to start
    await spent(store, c)
    await store.client.delete(part(store, "c1").lock("c1"))
    with pytest.raises(Conflict):
        await store.delete("c1")  # a request is out
    await store.delete("c1", force=True)

    with pytest.raises(NotFound):
        await store.get("c1")
    assert await due_score(store, "c1") is None
    assert await lock_owner(store, "c1") is None
    assert await store.list_ids() == ["c2"]
    counters = await store.counters()
    assert counters.get("status:active", 0) == 1
    assert counters.get("profile:p", 0) == 0
    assert counters.get("profile:q", 0) == 1
    assert await claim_id(store, "c1", "B") is None
    with pytest.raises(NotFound):
        await store.delete("c1")


async def test_delete_of_a_stopped_credential_fixes_its_status_counter(store: Store) -> None:
    await create(store, "c1")
    c = await claimed(store, "c1", "A")
    await store.commit(c, "quarantined", next_due="", fields={}, event="", reason="unknown")
    await store.delete("c1")
    counters = await store.counters()
    assert counters.get("status:quarantined", 0) == 0
    assert counters.get("failing:unknown", 0) == 0


async def test_counters_sum_over_partitions(store: Store) -> None:
    ids = [f"cred-{n}" for n in range(40)]
    assert len({store.keys.partition_of(i).index for i in ids}) > 1
    for n, cred_id in enumerate(ids):
        await create(store, cred_id, profile="p" if n % 4 else "q")
    counters = await store.counters()
    assert counters.get("status:active") == 40
    assert (counters.get("profile:p"), counters.get("profile:q")) == (30, 10)
    due, scheduled, _ = await store.schedule_stats(now_ms())
    assert (due, scheduled) == (40, 40)


# ---------------------------------------------------------------- layout


async def test_a_different_partition_count_is_refused(redis_url: str) -> None:
    async with open_store(make_settings(redis_url, partitions=4)) as first:
        await create(first, "c1")
    with pytest.raises(Conflict, match="4 partitions"):
        async with open_store(make_settings(redis_url, partitions=8)):
            pass
    async with open_store(make_settings(redis_url, partitions=4)) as again:
        assert (await again.get("c1")).refresh_token == "rt-0"
    # another installation (prefix) on the same server keeps its own layout
    async with open_store(make_settings(redis_url, partitions=8, prefix="other:")) as other:
        assert await other.list_ids() == []


async def test_data_in_an_older_record_format_is_refused_not_misread(
    fresh_redis: RedisServer,
) -> None:
    """A Redis written by a refreshd that kept one hash per credential has a
    layout without a record format: this one must not read it as packed."""
    settings = make_settings(fresh_redis.url)
    async with open_store(settings) as store:
        await create(store, "c1")
        await store.client.hdel(store.keys.layout, "record")
    with pytest.raises(Conflict, match=r"record format .*hash.* import the credentials again"):
        async with open_store(settings):
            pass


# ------------------------------------------------------------ durability


async def test_commits_wait_for_fsync_and_report_durable(redis_url: str) -> None:
    async with connect(redis_url) as client:
        config = await client.config_get("appendonly")
        assert config["appendonly"] == "yes"
        store = Store(client, Keyspace(), PlainCodec(), Durability(fsync=True))
        await store.check_layout()
        await create(store, "c1")
        c = await claimed(store, "c1", "A")
        spend = await store.spend(c, timeout_ms=1000, margin_ms=100, rt_hash="fp")
        assert spend.ok
        result = await store.commit(c, "refreshed", next_due="", fields=NEW_TOKENS, event="")
        assert (result.ok, result.durable) == (True, True)
        assert (await store.get("c1")).refresh_token == "rt-1"


async def test_open_store_waits_for_fsync_when_the_server_has_appendonly(redis_url: str) -> None:
    async with open_store(make_settings(redis_url)) as store:
        assert store.durability.fsync is True
        await create(store, "c1")
        c = await claimed(store, "c1", "A")
        await spent(store, c)
        result = await store.commit(c, "refreshed", next_due="", fields=NEW_TOKENS, event="")
        assert (result.ok, result.durable) == (True, True)


async def test_without_fsync_a_spend_is_released_and_a_commit_is_not_durable(
    fresh_redis: RedisServer,
) -> None:
    """appendonly switched off at runtime (or a failover to a replica without
    it): the intent cannot be made durable, so nothing may be sent; new tokens
    still land but are reported not durable, so the worker keeps them."""
    async with open_store(make_settings(fresh_redis.url)) as store:
        assert store.durability.fsync is True
        await create(store, "c1")
        await create(store, "c2")
        first = await claimed(store, "c1", "A")
        await spent(store, first)
        await store.client.config_set("appendonly", "no")

        late = await store.commit(first, "refreshed", next_due="", fields=NEW_TOKENS, event="")
        assert (late.ok, late.durable) == (True, False)
        assert (await store.get("c1")).refresh_token == "rt-1"

        second = await claimed(store, "c2", "B")
        refused = await store.spend(second, timeout_ms=1000, margin_ms=100, rt_hash="fp")
        assert (refused.ok, refused.reason) == (False, "not_durable")
        cred = await store.get("c2")
        assert cred.in_flight is False  # intent and lock released: retry at once
        assert cred.due_at_ms is not None
        assert cred.due_at_ms <= now_ms()
