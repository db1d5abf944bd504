"""`refreshd` command line: the worker, the demo, and operator commands.

Output is JSON on stdout (``--table`` where a table helps); errors are one
line on stderr and a non-zero exit, never a traceback. Secrets are read
from a file, an environment variable or stdin, never from an argument
(arguments end up in shell history and ``ps``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback
from collections.abc import Sequence
from typing import cast

import anyio
from redis import exceptions as redis_errors

from worker import __version__
from worker.cli import cluster, consumer, credentials, key, ops, profiles
from worker.cli.common import CliParser, Command, fail
from worker.errors import ConfigError, RefreshdError
from worker.settings import SETTINGS_DOC

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    epilog = "settings (environment variables):\n" + "\n".join(
        f"  {env:32} {help_}" + (f" [default: {default}]" if default else "")
        for env, default, help_ in SETTINGS_DOC
    )
    parser = CliParser(
        prog="refreshd",
        description="Keeps OAuth credentials fresh ahead of expiry; a refresh token is "
        "never sent twice.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"refreshd {__version__}")
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
    )
    ops.register(sub)
    profiles.register(sub)
    credentials.register(sub)
    consumer.register(sub)
    key.register(sub)
    cluster.register(sub)
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
    """Exit codes: 0 done, 1 a refused or failed operation (Redis away, not
    found, conflict, a failed refresh), 2 bad input (arguments, settings,
    files), 70 an internal error (a bug: a first line says so, then the
    traceback to report), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = args.handler
    try:
        return anyio.run(command, args, backend="asyncio", backend_options=_loop_options())
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # every error ends here, as one line
        if isinstance(exc, SystemExit):
            raise
        return _report(exc)


def _report(exc: BaseException) -> int:
    """One line for every expected error, even one wrapped in a task group's
    ExceptionGroup (the worker runs its services in one)."""
    leaf = _expected(exc)
    if isinstance(leaf, KeyboardInterrupt):
        return 130
    if isinstance(leaf, ConfigError):
        return fail(str(leaf), code=2)
    if isinstance(leaf, RefreshdError):
        return fail(str(leaf))
    if isinstance(leaf, redis_errors.NoPermissionError):
        return fail(f"the Redis user lacks a permission refreshd needs: {_first_line(leaf)}")
    if isinstance(leaf, redis_errors.RedisError):
        return fail(f"redis refused the command: {type(leaf).__name__}: {_first_line(leaf)}")
    print(
        f"refreshd: internal error ({type(exc).__name__}); this is a bug, please report it "
        "with the traceback below",
        file=sys.stderr,
    )
    traceback.print_exception(exc)
    return 70


def _expected(exc: BaseException) -> BaseException | None:
    """The one expected error an exception (group) stands for, or None."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [leaf for sub in exc.exceptions if (leaf := _expected(sub)) is not None]
        unexpected = [sub for sub in exc.exceptions if _expected(sub) is None]
        return leaves[0] if leaves and not unexpected else None
    if isinstance(exc, RefreshdError | redis_errors.RedisError | KeyboardInterrupt):
        return exc
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]
