"""A tiny HTTP/1.1 backend that answers with its name: for tests, benchmarks and demos.

``EchoBackend(name)`` serves keep-alive HTTP/1.1 on asyncio. Every response
carries ``X-Backend: <name>``. By path:

- ``/echo``: the request body back (Content-Length), request headers as JSON in
  ``X-Echo-Headers``;
- ``/chunked?n=K&size=B``: K chunks of B bytes, chunked;
- ``/close``: a close-delimited body (no length), then the connection closes;
- ``/slow?delay=S``: waits S seconds first;
- ``/big?size=B``: B bytes (Content-Length);
- anything else: a small JSON document naming the backend, method, path,
  headers and body length.

``HEAD`` gets the headers of the ``GET`` answer without the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from urllib.parse import parse_qs, urlsplit

from .http import END, HttpError, RequestHead, RequestReader, chunk, error_response

__all__ = ["EchoBackend"]


class EchoBackend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.counters: Counter[str] = Counter()
        self.connections = 0
        self.server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(
            self._serve, host, port, reuse_address=True, limit=256 * 1024
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self._writers):
            w.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        parser = RequestReader(max_header_bytes=1 << 20, max_body_bytes=1 << 40)
        try:
            while True:
                head: RequestHead | None = None
                body: list[bytes] = []
                while True:
                    if not parser.events:
                        data = await reader.read(256 * 1024)
                        if not data:
                            return
                        parser.feed(data)
                        continue
                    ev = parser.events.popleft()
                    if isinstance(ev, HttpError):
                        writer.write(error_response(ev.status, ev.reason))
                        return
                    if isinstance(ev, RequestHead):
                        head = ev
                    elif ev is END:
                        break
                    elif isinstance(ev, bytes):
                        body.append(ev)
                assert head is not None
                self.counters["requests"] += 1
                if not await self._respond(head, b"".join(body), writer):
                    return
        except (ConnectionError, OSError):
            return
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _respond(self, head: RequestHead, body: bytes, writer: asyncio.StreamWriter) -> bool:
        url = urlsplit(head.target.decode("latin-1"))
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        hdrs = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
        base = f"HTTP/1.1 200 OK\r\nX-Backend: {self.name}\r\n"
        send_body = head.method != "HEAD"
        if path == "/slow":
            await asyncio.sleep(float(q.get("delay", "1")))
        if path == "/chunked":
            n, size = int(q.get("n", "3")), int(q.get("size", "10"))
            writer.write(f"{base}Transfer-Encoding: chunked\r\n\r\n".encode())
            if send_body:
                for i in range(n):
                    writer.write(chunk(bytes([0x61 + i % 26]) * size))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            return head.keep_alive
        if path == "/close":
            writer.write(f"{base}Connection: close\r\n\r\n".encode())
            if send_body:
                writer.write(f"closing from {self.name}".encode())
            await writer.drain()
            return False
        if path == "/echo":
            payload = body
            extra = f"X-Echo-Headers: {json.dumps(hdrs)}\r\n"
        elif path == "/big":
            payload = b"x" * int(q.get("size", "1000"))
            extra = ""
        else:
            doc = {
                "backend": self.name,
                "method": head.method,
                "path": head.target.decode("latin-1"),
                "headers": hdrs,
                "body_len": len(body),
            }
            payload = json.dumps(doc).encode()
            extra = "Content-Type: application/json\r\n"
        conn = "" if head.keep_alive else "Connection: close\r\n"
        writer.write(
            f"{base}{extra}{conn}Content-Length: {len(payload)}\r\n\r\n".encode()
            + (payload if send_body else b"")
        )
        if writer.transport.get_write_buffer_size() > 256 * 1024:
            await writer.drain()
        return head.keep_alive
