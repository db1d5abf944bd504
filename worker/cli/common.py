"""Helpers shared by the CLI commands: settings, output, secret input."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from worker.errors import ConfigError
from worker.logs import configure_logging
from worker.settings import Settings

__all__ = [
    "CliParser",
    "Command",
    "RefuseInlineSecret",
    "bounded",
    "emit",
    "fail",
    "flag_value",
    "human_number",
    "load_settings",
    "positive_int",
    "read_secret",
    "table",
]

Command = Callable[[argparse.Namespace], Awaitable[int]]


def load_settings(*, log_to_stderr: bool = True) -> Settings:
    """Operator commands log to stderr so stdout stays machine-readable."""
    settings = Settings.from_env()
    configure_logging(
        settings.log_level, settings.log_format, stream=sys.stderr if log_to_stderr else sys.stdout
    )
    return settings


def emit(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def table(rows: Sequence[dict[str, Any]], columns: Iterable[str]) -> None:
    cols = list(columns)
    cells = [[str(row.get(c, "")) for c in cols] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


class CliParser(argparse.ArgumentParser):
    """Usage errors are one line, like every other error: argparse's own
    prints the whole usage block first (30 lines for ``profile create``).
    Subcommand parsers are built from the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"refreshd: error: {self.prog}: {message} (see {self.prog} --help)\n")


def bounded(kind: Callable[[str], float], low: float, high: float) -> Callable[[str], Any]:
    """argparse type: a number of ``kind`` between ``low`` and ``high``."""

    def parse(raw: str) -> Any:
        try:
            value = kind(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {raw!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be between {human_number(low)} and {human_number(high)}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def human_number(value: float) -> str:
    """1,000,000 rather than 1e+06 (what ``:g`` prints past six digits)."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,}"


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def flag_value(raw: str) -> bool:
    """argparse type of a yes/no knob given a value (``--allow-http true``);
    the bare flag means true."""
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"true or false, not {raw!r}")


def positive_int(raw: str) -> int:
    """argparse type: 1 or more."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


class RefuseInlineSecret(argparse.Action):
    """``--client-secret VALUE`` would land in shell history and ``ps``; the
    error names the safe options and never repeats the value."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        flag = self.dest.replace("_", "-")
        parser.error(
            f"secrets are never taken from arguments; use --{flag}-file, --{flag}-env or "
            f"--{flag}-stdin"
        )


def fail(message: str, *, code: int = 1) -> int:
    print(f"refreshd: error: {message}", file=sys.stderr)
    return code


def add_secret_options(parser: argparse.ArgumentParser, name: str) -> None:
    flag = name.replace("_", "-")
    parser.add_argument(
        f"--{flag}", dest=name, nargs="?", action=RefuseInlineSecret, help=argparse.SUPPRESS
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{flag}-file", metavar="PATH", help=f"read {name} from a file")
    group.add_argument(f"--{flag}-env", metavar="VAR", help=f"read {name} from an env variable")
    group.add_argument(
        f"--{flag}-stdin", action="store_true", help=f"read {name} from standard input"
    )


def read_secret(args: argparse.Namespace, name: str) -> str | None:
    """The secret named ``name`` from whichever source was given, or None."""
    path = getattr(args, f"{name}_file", None)
    env = getattr(args, f"{name}_env", None)
    if path:
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {name} from {path}: {exc.strerror}") from None
    elif env:
        if env not in os.environ:
            raise ConfigError(f"environment variable {env} (for {name}) is not set")
        value = os.environ[env].strip()
    elif getattr(args, f"{name}_stdin", False):
        value = sys.stdin.readline().strip()
    else:
        return None
    if not value:
        raise ConfigError(f"{name} is empty")
    return value
