"""The README's promises that a test can keep true."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from worker.embedded import stop_embedded
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


# -- the examples run as written ----------------------------------------------

#: a command whose comment says one of these is shown, not run: it runs until
#: stopped, or it needs the provider's real endpoint
NOT_RUN = ("runs until Ctrl-C", "needs the real provider")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def _sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def _commands(block: str) -> list[str]:
    """Each command of a block, continuation lines joined, comments kept
    (the shell ignores them); the ones marked NOT_RUN left out."""
    commands: list[str] = []
    pending = ""
    for line in block.splitlines():
        pending += line + "\n"
        if line.rstrip().endswith("\\"):
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            commands.append(pending)
        pending = ""
    return [c for c in commands if not any(marker in c for marker in NOT_RUN)]


def test_examples_are_one_command_per_json_line() -> None:
    """A JSON object split over two lines imports nothing (issue 14, finding 7)."""
    for block in _sh_blocks(_section("Using it")) + _sh_blocks(_section("Providers")):
        for command in _commands(block):
            for payload in re.findall(r"echo '(\{.*?)'", command, re.S):
                assert "\n" not in payload, payload
                json.loads(payload)


def test_using_it_and_provider_examples_run_as_written(tmp_path: Path) -> None:
    """Pasted into a shell from a fresh clone (``.venv`` in the working
    directory), against the embedded server: every command but the few
    marked NOT_RUN succeeds, and the credentials they import are there."""
    blocks = _sh_blocks(_section("Using it")) + _sh_blocks(_section("Providers"))
    commands = [c for block in blocks for c in _commands(block)]
    skipped = sum(len(re.findall("|".join(NOT_RUN), block)) for block in blocks)
    assert 0 < skipped <= 4, "mark only the commands that cannot run here"
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    env |= {"REFRESHD_DATA_DIR": str(tmp_path / "data"), "REFRESHD_LOG_LEVEL": "error"}
    script = "set -euo pipefail\n" + "".join(commands)
    try:
        done = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        listed = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "refreshd"), "credential", "list"],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        ids = [row["id"] for row in json.loads(listed.stdout)["result"]]
        assert ids == ["acme-42", "ap-321", "csp-org1", "key-9", "svc-1"]
    finally:
        stop_embedded(tmp_path / "data")


def test_links_point_inside_the_repository() -> None:
    for target in re.findall(r"`((?:shared|docs)/[\w./-]+\.md)`", README):
        assert (ROOT / target).exists(), f"README names {target}, which is not in the repository"
    for target in re.findall(r"\]\(((?!https?:|#)[^)]+)\)", README):
        assert (ROOT / target.split("#")[0]).exists(), target


def test_events_table_names_every_field_an_event_carries() -> None:
    """`extra` was missing; `retry_at` was listed for every failure type."""
    table = _section("Events (for consumers)")
    rows = {m for m in re.findall(r"^\| `(\w+)`", table, re.M)}
    assert {"schema", "type", "version", "warnings", "extra", "reason", "retry_at", "ts"} <= rows
    assert "on `token.failed` only" in table
    assert "`transport_error`" in table


def test_exit_codes_are_documented() -> None:
    using = _section("Using it")
    assert "**Exit codes.**" in using
    assert "`refreshd credential refresh ID` exits `0`" in using


def test_license_is_an_spdx_string() -> None:
    """A TOML table made pip warn three times per install (setuptools >= 77
    reads the string form, PEP 639)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]


def test_json_examples_parse_and_events_match_what_is_published() -> None:
    """Every line of a JSON example is a JSON object; the event examples
    carry exactly the fields refreshd publishes for their type."""
    from worker.events import EventType, build_event

    examples = [
        json.loads(line)
        for block in re.findall(r"```json\n(.*?)```", README, re.S)
        for line in block.splitlines()
        if line.strip()
    ]
    events = [e for e in examples if "credential_id" in e]
    assert {e["type"] for e in events} == {"token.refreshed", "token.failed"}
    for event in events:
        kind = EventType(event["type"])
        built = json.loads(
            build_event(
                kind,
                credential_id="c",
                profile="p",
                version=1,
                ts_ms=1,
                access_token="a",
                reason="r",
                retry_at_ms=2,
                failures=1,
            )
        )
        assert set(event) == set(built), kind


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


#: the README's quick start (the first block): CI runs `make test` itself,
#: and `make demo` is the first thing anyone runs
_QUICK_START = "make demo"
_SHOWN_ONLY = "<!-- not run by the tests: needs docker and a Kubernetes cluster"


def test_every_shell_block_is_run_or_marked_and_its_paths_exist() -> None:
    """Issue 14: every shell example runs (Using it, Providers: see
    test_using_it_and_provider_examples_run_as_written), is the quick start,
    or is marked as needing what no test machine has; a marked block's
    repository paths must exist, so a renamed overlay breaks this test."""
    run = set(_sh_blocks(_section("Using it")) + _sh_blocks(_section("Providers")))
    run |= set(_sh_blocks(_section("Encryption at rest")))
    checked = 0
    for match in re.finditer(r"```sh\n(.*?)```", README, re.S):
        block = match.group(1)
        if block in run or block.startswith(_QUICK_START):
            continue
        before = README[: match.start()].rstrip().rsplit("\n", 1)[-1]
        assert before.startswith(_SHOWN_ONLY), f"shell block neither run nor marked:\n{block}"
        for path in re.findall(r"(?:-k|-f)\s+([\w./-]+)", block):  # kubectl's file arguments
            assert (ROOT / path).exists(), f"README names {path}, which is not in the repository"
            checked += 1
    assert checked >= 3  # the overlays and the profile job


def test_the_encryption_setup_example_makes_a_ring_refreshd_reads(tmp_path: Path) -> None:
    """The key generation lines of "Encryption at rest", run as written:
    the file they leave is a one-key ring, readable by its owner only."""
    from worker.keyring import AesGcmCodec, codec_from_settings
    from worker.settings import Settings

    (block,) = _sh_blocks(_section("Encryption at rest"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHD_")}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}"  # an activated venv
    script = block + 'echo "$REFRESHD_ENCRYPTION_KEYS_FILE"\n'
    done = subprocess.run(["bash", "-euc", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=True, timeout=30)  # fmt: skip
    path = Path(done.stdout.strip())
    assert path == tmp_path / "refreshd-keys"
    assert path.stat().st_mode & 0o777 == 0o600
    codec = codec_from_settings(Settings.from_env({"REFRESHD_ENCRYPTION_KEYS_FILE": str(path)}))
    assert isinstance(codec, AesGcmCodec)
    assert codec.ring.ids == ("k1",)
