"""A consumer without Python: node-redis (the ``redis`` npm package) reads a
token through the token script, follows the durable event log from a
cursor made by Python across a refresh it asked for (min-TTL), and sees the
new version; and the README's node example runs as written. Both run as the
least-privilege ACL user (README "Least privilege") against a real worker
and a real token endpoint."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.harness import acme_profile, make_settings, worker_running
from worker.acl import acl_rules
from worker.app import open_store
from worker.cli.credentials import import_lines
from worker.eventlog import EventLog
from worker.fakeprovider import FakeProvider, IssuedGrant
from worker.keys import Keyspace
from worker.scheduling import Schedule
from worker.settings import Settings
from worker.store import Store

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "interop" / "node_consumer"
INSTALL_HINT = "run `make node-deps`"


def node_unavailable() -> str | None:
    """None if the node consumer can run here, else why not."""
    node = shutil.which("node")
    if node is None:
        return "node is not installed (need Node.js >= 20 on PATH)"
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10,
                             check=True).stdout  # fmt: skip
        major = int(out.strip().lstrip("v").split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError):
        return f"could not run `{node} --version`"
    if major < 20:
        return f"node {major} is too old (need >= 20 for zlib.crc32)"
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["redis"]
    try:
        installed = json.loads((NODE_DIR / "node_modules/redis/package.json").read_text())
    except (OSError, ValueError):
        return f"the redis npm package is not installed: {INSTALL_HINT}"
    if installed.get("version") != pinned:
        return f"redis {installed.get('version')} installed but {pinned} pinned: {INSTALL_HINT}"
    return None


@pytest.fixture
def node() -> str:
    reason = node_unavailable()
    if reason is not None:
        pytest.skip(reason)
    return shutil.which("node") or "node"


@asynccontextmanager
async def consumer_world(
    redis_url: str, tmp_path: Path, credential_id: str, expires_in: float
) -> AsyncIterator[tuple[Settings, Store, FakeProvider, IssuedGrant, dict[str, str]]]:
    """A provider, profile ``acme``, one credential, the consumer ACL user,
    the token script written by `refreshd consumer script`, and the env a
    node process gets (``REDIS_URL`` as the consumer, ``SCRIPT_FILE``)."""
    settings = make_settings(redis_url)
    async with FakeProvider() as fake, open_store(settings) as store:
        await acme_profile(store, fake)
        grant = fake.issue_grant()
        line = {"id": credential_id, "profile": "acme", "access_token": grant.access_token,
                "refresh_token": grant.refresh_token, "expires_in": expires_in,
                "scope": grant.scope}  # fmt: skip
        summary = await import_lines(store, [json.dumps(line)], schedule=Schedule(),
                                     replace=False)  # fmt: skip
        assert summary["failed"] == 0
        script = tmp_path / "token.lua"
        done = await anyio.run_process([sys.executable, "-m", "worker", "consumer", "script"],
                                       env=_env(redis_url))  # fmt: skip
        script.write_bytes(done.stdout)
        keys = Keyspace(settings.prefix, settings.partitions)
        await store.client.acl_setuser("node-app", enabled=True, passwords=["+pw"], reset=True)
        await store.client.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "node-app", *acl_rules(keys)
        )
        env = _env(redis_url) | {
            "REDIS_URL": redis_url.replace("redis://", "redis://node-app:pw@"),
            "REFRESHD_REDIS_URL": redis_url.replace("redis://", "redis://node-app:pw@"),
            "SCRIPT_FILE": str(script),
        }
        try:
            yield settings, store, fake, grant, env
        finally:
            await store.client.acl_deluser("node-app")


def _env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    return env | {"REFRESHD_REDIS_URL": redis_url}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def test_node_reads_follows_the_log_and_gets_a_min_ttl_refresh(
    node: str, redis_url: str, tmp_path: Path
) -> None:
    async with consumer_world(redis_url, tmp_path, "acme-7", expires_in=30) as (
        settings, store, fake, grant, env
    ):  # fmt: skip
        log = EventLog(store.client, store.keys)
        start = (await log.end()).encode()  # a cursor made in Python, followed in node
        env |= {"CREDENTIAL_ID": "acme-7", "CURSOR": start, "MIN_TTL": "60", "TIMEOUT": "15"}
        async with worker_running(settings):
            done = await anyio.run_process([node, str(NODE_DIR / "consumer.mjs")], env=env,
                                           check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        report: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        after_cursor = log.parse_cursor(report["cursor"])  # node's cursor, read back in Python
        rest = await log.read(after_cursor)
        stored = await store.get("acme-7")
    state = fake.grant_state(grant.grant_id)
    assert report["before"] == {"version": 0, "status": "active",
                                "token_sha256": _sha(grant.access_token)}  # fmt: skip
    assert report["asked"]["action"] == "asked"
    assert report["asked"]["receivers"] >= 1  # the worker heard the wake-up
    assert report["event"] == {
        "v": "1", "type": "token.refreshed", "id": "acme-7", "version": 1,
        "json_version": 1, "json_type": "token.refreshed",
        "token_sha256": _sha(state.access_token),
    }  # fmt: skip
    after = report["after"]
    assert (after["version"], after["status"]) == (1, "active")
    assert after["token_sha256"] == _sha(state.access_token) != _sha(grant.access_token)
    assert after["expires_at"] == stored.expires_at_ms
    assert "refresh_token" not in after["keys"]
    assert after["keys"] == sorted(
        ["id", "status", "profile", "version", "access_token", "token_type", "expires_at",
         "scope", "extra", "failures", "reason", "refreshed_at", "due_at", "action",
         "receivers"]
    )  # fmt: skip
    assert [e.version for e in rest.entries if e.credential_id == "acme-7"] == []
    assert state.refreshes == 1
    assert fake.stats.requests == 1
    for secret in (grant.refresh_token, state.access_token, grant.access_token):
        assert secret not in done.stdout.decode() + done.stderr.decode()


def readme_node_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### Non-Python consumers\n", 1)[1].split("\n### ", 1)[0]
    blocks: list[str] = re.findall(r"```js\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_readme_node_integration_is_at_most_ten_lines() -> None:
    lines = [ln for ln in readme_node_example().splitlines() if ln.strip()]
    integration = [ln for ln in lines if not ln.startswith("import ")]
    assert len(integration) <= 10, integration


async def test_the_readme_node_example_runs_as_written(
    node: str, redis_url: str, tmp_path: Path
) -> None:
    async with consumer_world(redis_url, tmp_path, "acme-42", expires_in=30) as (
        settings, _store, fake, grant, env
    ):  # fmt: skip
        example = tmp_path / "example.mjs"
        example.write_text(readme_node_example())
        (tmp_path / "node_modules").symlink_to(NODE_DIR / "node_modules")  # `redis` resolves
        assert (tmp_path / "token.lua").is_file()  # where `refreshd consumer script` wrote it
        async with worker_running(settings):
            done = await anyio.run_process([node, str(example)], cwd=tmp_path, env=env,
                                           check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    state = fake.grant_state(grant.grant_id)
    kind, version, valid = done.stdout.decode().split()
    # 30 s left and min_ttl 60: the example asked, the worker refreshed once
    assert (kind, version, valid) == ("Bearer", "1", "true")
    assert state.refreshes == 1
