"""Thin asyncio shells around the sans-I/O message ``Connection``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter

from .protocol.framing import ProtocolError, Rejected
from .protocol.messages import Connection

__all__ = ["Link", "LinkClosed", "accept_link", "open_link"]

READ_SIZE = 256 * 1024


class LinkClosed(ConnectionError):
    """The peer closed, the transport failed, or the stream was beyond repair."""


class Link:
    """One framed, authenticated TCP connection.

    Frames that fail authentication or decoding are dropped and counted in
    ``counters`` (``rejected_<CODE>``); a stream that cannot be resynchronised
    is closed and counted (``closed_<CODE>``).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        key: bytes,
        counters: Counter[str],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = Connection(key)
        self.counters = counters
        self.peer = "?"
        peername = writer.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"

    async def recv(self) -> list[object]:
        while True:
            if self.conn.failed is not None:
                exc = self.conn.failed
                self.counters[f"closed_{exc.code.name}"] += 1
                self.close()
                raise LinkClosed(str(exc))
            try:
                data = await self.reader.read(READ_SIZE)
            except OSError as exc:  # reset, broken pipe, timeout
                raise LinkClosed(str(exc)) from exc
            if not data:
                raise LinkClosed("peer closed")
            try:
                events = self.conn.receive_data(data)
            except ProtocolError as exc:
                self.counters[f"closed_{exc.code.name}"] += 1
                self.close()
                raise LinkClosed(str(exc)) from exc
            out = []
            for ev in events:
                if isinstance(ev, Rejected):
                    self.counters[f"rejected_{ev.code.name}"] += 1
                else:
                    out.append(ev)
            if out:
                return out

    def send(self, *msgs: object) -> None:
        if self.writer.is_closing():
            raise LinkClosed("closed")
        try:
            self.writer.write(b"".join(self.conn.send(m) for m in msgs))
        except OSError as exc:
            raise LinkClosed(str(exc)) from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def open_link(
    host: str, port: int, key: bytes, counters: Counter[str], timeout: float
) -> Link:
    """Connect to a peer (control messages are small: no Nagle delay)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    _nodelay(writer)
    return Link(reader, writer, key, counters)


def accept_link(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    key: bytes,
    counters: Counter[str],
) -> Link:
    """A ``Link`` for a connection a server accepted (no Nagle delay either)."""
    _nodelay(writer)
    return Link(reader, writer, key, counters)
