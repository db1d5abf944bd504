"""`refreshd watch` as a real process: reading the log since a cursor,
masking every secret, and living through a Redis outage."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import anyio
import pytest

from tests.cli_helpers import run_refreshd
from tests.harness import make_settings, seed, wait_for, worker_running
from tests.redis_server import RedisServer
from tests.test_eventlog import generate, refresh_all_once
from worker.app import open_store
from worker.eventlog import EventLog
from worker.fakeprovider import FakeProvider, FakeProviderConfig, Fault
from worker.keyring import generate_key
from worker.logs import fingerprint

pytestmark = pytest.mark.anyio


def cli_env(redis_url: str, partitions: int = 16) -> dict[str, str]:
    """The environment of a `refreshd` process on this server, nothing inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    return env | {"REFRESHD_REDIS_URL": redis_url, "REFRESHD_LOG_LEVEL": "error",
                  "REFRESHD_PARTITIONS": str(partitions)}  # fmt: skip


class Watch:
    """`python -m worker watch ...` with its output collected line by line."""

    def __init__(self, redis_url: str, *args: str, partitions: int = 16, **settings: str) -> None:
        env = cli_env(redis_url, partitions)
        env |= {f"REFRESHD_{name.upper()}": value for name, value in settings.items()}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "watch", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        self.out: list[str] = []
        self.err: list[str] = []
        self.pumps = [
            threading.Thread(target=self._pump, args=(stream, into), daemon=True)
            for stream, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for pump in self.pumps:
            pump.start()

    @staticmethod
    def _pump(stream: Any, into: list[str]) -> None:
        with stream:
            for line in stream:
                into.append(line.rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.out)]

    async def wait_watching(self) -> None:
        await wait_for(lambda: any(x.startswith("watching") for x in self.err) or self.dead(),
                       within=20, what="the watching notice")  # fmt: skip
        assert not self.dead(), self.err

    def dead(self) -> bool:
        return self.proc.poll() is not None

    def finish(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pump in self.pumps:
            pump.join(5)


async def test_watch_since_a_printed_cursor_resumes_after_that_event(redis_url: str) -> None:
    settings = make_settings(redis_url)
    async with FakeProvider() as provider, open_store(settings) as store:
        await refresh_all_once(settings, store, provider, 5)
        states = {f"cred-{n:05d}": n for n in range(5)}
        everything = Watch(redis_url, "--since", "start", "--count", "5")
        assert await anyio.to_thread.run_sync(everything.finish) == 0, everything.err
        first = everything.events()
        assert sorted(e["credential_id"] for e in first) == sorted(states)
        assert all(e["cursor"].startswith("1:") for e in first)
        assert all(e["access_token"].startswith("[") for e in first)  # masked
        rest = Watch(redis_url, "--since", first[1]["cursor"], "--count", "3")
        assert await anyio.to_thread.run_sync(rest.finish) == 0, rest.err
        assert rest.events() == first[2:]
        assert rest.err[0].startswith(f"watching the event log after {first[1]['cursor']}")
        bad = Watch(redis_url, "--since", "1:nonsense")
        assert await anyio.to_thread.run_sync(bad.finish) == 2
        assert bad.err == ["refreshd: error: the cursor has 1 positions but the installation "
                           "has 16 partitions"]  # fmt: skip


#: kept extras a provider may answer with: every one whose name looks secret
#: is masked, whatever its case or separators; the others are shown
SECRET_EXTRAS = {
    "id_token": "ID-secret-value",
    "idToken": "IDC-secret-value",
    "mfa_passcode": "PC-secret-value",
    "signing_key": "SK-secret-value",
    "client_assertion": "CA-secret-value",
    "Session-Password": "PW-secret-value",
}
PLAIN_EXTRAS = {"instance_url": "https://acme.example", "oauth_client_id": "client-7"}


async def test_watch_masks_every_secret_including_a_kept_id_token(redis_url: str) -> None:
    settings = make_settings(redis_url, partitions=2)
    async with FakeProvider() as provider, open_store(settings) as store:
        kept = [*SECRET_EXTRAS, *PLAIN_EXTRAS]
        grants = await seed(store, provider, 1, profile={"keep_fields": kept})
        provider.inject(
            Fault(
                "status",
                status=200,
                body={
                    "access_token": "AT-secret-value",
                    "token_type": "Bearer",
                    "expires_in": 3600,
                    "refresh_token": "RT-secret-value",
                    **SECRET_EXTRAS,
                    **PLAIN_EXTRAS,
                },
            )
        )
        watcher = Watch(redis_url, "--count", "1", partitions=2)
        await watcher.wait_watching()
        async with worker_running(settings):
            assert await anyio.to_thread.run_sync(watcher.finish) == 0, watcher.err
        [event] = watcher.events()
        assert event["access_token"] == f"[{fingerprint('AT-secret-value')}]"
        assert event["token_type"] == "Bearer"
        masked = {name: f"[{fingerprint(value)}]" for name, value in SECRET_EXTRAS.items()}
        assert event["extra"] == masked | PLAIN_EXTRAS
        everything = "\n".join(watcher.out + watcher.err)
        secrets = ["AT-secret", "RT-secret", *SECRET_EXTRAS.values(),
                   grants["cred-00000"].refresh_token]  # fmt: skip
        for secret in secrets:
            assert secret not in everything
        shown = Watch(redis_url, "--since", "start", "--count", "1", "--reveal", partitions=2)
        assert await anyio.to_thread.run_sync(shown.finish) == 0
        assert shown.events()[0]["extra"] == SECRET_EXTRAS | PLAIN_EXTRAS
        assert "RT-secret" not in "\n".join(shown.out)
        # the other printing commands hide the same fields
        for command in (["credential", "get", "cred-00000"], ["credential", "list"]):
            printed = await anyio.to_thread.run_sync(
                functools.partial(run_refreshd, *command, env=cli_env(redis_url, 2))
            )
            assert printed.code == 0, printed.err
            for secret in secrets:
                assert secret not in printed.out + printed.err
            assert "https://acme.example" in printed.out


async def test_watch_masks_sealed_events_and_reveal_opens_them_with_the_ring(
    redis_url: str,
) -> None:
    """With a key ring the events carry ciphertext (``secrets: encrypted``):
    watch masks it like a clear token; ``--reveal`` opens it with the ring,
    and without the key shows it masked with the reason."""
    ring = f"k1:{generate_key()}"
    settings = make_settings(redis_url, partitions=2, encryption_keys=ring)
    async with FakeProvider() as provider, open_store(settings) as store:
        await seed(store, provider, 1, profile={"keep_fields": ["idToken", "instance_url"]})
        provider.inject(Fault("status", status=200, body={
            "access_token": "AT-sealed-value", "token_type": "Bearer", "expires_in": 3600,
            "refresh_token": "RT-sealed-value", "idToken": "ID-sealed-value",
            "instance_url": "https://acme.example",
        }))  # fmt: skip
        async with worker_running(settings):
            await wait_for(lambda: provider.stats.faults, within=20, what="the answer sent")
        masked = Watch(redis_url, "--since", "start", "--count", "1", partitions=2,
                       encryption_keys=ring)  # fmt: skip
        revealed = Watch(redis_url, "--since", "start", "--count", "1", "--reveal",
                         partitions=2, encryption_keys=ring)  # fmt: skip
        keyless = Watch(redis_url, "--since", "start", "--count", "1", "--reveal", partitions=2)
        for watcher in (masked, revealed, keyless):
            assert await anyio.to_thread.run_sync(watcher.finish) == 0, watcher.err
    [event] = masked.events()
    assert event["secrets"] == "encrypted"
    assert event["access_token"].startswith("[")
    assert event["extra"]["idToken"].startswith("[")
    assert event["extra"]["instance_url"] == "https://acme.example"
    [opened] = revealed.events()
    assert opened["access_token"] == "AT-sealed-value"
    assert opened["extra"] == {"idToken": "ID-sealed-value", "instance_url": "https://acme.example"}
    [unopened] = keyless.events()
    assert unopened["unreadable_secrets"] == "unknown_key"
    assert unopened["access_token"].startswith("[")
    for line in masked.out + masked.err + keyless.out + keyless.err:
        assert "sealed-value" not in line


async def test_watch_rides_out_a_redis_outage_without_losing_events(
    fresh_redis: RedisServer,
) -> None:
    url = fresh_redis.url
    settings = make_settings(url, partitions=2)
    async with FakeProvider() as provider:
        async with open_store(settings) as store:
            await seed(store, provider, 1)
        watcher = Watch(url, partitions=2)
        try:
            await watcher.wait_watching()
            fresh_redis.kill()
            await wait_for(lambda: any("unavailable" in x for x in watcher.err), within=20,
                           what="the outage line")  # fmt: skip
            await anyio.sleep(2.5)  # several reconnect attempts
            fresh_redis.start()
            async with open_store(settings) as store, worker_running(settings):
                await wait_for(lambda: watcher.out, within=20, what="the event after the outage")
            assert not watcher.dead()
        finally:
            watcher.stop()
        assert [e["credential_id"] for e in watcher.events()] == ["cred-00000"]
        outage = [x for x in watcher.err if "unavailable" in x]
        assert outage == ["watch: redis unavailable (StoreUnavailable); reconnecting"], watcher.err
        assert not any("Traceback" in x for x in watcher.err), watcher.err


async def test_a_trimmed_cursor_is_reported_by_the_group_reader_and_by_watch(
    redis_url: str,
) -> None:
    settings = make_settings(redis_url, partitions=1, event_log_max_length=50)
    async with (
        FakeProvider(FakeProviderConfig(lifetime_s=1)) as provider,
        open_store(settings) as store,
    ):
        log = EventLog(store.client, store.keys)
        group = log.group("g", "m1")
        async with anyio.create_task_group() as tg:
            tg.start_soon(generate, settings, store, provider, 400)
            await wait_for(lambda: store.client.xlen(store.keys.partition(0).log), within=10,
                           what="a first event")  # fmt: skip
            first = (await log.read(log.beginning(), count=1)).entries[0]
            early = await group.read(count=1)
            assert await group.ack(early.entries) == 1
        later = await group.read(count=1000)
        assert later.trimmed == (0,)  # the group lost events to retention, and is told
        assert later.entries  # and goes on with what is kept
        assert first.cursor is not None
        old = first.cursor.encode()
    watcher = Watch(redis_url, "--since", old, partitions=1)
    assert await anyio.to_thread.run_sync(watcher.finish) == 2
    notice, line = watcher.err  # "watching ...", then the one error line
    assert notice.startswith("watching the event log after 1:")
    assert line.startswith("refreshd: error: events were trimmed from the log before they were")
    assert line.endswith("to go on from the oldest event kept: --since 1:0")


async def test_with_the_log_off_watch_follows_pub_sub(redis_url: str) -> None:
    settings = make_settings(redis_url, partitions=2, event_log=False)
    async with FakeProvider() as provider, open_store(settings) as store:
        await seed(store, provider, 1)
        refused = Watch(redis_url, "--since", "start", partitions=2, event_log="false")
        assert await anyio.to_thread.run_sync(refused.finish) == 2
        assert refused.err == [
            "refreshd: error: --since reads the event log, which is off (REFRESHD_EVENT_LOG)"
        ]
        watcher = Watch(redis_url, "--count", "1", partitions=2, event_log="false")
        await watcher.wait_watching()
        assert watcher.err[0].startswith("watching live events on refreshd:events")
        async with worker_running(settings):
            assert await anyio.to_thread.run_sync(watcher.finish) == 0, watcher.err
        [event] = watcher.events()
        assert event["credential_id"] == "cred-00000"
        assert event["access_token"].startswith("[")
        assert "cursor" not in event


async def test_an_entry_not_written_by_refreshd_is_shown_not_fatal(redis_url: str) -> None:
    settings = make_settings(redis_url, partitions=1)
    async with open_store(settings) as store:
        fields = {"v": "1", "type": "odd", "id": "c9", "version": "1", "json": "{not json"}
        await store.client.xadd(store.keys.partition(0).log, fields)  # type: ignore[arg-type]
    watcher = Watch(redis_url, "--since", "start", "--count", "1", partitions=1)
    assert await anyio.to_thread.run_sync(watcher.finish) == 0, watcher.err
    [event] = watcher.events()
    assert event["unreadable"] is True
    assert (event["type"], event["credential_id"]) == ("odd", "c9")
