"""docs/events.schema.json against the events a real run emitted, and the
typed events (``worker.eventmodel``) parsed from them.

Real workers refresh against the fake provider with every outcome:
refreshed (one with a kept ``id_token`` extra), failed, needs_reauth,
quarantined. Every event read back from the log must validate.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import make_settings, seed, wait_for, worker_running
from tests.schema_check import errors
from worker.app import open_store
from worker.eventlog import EventLog, LogEntry
from worker.eventmodel import (
    Failed,
    NeedsReauth,
    Quarantined,
    Refreshed,
    UnknownEvent,
    parse_event,
)
from worker.events import EventType, open_event
from worker.fakeprovider import FakeProvider, Fault
from worker.keyring import codec_from_settings

pytestmark = pytest.mark.anyio

SCHEMA: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "docs" / "events.schema.json").read_text()
)
TYPED = {
    "token.refreshed": Refreshed,
    "token.failed": Failed,
    "credential.needs_reauth": NeedsReauth,
    "credential.quarantined": Quarantined,
}


def documented(kind: str) -> set[str]:
    defs = SCHEMA["$defs"]
    names = set(defs["common"]["properties"])
    if kind == "token.refreshed":
        return names | set(defs["refreshed"]["properties"])
    return names | set(defs["failure"]["properties"])


@pytest.mark.parametrize("secrets", ["clear", "encrypted", "omitted"])
async def test_every_emitted_event_matches_the_schema_and_parses_typed(
    redis_url: str, secrets: str
) -> None:
    """In clear, and sealed under a key ring (REFRESHD_EVENT_SECRETS)."""
    ring = {} if secrets == "clear" else {"encryption_keys": RING, "event_secrets": secrets}
    settings = make_settings(redis_url, partitions=4, **ring)
    async with FakeProvider() as provider, open_store(settings) as store:
        grants = await seed(
            store, provider, 6, profile={"timeout_s": 0.5, "keep_fields": ["id_token"]}
        )
        rt = {cid: g.refresh_token for cid, g in grants.items()}
        provider.inject(
            Fault("status", match_refresh_token=rt["cred-00001"], status=503),
            Fault("process_then_hang", match_refresh_token=rt["cred-00002"]),
            Fault(
                "status",
                match_refresh_token=rt["cred-00003"],
                status=200,
                body={
                    "access_token": "at-with-id-token",
                    "token_type": "Bearer",
                    "expires_in": 3600,
                    "refresh_token": "rt-next",
                    "id_token": "eyJ.id-token.sig",
                },
            ),
        )
        provider.revoke_grant(grants["cred-00004"].grant_id)
        log = EventLog(store.client, store.keys)
        entries: list[LogEntry] = []

        async def read() -> set[str]:
            cursor = entries[-1].cursor if entries else log.beginning()
            assert cursor is not None
            entries.extend((await log.read(cursor)).entries)
            return {e.type for e in entries}

        async with worker_running(settings):
            await wait_for(
                lambda: _has_all(read()), within=20, what="every kind of event in the log"
            )
        await read()

    assert {e.type for e in entries} == set(TYPED) == {t.value for t in EventType}
    for entry in entries:
        body = json.loads(entry.json)
        assert errors(body, SCHEMA) == [], body
        assert set(body) <= documented(body["type"]), "an emitted field is not in the schema"
        event = parse_event(entry.json)
        assert type(event) is TYPED[body["type"]]
        assert (event.credential_id, event.version) == (entry.credential_id, entry.version)
        assert "refresh_token" not in body
        assert "rt-next" not in entry.json
    kept = [e.event for e in entries if e.credential_id == "cred-00003"]
    assert isinstance(kept[0], Refreshed)
    assert "eyJ" not in repr(kept[0])
    assert "at-with-id-token" not in repr(kept[0])
    refreshed = [e.event for e in entries if isinstance(e.event, Refreshed)]
    if secrets == "clear":
        assert kept[0].extra == {"id_token": "eyJ.id-token.sig"}
        assert all(e.secrets == "" and e.access_token for e in refreshed)
    elif secrets == "omitted":
        assert kept[0].extra == {}
        assert all(e.secrets == "omitted" and e.access_token == "" for e in refreshed)
    else:
        assert all(
            e.secrets == "encrypted" and e.access_token.startswith("e1.k1.") for e in refreshed
        )
        assert kept[0].extra["id_token"].startswith("e1.k1.")
        codec = codec_from_settings(settings)
        body = open_event(json.loads(entries[[e.event for e in entries].index(kept[0])].json),
                          codec, settings.prefix)  # fmt: skip
        assert body["extra"] == {"id_token": "eyJ.id-token.sig"}
        assert body["access_token"] == "at-with-id-token"
    for entry in entries:
        assert "eyJ" not in entry.json or secrets == "clear"
    failed = [e.event for e in entries if isinstance(e.event, Failed)]
    assert all(f.reason and f.failures for f in failed)


async def _has_all(found: Awaitable[set[str]]) -> bool:
    return set(TYPED) <= await found


REFRESHED = {"schema": 1, "type": "token.refreshed", "credential_id": "c1", "profile": "p",
             "version": 3, "ts": 1, "access_token": "at", "token_type": "Bearer",
             "expires_at": 5, "scope": ""}  # fmt: skip
RING = "k1:" + base64.b64encode(bytes(range(32))).decode()


def test_the_checker_rejects_what_the_schema_forbids() -> None:
    assert errors(REFRESHED, SCHEMA) == []
    omitted = {k: v for k, v in REFRESHED.items() if k != "access_token"} | {"secrets": "omitted"}
    assert errors(omitted, SCHEMA) == []
    assert errors(REFRESHED | {"secrets": "encrypted"}, SCHEMA) == []
    good = {
        "schema": 1,
        "type": "token.failed",
        "credential_id": "c1",
        "profile": "p",
        "version": 3,
        "ts": 1,
        "reason": "http_503",
        "failures": 1,
        "retry_at": 5,
    }
    assert errors(good, SCHEMA) == []
    for broken in (
        {k: v for k, v in good.items() if k != "reason"},
        good | {"version": "3"},
        good | {"schema": 2},
        good | {"type": "token.exploded"},
        good | {"type": "token.refreshed"},  # no access_token
        REFRESHED | {"secrets": "omitted"},  # omitted, yet there
        {k: v for k, v in REFRESHED.items() if k != "access_token"},  # missing, not omitted
        REFRESHED | {"secrets": "clear"},  # clear events carry no such field
        good | {"ts": True},
    ):
        assert errors(broken, SCHEMA), broken


def test_parsing_ignores_unknown_fields_and_never_crashes_on_unknown_types() -> None:
    base = {"schema": 1, "credential_id": "c", "profile": "p", "version": 2, "ts": 9}
    refreshed = parse_event(
        json.dumps(
            base
            | {
                "type": "token.refreshed",
                "access_token": "AT",
                "token_type": "Bearer",
                "expires_at": None,
                "scope": "",
                "new_field": {"x": 1},
            }
        )
    )
    assert isinstance(refreshed, Refreshed)
    assert refreshed.access_token == "AT"
    assert refreshed.expires_at_ms is None
    assert "AT" not in repr(refreshed)
    unknown = parse_event(base | {"type": "credential.teleported"})
    assert isinstance(unknown, UnknownEvent)
    assert (unknown.type, unknown.credential_id, unknown.version) == (
        "credential.teleported",
        "c",
        2,
    )
    newer = parse_event(base | {"schema": 2, "type": "token.refreshed"})
    assert isinstance(newer, UnknownEvent)
    assert newer.schema == 2
    missing = parse_event(base | {"type": "token.refreshed"})  # no access_token
    assert isinstance(missing, UnknownEvent)
    wrong = parse_event(base | {"type": "token.failed", "version": "2"})
    assert isinstance(wrong, UnknownEvent)
    from worker.eventmodel import EventFormatError

    for junk in ("not json", "[1, 2]", b"\xff"):
        with pytest.raises(EventFormatError):
            parse_event(junk)
