"""The demo's consumer: follows the event log through ``worker.client``, reads min-TTL tokens.

``refreshd demo`` runs it as a separate process, SIGKILLs it once during the
run and starts it again: what an application built on the client library
goes through. Its only state is its events file, one line per event
(``<credential id> <version> <type> <cursor>``). After a kill, the next run
drops a torn last line and resumes from the cursor of the last complete
one, so each event is written exactly once, and none is missed while the
process is down (the log kept them).

Meanwhile it reads ``reads`` tokens with ``get(id, min_ttl=...)``, spread
over ``spread`` seconds, one line each in the reads file (``<credential id>
<version before> <version after> ok|<error>``). A token with less than
``min_ttl`` left makes the workers refresh it at once (one provider request
whoever asks); the read then returns the new token.

    python -m worker.democonsumer EVENTS READS CREDENTIALS MIN_TTL READS SPREAD

Settings (``REFRESHD_REDIS_URL``, ``REFRESHD_PREFIX``, ...) come from the
environment, as for every ``refreshd`` command.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.abc

from worker.client import Client, ClientError, Cursor, connect

__all__ = ["ConsumerProcess", "main", "resume_point"]


def resume_point(path: Path) -> str:
    """The cursor after the last event fully written ("start" if none);
    a torn last line (killed mid-write) is cut off: its event comes again."""
    data = path.read_bytes() if path.exists() else b""
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    if not complete:
        return "start"
    return complete.rstrip(b"\n").rsplit(b"\n", 1)[-1].decode().split(" ")[3]


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def follow(client: Client, events: Path) -> None:
    since = resume_point(events)
    fd = os.open(events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        async for entry in client.events(since=since, count=500, block=1.0):
            assert isinstance(entry.cursor, Cursor)
            line = f"{entry.credential_id} {entry.version} {entry.type} {entry.cursor}\n"
            os.write(fd, line.encode())  # one write: whole, or torn and cut at restart
    finally:
        os.close(fd)


async def read_fresh(
    client: Client, out: Path, credentials: int, min_ttl: float, reads: int, spread: float
) -> None:
    done = _count_lines(out)  # across restarts
    rng = random.Random()
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        for _ in range(done, reads):
            await anyio.sleep(spread / reads)
            cred_id = f"demo-{rng.randrange(credentials):06d}"
            before = (await client.get(cred_id, min_ttl=None)).version
            try:
                after = (await client.get(cred_id, min_ttl=min_ttl, timeout=5)).version
                line = f"{cred_id} {before} {after} ok\n"
            except ClientError as exc:
                line = f"{cred_id} {before} - {type(exc).__name__}\n"
            os.write(fd, line.encode())
    finally:
        os.close(fd)


async def main(
    events: Path, reads_file: Path, credentials: int, min_ttl: float, reads: int, spread: float
) -> None:
    async with connect() as client, anyio.create_task_group() as tg:
        tg.start_soon(read_fresh, client, reads_file, credentials, min_ttl, reads, spread)
        await follow(client, events)


# ------------------------------------------------------- the demo's side


class ConsumerProcess:
    """The demo's handle on the consumer process: start it, SIGKILL and
    restart it, stop it, and read what it received from its files."""

    def __init__(
        self, workdir: Path, env: dict[str, str], *, credentials: int, min_ttl: float,
        reads: int, spread: float,
    ) -> None:  # fmt: skip
        self.events = workdir / "events.txt"
        self.reads = workdir / "reads.txt"
        self._stderr = workdir / "consumer.err"
        self._env = env
        self._argv = [sys.executable, "-m", "worker.democonsumer", str(self.events),
                      str(self.reads), str(credentials), f"{min_ttl:g}", str(reads),
                      f"{spread:g}"]  # fmt: skip
        self._proc: anyio.abc.Process | None = None
        self.kills = 0

    async def start(self) -> None:
        with self._stderr.open("ab") as err:
            self._proc = await anyio.open_process(
                self._argv, env=self._env, stdout=subprocess.DEVNULL, stderr=err
            )

    async def kill_and_restart(self, down_s: float = 0.5) -> None:
        """SIGKILL: no chance to save anything; the restart resumes from its file."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGKILL)
        await self._proc.wait()
        self.kills += 1
        await anyio.sleep(down_s)  # events keep coming while it is down
        await self.start()

    async def stop(self) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        self._proc.terminate()
        with anyio.move_on_after(5, shield=True):
            await self._proc.wait()
            return
        self._proc.kill()
        with anyio.CancelScope(shield=True):
            await self._proc.wait()

    def failed(self) -> str | None:
        """The last lines it wrote on stderr, if it died on its own."""
        if self._proc is None or self._proc.returncode is None:
            return None
        tail = self._stderr.read_text(errors="replace").strip().splitlines()[-5:]
        return "\n".join(tail) or f"exit code {self._proc.returncode}"

    def received(self) -> dict[str, list[int]]:
        """Versions of the ``token.refreshed`` events received, by credential."""
        seen: dict[str, list[int]] = {}
        data = self.events.read_bytes() if self.events.exists() else b""
        for line in data.decode(errors="replace").splitlines():
            parts = line.split(" ")
            if len(parts) == 4 and parts[2] == "token.refreshed" and parts[1].isdigit():
                seen.setdefault(parts[0], []).append(int(parts[1]))
        return seen

    def reads_made(self) -> int:
        return _count_lines(self.reads)

    def lines(self) -> int:
        return _count_lines(self.events)

    def caught_up(self, versions: dict[str, int]) -> bool:
        seen = self.received()
        return all(max(seen.get(c, [0])) >= v for c, v in versions.items())

    def report(self, versions: dict[str, int]) -> dict[str, int]:
        """Events received against commits (every commit adds one version)."""
        seen = self.received()
        commits = {(c, v) for c, top in versions.items() for v in range(1, top + 1)}
        got = [(c, v) for c, vs in seen.items() for v in vs]
        reads = self.reads.read_text().splitlines() if self.reads.exists() else []
        served = [r.split(" ") for r in reads if r.endswith(" ok")]
        return {
            "commits": len(commits),
            "events_received": len(got),
            "events_missing": len(commits - set(got)),
            "events_duplicated": len(got) - len(set(got)),
            "consumer_kills": self.kills,
            "min_ttl_reads": len(served),
            "min_ttl_reads_refreshed": sum(1 for r in served if int(r[2]) > int(r[1])),
            "min_ttl_read_errors": len(reads) - len(served),
        }


if __name__ == "__main__":
    events, reads_file, credentials, min_ttl, reads, spread = sys.argv[1:7]
    anyio.run(main, Path(events), Path(reads_file), int(credentials), float(min_ttl),
              int(reads), float(spread), backend="asyncio")  # fmt: skip
