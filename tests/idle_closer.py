"""An HTTP/1.1 token endpoint that closes idle keep-alive connections at
random times (its own process: ``python -m tests.idle_closer``).

Servers close idle connections whenever they like (an idle timeout, a
restart, a load balancer's drain), and a close can cross a request that a
client has just written on the same connection. This one does it on
purpose and remembers the ``refresh_token`` of every request it has read
whole, so a test can tell a request the server never read (the client may
say "not sent") from one it did (the client must say "unknown" or have the
answer).

A request whose refresh token starts with ``swallow`` is read and then
answered by a close (a server that crashed after reading it): the client
must call that an unknown outcome. ``GET /seen`` answers the refresh
tokens read so far, one per line.
Prints ``PORT <n>`` once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
from urllib.parse import parse_qsl

__all__ = ["serve"]


class _Closer(asyncio.Protocol):
    def __init__(self, seen: list[str], min_idle_s: float, max_idle_s: float) -> None:
        self.seen = seen
        self.min_idle_s = min_idle_s
        self.max_idle_s = max_idle_s
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        delay = random.uniform(self.min_idle_s, self.max_idle_s)
        self.timer = asyncio.get_running_loop().call_later(delay, self._close)

    def _close(self) -> None:
        if self.transport is not None and not self.buffer:
            self.transport.close()  # unread bytes in the kernel: the peer gets a reset

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            body, self.buffer = rest[:length], rest[length:]
            self._answer(head.split(b" ", 2)[1], body)
        if not self.buffer:
            self._arm()

    def _answer(self, path: bytes, body: bytes) -> None:
        assert self.transport is not None
        if path == b"/seen":
            payload = "\n".join(self.seen).encode()
        else:
            form = dict(parse_qsl(body.decode()))
            token = form.get("refresh_token", "")
            self.seen.append(token)
            if token.startswith("swallow"):
                self.transport.close()
                return
            payload = b'{"access_token": "at", "token_type": "Bearer", "expires_in": 3600}'
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(payload)
            + payload
        )


async def serve(port: int, min_idle_s: float, max_idle_s: float) -> None:
    seen: list[str] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Closer(seen, min_idle_s, max_idle_s), "127.0.0.1", port
    )
    print("PORT", server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--min-idle", type=float, default=0.0)
    parser.add_argument("--max-idle", type=float, default=0.3)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.min_idle, args.max_idle))
    sys.exit(0)


if __name__ == "__main__":
    main()
