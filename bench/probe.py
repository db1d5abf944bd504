"""Passive instrumentation shared by the benchmark's worker processes
(refreshd's and arq's): count Redis round trips on the client side and
record (start time, lag) per refresh, and write them to a file on SIGUSR1.

A round trip is one write of a packed command buffer to a Redis socket:
a single command or a whole pipeline (redis-py's asyncio connection sends
each through ``send_packed_command`` exactly once). The patch adds one
function call per round trip; nothing else in the process changes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from array import array
from pathlib import Path
from typing import Any

__all__ = ["Probe"]


class Probe:
    def __init__(self, dump_path: str | None) -> None:
        self.dump_path = Path(dump_path) if dump_path else None
        self.round_trips = 0
        self.starts = array("d")  # wall-clock seconds at refresh start
        self.lags = array("d")  # seconds late against the scheduled time
        self.dumps = 0

    def count_redis_round_trips(self) -> None:
        from redis.asyncio.connection import AbstractConnection

        original = AbstractConnection.send_packed_command
        probe = self

        async def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
            probe.round_trips += 1
            await original(self, command, check_health)

        AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]

    def on_lag(self, lag_s: float) -> None:
        self.starts.append(time.time())
        self.lags.append(lag_s)

    def install_signal(self) -> None:
        """From here on SIGUSR1 writes the state; the first (seq 0) is written
        now, so the driver knows the handler is in place."""
        if self.dump_path is not None:
            signal.signal(signal.SIGUSR1, self._dump)
            self._dump()

    def _dump(self, _signum: int = 0, _frame: object = None) -> None:
        assert self.dump_path is not None
        state = {
            "seq": self.dumps,
            "pid": os.getpid(),
            "t": time.time(),
            "round_trips": self.round_trips,
            "starts": self.starts.tolist(),
            "lags": self.lags.tolist(),
        }
        tmp = self.dump_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.dump_path)
        self.dumps += 1
