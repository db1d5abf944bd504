"""A fast local OAuth token endpoint for the benchmark (its own process).

A minimal HTTP/1.1 server on ``asyncio.Protocol``: keep-alive, requests
framed by Content-Length, no chunked bodies (clients here never send
them). ``POST /token`` with ``grant_type=refresh_token`` answers the way a
rotating provider does: a fresh ~800-character access token, a new refresh
token, ``expires_in``. It remembers every refresh token it has accepted, so
a second presentation is counted (``reuse``) and refused with
``invalid_grant``, as a strict provider would; the benchmark fails if any
refresh token is ever presented twice.

Control endpoints (for the benchmark driver, same port):

- ``GET /stats``: requests, reuse, unknown tokens, this process's CPU
  seconds, and the refresh count per 100 ms bin since the last reset;
- ``POST /reset?expires_in=S``: zero the counters and set the lifetime
  the next answers carry.

Run: ``python -m bench.endpoint --port 0`` prints ``PORT <n>`` once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import sys
import time
from urllib.parse import parse_qsl, urlsplit

__all__ = ["ACCESS_TOKEN_CHARS", "SEED_PREFIX", "serve"]

ACCESS_TOKEN_CHARS = 800
#: Refresh tokens the benchmark seeds start with this; the endpoint accepts
#: them once, like the tokens it issues itself.
SEED_PREFIX = "rt0."
_ISSUED_PREFIX = "rt1."
_MAX_HEAD = 16 * 1024
_MAX_BODY = 64 * 1024


class _State:
    def __init__(self) -> None:
        self.expires_in = 3600
        self.spent: set[str] = set()
        self.reset()
        self._counter = 0
        self._random = os.urandom(1 << 16)

    def reset(self) -> None:
        self.requests = 0
        self.refreshes = 0
        self.reuse = 0
        self.unknown = 0
        self.bad = 0
        self.t0 = time.time()
        self.cpu0 = time.process_time()
        self.bins: dict[int, int] = {}

    def new_tokens(self) -> tuple[str, str]:
        """An 800-character access token and a ~100-character refresh token,
        both unique; cheap to make so the endpoint stays far from the limit."""
        self._counter += 1
        n = self._counter
        off = (n * 7919) % (len(self._random) - 600)
        body = base64.urlsafe_b64encode(self._random[off : off + 600]).decode()
        access = f"at.{n:012d}.{body}"[:ACCESS_TOKEN_CHARS]
        refresh = f"{_ISSUED_PREFIX}{n:012d}.{body[:84]}"
        return access, refresh

    def refresh(self, token: str) -> tuple[int, bytes]:
        self.requests += 1
        if token in self.spent:
            self.reuse += 1
            return 400, b'{"error":"invalid_grant","error_description":"refresh token reused"}'
        if not token.startswith((SEED_PREFIX, _ISSUED_PREFIX)):
            self.unknown += 1
            return 400, b'{"error":"invalid_grant","error_description":"unknown refresh token"}'
        self.spent.add(token)
        self.refreshes += 1
        b = int((time.time() - self.t0) * 10)
        self.bins[b] = self.bins.get(b, 0) + 1
        access, refresh = self.new_tokens()
        body = (
            f'{{"access_token":"{access}","token_type":"Bearer","expires_in":{self.expires_in},'
            f'"refresh_token":"{refresh}","scope":"read write"}}'
        )
        return 200, body.encode()

    def stats(self) -> dict[str, object]:
        cpu = time.process_time() - self.cpu0
        return {
            "requests": self.requests,
            "refreshes": self.refreshes,
            "reuse": self.reuse,
            "unknown": self.unknown,
            "bad": self.bad,
            "cpu_s": cpu,
            "cpu_ms_per_request": 1000 * cpu / self.requests if self.requests else None,
            "since": self.t0,
            "bins_100ms": sorted(self.bins.items()),
            "pid": os.getpid(),
        }


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}


class _Http(asyncio.Protocol):
    def __init__(self, state: _State) -> None:
        self.state = state
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self._close_bad()
                    return
                break
            head = bytes(self.buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, _version = lines[0].split(" ", 2)
            except ValueError:
                self._close_bad()
                return
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                lname = name.strip().lower()
                if lname == "content-length":
                    length = int(value.strip() or 0)
                elif lname == "connection" and value.strip().lower() == "close":
                    close = True
                elif lname == "transfer-encoding":
                    self._close_bad()
                    return
            if length > _MAX_BODY:
                self._close_bad()
                return
            total = end + 4 + length
            if len(self.buf) < total:
                break
            body = bytes(self.buf[end + 4 : total])
            del self.buf[:total]
            status, payload, ctype = self._handle(method, target, body)
            out.append(
                b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                b"Cache-Control: no-store\r\n%s\r\n"
                % (
                    status,
                    _REASONS.get(status, b"Error"),
                    ctype,
                    len(payload),
                    b"Connection: close\r\n" if close else b"",
                )
                + payload
            )
            if close:
                assert self.transport is not None
                self.transport.write(b"".join(out))
                self.transport.close()
                return
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _close_bad(self) -> None:
        self.state.bad += 1
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self.transport.close()
        self.buf.clear()

    def _handle(self, method: str, target: str, body: bytes) -> tuple[int, bytes, bytes]:
        json_type = b"application/json"
        path = urlsplit(target)
        if path.path == "/token":
            if method != "POST":
                return 405, b'{"error":"invalid_request"}', json_type
            params = dict(parse_qsl(body.decode("latin-1")))
            if params.get("grant_type") != "refresh_token" or "refresh_token" not in params:
                self.state.bad += 1
                return 400, b'{"error":"unsupported_grant_type"}', json_type
            status, payload = self.state.refresh(params["refresh_token"])
            return status, payload, json_type
        if path.path == "/stats":
            return 200, json.dumps(self.state.stats()).encode(), json_type
        if path.path == "/reset" and method == "POST":
            query = dict(parse_qsl(path.query))
            if "expires_in" in query:
                self.state.expires_in = int(float(query["expires_in"]))
            self.state.reset()
            return 200, b'{"ok":true}', json_type
        return 404, b'{"error":"not_found"}', json_type


async def serve(port: int, *, ready: asyncio.Future[int] | None = None) -> None:
    loop = asyncio.get_running_loop()
    state = _State()
    server = await loop.create_server(
        lambda: _Http(state), "127.0.0.1", port, backlog=1024, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready.set_result(bound)
    print(f"PORT {bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
