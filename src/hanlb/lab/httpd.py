"""The lab's backend server: a small HTTP/1.1 server plus a byte sink.

Run inside a host namespace::

    python -m hanlb.lab.httpd --name h1 --port 80 --sink-port 5001

HTTP routes (keep-alive and pipelining are supported; requests are answered in order):

- ``GET /``                   200, body ``"<name>\\n"``
- ``GET /health``             200, body ``"ok\\n"``
- ``GET /stream?seconds=N``   200, chunked: 1 KiB every 10 ms for N seconds, then the end
- anything else               404 (unknown path) or 405 (known path, not GET/HEAD)
- a request that does not parse: 400 and the connection is closed

Every response carries ``X-Served-By: <name>``.

The sink port reads and discards everything until the client half-closes, then writes the
number of bytes received as an 8-byte big-endian integer and closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import struct
import sys
from collections import deque
from dataclasses import dataclass
from typing import cast
from urllib.parse import parse_qs, urlsplit

import httptools

__all__ = ["HttpServerProtocol", "SinkProtocol", "main", "serve"]

STREAM_CHUNK = 1024
STREAM_INTERVAL = 0.01
MAX_STREAM_SECONDS = 3600.0
MAX_HEADER_BYTES = 64 * 1024

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
}


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    target: str
    keep_alive: bool


class HttpServerProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection. Parsing by httptools; responses are produced in order."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._served_by = name.encode()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = bytearray()
        self._header_bytes = 0
        self._pending: deque[_Request] = deque()
        self._streaming: asyncio.Task[None] | None = None
        self._closing = False
        self._closing_after_pending = False
        self._can_write = asyncio.Event()
        self._can_write.set()

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._can_write.set()
        if self._streaming is not None:
            self._streaming.cancel()
        self._pending.clear()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        self._drain()

    def eof_received(self) -> bool:
        # Finish the responses already asked for, then close.
        self._closing_after_pending = True
        if self._streaming is None and not self._pending and self._transport is not None:
            self._transport.close()
        return True

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        self._url.clear()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise httptools.HttpParserError("request head too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise httptools.HttpParserError("request head too long")

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("ascii", "replace")
        self._pending.append(
            _Request(method, self._url.decode("latin-1"), self._parser.should_keep_alive())
        )

    # -- responses -------------------------------------------------------------

    def _drain(self) -> None:
        while self._pending and self._streaming is None and not self._closing:
            req = self._pending.popleft()
            self._handle(req)
        if (
            self._closing_after_pending
            and self._streaming is None
            and not self._pending
            and self._transport is not None
        ):
            self._transport.close()

    def _handle(self, req: _Request) -> None:
        parts = urlsplit(req.target)
        path = parts.path
        head_only = req.method == "HEAD"
        if path not in ("/", "/health", "/stream"):
            self._respond(404, b"not found\n", req.keep_alive, head_only)
            return
        if req.method not in ("GET", "HEAD"):
            self._respond(405, b"method not allowed\n", req.keep_alive, head_only)
            return
        if path == "/":
            self._respond(200, self._served_by + b"\n", req.keep_alive, head_only)
        elif path == "/health":
            self._respond(200, b"ok\n", req.keep_alive, head_only)
        else:
            seconds = _stream_seconds(parts.query)
            if seconds is None:
                self._respond(400, b"seconds must be a number in [0, 3600]\n", False, head_only)
                return
            if head_only:
                self._send_head(200, None, req.keep_alive)
                if not req.keep_alive:
                    self._close()
                return
            self._streaming = asyncio.get_running_loop().create_task(
                self._stream(seconds, req.keep_alive)
            )

    def _send_head(self, status: int, length: int | None, keep_alive: bool) -> None:
        assert self._transport is not None
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            "Content-Type: text/plain",
            f"X-Served-By: {self._name}",
            "Connection: keep-alive" if keep_alive else "Connection: close",
        ]
        if length is None:
            lines.append("Transfer-Encoding: chunked")
        else:
            lines.append(f"Content-Length: {length}")
        self._transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _respond(self, status: int, body: bytes, keep_alive: bool, head_only: bool) -> None:
        if self._transport is None or self._closing:
            return
        self._send_head(status, len(body), keep_alive)
        if not head_only:
            self._transport.write(body)
        if not keep_alive:
            self._close()

    def _bad_request(self) -> None:
        self._pending.clear()
        if self._transport is not None and not self._closing:
            if self._streaming is None:
                self._respond(400, b"bad request\n", False, False)
            else:
                self._close()

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    async def _stream(self, seconds: float, keep_alive: bool) -> None:
        assert self._transport is not None
        transport = self._transport
        loop = asyncio.get_running_loop()
        chunk = b"%x\r\n" % STREAM_CHUNK + b"x" * STREAM_CHUNK + b"\r\n"
        count = round(seconds / STREAM_INTERVAL)
        try:
            self._send_head(200, None, keep_alive)
            start = loop.time()
            for i in range(count):
                delay = start + i * STREAM_INTERVAL - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._can_write.wait()
                if self._closing:
                    return
                transport.write(chunk)
            transport.write(b"0\r\n\r\n")
        except asyncio.CancelledError:
            return
        finally:
            self._streaming = None
        if not keep_alive:
            self._close()
        else:
            self._drain()


def _stream_seconds(query: str) -> float | None:
    values = parse_qs(query).get("seconds", ["10"])
    try:
        seconds = float(values[-1])
    except ValueError:
        return None
    if not 0 <= seconds <= MAX_STREAM_SECONDS:
        return None
    return seconds


class SinkProtocol(asyncio.BufferedProtocol):
    """Counts and discards bytes; on the client's half-close, answers the count and closes."""

    def __init__(self) -> None:
        self._buffer = memoryview(bytearray(256 * 1024))
        self._count = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._count += nbytes

    def eof_received(self) -> bool:
        if self._transport is not None:
            self._transport.write(struct.pack(">Q", self._count))
            self._transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve(name: str, host: str, port: int, sink_port: int | None) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = [
        await loop.create_server(
            lambda: HttpServerProtocol(name), host, port, reuse_address=True, backlog=4096
        )
    ]
    if sink_port is not None:
        servers.append(
            await loop.create_server(SinkProtocol, host, sink_port, reuse_address=True, backlog=256)
        )
    print(
        f"httpd {name}: http on {host}:{port}"
        + (f", sink on {host}:{sink_port}" if sink_port is not None else ""),
        flush=True,
    )
    await stop.wait()
    for server in servers:
        server.close()
    for server in servers:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)
    print(f"httpd {name}: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hanlb.lab.httpd", description=__doc__)
    parser.add_argument("--name", required=True, help="written in X-Served-By and GET /")
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default all)")
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--sink-port", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(serve(args.name, args.host, args.port, args.sink_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
