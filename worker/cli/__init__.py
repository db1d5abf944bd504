"""`refreshd` command line: the worker, the demo, and operator commands.

Output is JSON on stdout (``--table`` where a table helps); errors are one
line on stderr and a non-zero exit, never a traceback. Secrets are read
from a file, an environment variable or stdin, never from an argument
(arguments end up in shell history and ``ps``).
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence

import anyio

from worker.cli import credentials, ops, profiles
from worker.cli.common import Command, fail
from worker.errors import ConfigError, RefreshdError
from worker.settings import SETTINGS_DOC

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    epilog = "settings (environment variables):\n" + "\n".join(
        f"  {env:32} {help_}" + (f" [default: {default}]" if default else "")
        for env, default, help_ in SETTINGS_DOC
    )
    parser = argparse.ArgumentParser(
        prog="refreshd",
        description="Keeps OAuth credentials fresh ahead of expiry; a refresh token is "
        "never sent twice.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ops.register(sub)
    profiles.register(sub)
    credentials.register(sub)
    _no_abbreviations(parser)
    return parser


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """An abbreviated flag can be ambiguous (``--client-secret=…`` matched the
    -file/-env/-stdin options), and argparse's error would echo the value."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _no_abbreviations(child)


def _loop_options() -> dict[str, bool]:
    """uvloop where it is installed (not on Windows): the asyncio loop's own
    overhead was a fifth of the worker's CPU per refresh."""
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = args.handler
    try:
        return anyio.run(command, args, backend="asyncio", backend_options=_loop_options())
    except KeyboardInterrupt:
        return 130
    except ConfigError as exc:
        return fail(str(exc), code=2)
    except RefreshdError as exc:
        return fail(str(exc))
