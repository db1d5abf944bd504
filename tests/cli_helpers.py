"""Driving `refreshd` in tests: in-process (``worker.cli.main`` with captured
output), as a subprocess, and against a FakeProvider served from a thread.

``main`` runs its own event loop, so tests that use it are synchronous; the
FakeProvider then lives on an anyio blocking portal (its own loop, its own
thread) and is reached through ``ProviderThread``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
import redis
from anyio.from_thread import BlockingPortal, start_blocking_portal

from worker.cli import main
from worker.fakeprovider import FakeProvider, FakeProviderConfig, Fault, GrantState, IssuedGrant

__all__ = [
    "REFRESHD",
    "Cli",
    "ProviderThread",
    "Result",
    "cred_line",
    "provider_thread",
    "raw_redis",
    "run_refreshd",
    "stored_records",
    "wait_until",
    "write_jsonl",
]

T = TypeVar("T")

#: the installed console script (proves the entry point works)
REFRESHD = str(Path(sys.executable).with_name("refreshd"))


@dataclass(frozen=True, slots=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def error_line(self) -> str:
        """The single line an error leaves on stderr (asserts there is exactly one)."""
        lines = self.err.splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got {self.err!r}"
        return lines[0]


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    return 1


@dataclass
class Cli:
    """Calls ``worker.cli.main`` in-process and keeps every byte it printed,
    so a test can check that a secret never appeared anywhere."""

    capsys: pytest.CaptureFixture[str]
    monkeypatch: pytest.MonkeyPatch
    transcript: list[str] = field(default_factory=list)

    def __call__(self, *argv: str, stdin: str | None = None) -> Result:
        self.capsys.readouterr()
        with self.monkeypatch.context() as patch:
            if stdin is not None:
                import io

                patch.setattr(sys, "stdin", io.StringIO(stdin))
            try:
                code = main(list(argv))
            except SystemExit as exc:  # argparse: --help, usage errors
                code = _exit_code(exc)
        captured = self.capsys.readouterr()
        self.transcript += [captured.out, captured.err]
        return Result(code, captured.out, captured.err)

    def ok(self, *argv: str, stdin: str | None = None) -> Any:
        """Run a command that must succeed; returns its JSON output."""
        result = self(*argv, stdin=stdin)
        assert result.code == 0, (argv, result)
        assert "Traceback" not in result.err
        return result.json()

    def fails(self, code: int, *argv: str, stdin: str | None = None) -> str:
        """Run a command that must fail with ``code`` and a one-line error;
        returns that line (without the ``refreshd: error: `` prefix)."""
        result = self(*argv, stdin=stdin)
        assert result.code == code, (argv, result)
        assert "Traceback" not in result.err, result.err
        assert result.out == "", result.out
        line = result.error_line
        assert line.startswith("refreshd: error: "), line
        return line.removeprefix("refreshd: error: ")

    @property
    def everything(self) -> str:
        return "".join(self.transcript)


def run_refreshd(
    *argv: str,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 20.0,
    executable: Iterable[str] = (sys.executable, "-m", "worker"),
) -> Result:
    """The CLI as a real process (``python -m worker`` unless told otherwise)."""
    proc = subprocess.run(
        [*executable, *argv],
        env=dict(os.environ if env is None else env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@contextmanager
def raw_redis(url: str) -> Iterator[redis.Redis]:
    """A plain client on the real server, to look behind the CLI's back."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


def stored_records(url: str, ids: list[str]) -> list[dict[str, str]]:
    """The credential records as stored (secrets encoded), read behind the
    CLI's back through the store's own script (records are packed values)."""
    from tests.harness import make_settings
    from worker.app import open_store

    async def read() -> list[dict[str, str]]:
        async with open_store(make_settings(url)) as store:
            return await store.many_raw_fields(ids)

    return anyio.run(read)


def cred_line(cred_id: str, profile: str, n: int | str, **extra: Any) -> dict[str, Any]:
    """An import line whose tokens are unique and recognisable (AT-<n>, RT-<n>)."""
    line: dict[str, Any] = {
        "id": cred_id,
        "profile": profile,
        "access_token": f"AT-{n}-9f3c1e",
        "refresh_token": f"RT-{n}-4b7d2a",
        "expires_in": 3600,
    }
    return line | extra


def write_jsonl(path: Path, lines: Iterable[dict[str, Any] | str]) -> Path:
    path.write_text(
        "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines)
    )
    return path


def wait_until(predicate: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class ProviderThread:
    """A FakeProvider on its own loop in a portal thread. Every access to its
    state goes through the portal, so it never races the server's handlers."""

    portal: BlockingPortal
    provider: FakeProvider

    @property
    def url(self) -> str:
        return self.portal.call(lambda: self.provider.url)

    @property
    def config(self) -> FakeProviderConfig:
        return self.provider.config

    def issue_grant(self) -> IssuedGrant:
        return self.portal.call(self.provider.issue_grant)

    def grant_state(self, grant_id: str) -> GrantState:
        return self.portal.call(self.provider.grant_state, grant_id)

    def inject(self, fault: Fault) -> None:
        self.portal.call(self.provider.inject, fault)

    def send_counts(self) -> dict[str, int]:
        return self.portal.call(lambda: dict(self.provider.send_counts))


@contextmanager
def provider_thread(config: FakeProviderConfig | None = None) -> Iterator[ProviderThread]:
    with (
        start_blocking_portal(backend="asyncio") as portal,
        portal.wrap_async_context_manager(FakeProvider(config)) as provider,
    ):
        yield ProviderThread(portal, provider)
