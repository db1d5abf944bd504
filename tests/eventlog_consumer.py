"""A consumer process for the kill tests: follows the event log and appends
one line per event (credential id, version, type, then the cursor that
resumes after it) to a file. The file is the consumer's only state: after a
SIGKILL, the next run drops a torn last line and resumes from the cursor of
the last complete one, so each event is written exactly once.

Usage: python -m tests.eventlog_consumer REDIS_URL PARTITIONS OUTFILE
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio

from worker.eventlog import Cursor, EventLog
from worker.keys import Keyspace
from worker.redisio import connect


def resume_point(path: Path, partitions: int) -> Cursor:
    data = path.read_bytes() if path.exists() else b""
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as f:  # a torn last line: the event was not processed
            f.truncate(len(complete))
    if not complete:
        return Cursor.beginning(partitions)
    last = complete.rstrip(b"\n").rsplit(b"\n", 1)[-1].decode()
    return Cursor.parse(last.split(" ")[3], partitions)


async def main(url: str, partitions: int, out: Path) -> None:
    cursor = resume_point(out, partitions)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    async with connect(url, max_connections=4) as client:
        log = EventLog(client, Keyspace(partitions=partitions))
        async for entry in log.follow(cursor, count=500, block_ms=1000):
            assert entry.cursor is not None
            line = f"{entry.credential_id} {entry.version} {entry.type} {entry.cursor.encode()}\n"
            os.write(fd, line.encode())


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
