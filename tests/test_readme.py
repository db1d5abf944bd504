"""The README's promises that a test can keep true."""

from __future__ import annotations

import re
from pathlib import Path

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
