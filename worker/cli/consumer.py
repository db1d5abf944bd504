"""`refreshd consumer script|acl`: what a non-Python application needs."""

from __future__ import annotations

import argparse
import sys

from worker.acl import acl_file
from worker.cli.common import load_settings
from worker.consumer_script import token_script_sha, token_script_source
from worker.keys import Keyspace

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "consumer",
        help="for applications outside Python: `script` prints the token script to "
        "SCRIPT LOAD (--sha: its SHA1), `acl` the Redis ACL users for applications",
    )
    p.add_argument("what", choices=["script", "acl"])
    p.add_argument("--sha", action="store_true", help="script: print its SHA1, not its source")
    p.set_defaults(handler=_consumer)


async def _consumer(args: argparse.Namespace) -> int:
    """Prints only: no Redis connection, so it runs where the app is built.
    The ACL follows REFRESHD_PREFIX and REFRESHD_PARTITIONS."""
    if args.what == "script":
        sys.stdout.write(token_script_sha() + "\n" if args.sha else token_script_source())
        return 0
    settings = load_settings()
    sys.stdout.write(acl_file(Keyspace(settings.prefix, settings.partitions)))
    return 0
