"""README "Consuming tokens": its Python examples run as written, against a
real worker and a real token endpoint (a token with min_ttl, then the
durable event log), and an integration stays within 10 lines."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
from pathlib import Path

import anyio
import pytest

from tests.harness import acme_profile, make_settings, worker_running
from worker.app import open_store
from worker.cli.credentials import import_lines
from worker.client import connect
from worker.fakeprovider import FakeProvider
from worker.scheduling import Schedule

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def examples() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Consuming tokens\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_an_integration_is_at_most_ten_lines() -> None:
    blocks = examples()
    assert len(blocks) == 2
    for block in blocks:
        lines = [line for line in block.splitlines() if line.strip()]
        assert len(lines) <= 10, block


async def test_the_examples_run_as_written(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url)
    async with FakeProvider() as fake, open_store(settings) as store:
        await acme_profile(store, fake)
        grant = fake.issue_grant()
        line = {
            "id": "acme-42",
            "profile": "acme",
            "access_token": grant.access_token,
            "refresh_token": grant.refresh_token,
            "expires_in": 30,
            "scope": grant.scope,
        }
        summary = await import_lines(store, [json.dumps(line)], schedule=Schedule(),
                                     replace=False)  # fmt: skip
        assert summary["failed"] == 0
        env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
        env["REFRESHD_REDIS_URL"] = redis_url
        outputs = []
        async with worker_running(settings):
            for block in examples():
                done = await anyio.run_process(
                    [sys.executable, "-c", block], cwd=tmp_path, env=env, check=False
                )
                assert done.returncode == 0, done.stderr.decode()
                outputs.append(done.stdout.decode().strip())
        state = fake.grant_state(grant.grant_id)
        cred = await store.get("acme-42")
    # 30 s left and min_ttl=60: the first example had it refreshed, once
    got, *events = outputs[0].splitlines()
    kind, version, expires_at = got.split()
    assert (kind, version) == ("Bearer", "1")
    assert dt.datetime.fromisoformat(expires_at).timestamp() == cred.expires_at_ms / 1000
    # ... and read that refresh's event from the durable log, with its cursor
    assert len(events) == 1
    event_type, cred_id, event_version, cursor = events[0].split()
    assert (event_type, cred_id, event_version) == ("token.refreshed", "acme-42", "1")
    async with connect(settings) as client:
        assert [e async for e in client.events(since=cursor, follow=False)] == []
        (again,) = [e async for e in client.events(since="start", follow=False)]
    assert str(again.cursor) == cursor
    assert outputs[1] == "read write True"
    assert state.refreshes == 1
    assert fake.stats.requests == 1
    assert grant.refresh_token not in "".join(outputs)
