"""The README's promises that a test can keep true."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from worker.settings import SETTINGS_DOC

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    documented = set(re.findall(r"`(REFRESHD_[A-Z_]+)`", README))
    assert {env for env, _, _ in SETTINGS_DOC} <= documented
    assert documented <= {env for env, _, _ in SETTINGS_DOC}, "README names a setting that is gone"


def test_the_first_two_commands_exist() -> None:
    block = README.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M)
    assert re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _python_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    [block] = [b for b in blocks if marker in b]
    return str(block)


@pytest.mark.anyio
async def test_the_event_log_example_runs_and_resumes(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """README "Event log (durable)": the Python consumer, as written."""
    from tests.harness import make_settings
    from tests.test_eventlog import refresh_all_once
    from worker.app import open_store
    from worker.fakeprovider import FakeProvider

    settings = make_settings(redis_url)
    async with FakeProvider() as provider, open_store(settings) as store:
        await refresh_all_once(settings, store, provider, 3)
    scope: dict[str, Any] = {}
    exec(compile(_python_block("async def consume"), "README.md", "exec"), scope)  # noqa: S102
    cursor = await scope["consume"](redis_url, None)
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == [f"cred-0000{n} 1 token.refreshed" for n in range(3)]
    assert await scope["consume"](redis_url, cursor) == cursor  # nothing new after it
    assert capsys.readouterr().out == ""
