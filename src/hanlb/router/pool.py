"""Pre-established, shared keep-alive connections to the backends (claims 51-53, 55).

One ``HostPool`` per backend endpoint (host address, application port). The
``PoolKeeper`` opens ``min_idle`` TCP connections to every endpoint before the
router serves (claim 52) and keeps them topped up: a connection taken for a
request comes back when the response has ended and the backend keeps it alive;
one the backend closes, or that errors, is discarded and replaced. Requests
from every client connection share these connections (aggregation, claim 55).

A connect that fails marks the endpoint down for ``host_down_for`` seconds; the
keeper retries it every ``pool_check_interval`` and a successful connect marks
it up again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter, deque
from dataclasses import dataclass

from .http import ResponseReader

__all__ = ["BackendConn", "ConnectFailed", "HostPool", "PoolKeeper"]

READ_SIZE = 256 * 1024


class ConnectFailed(ConnectionError):
    """A new connection to a backend could not be established (nothing was sent)."""


@dataclass(slots=True)
class BackendConn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pool: HostPool
    idle_since: float
    requests: int = 0
    parser: ResponseReader | None = None

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class HostPool:
    """Idle connections to one backend endpoint."""

    def __init__(
        self,
        host: str,
        address: str,
        port: int,
        *,
        min_idle: int,
        max_idle: int,
        connect_timeout: float,
        down_for: float,
        counters: Counter[str],
    ) -> None:
        self.host, self.address, self.port = host, address, port
        self.min_idle, self.max_idle = min_idle, max_idle
        self.connect_timeout = connect_timeout
        self.down_for = down_for
        self.counters = counters
        self.idle: deque[BackendConn] = deque()
        self.busy = 0
        self.connecting = 0
        self.down_until = 0.0
        self.opened = 0
        self.reused = 0
        self.discarded = 0
        self.changed = asyncio.Event()

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"

    def up(self, now: float) -> bool:
        return self.down_until <= now

    async def connect(self) -> BackendConn:
        loop = asyncio.get_running_loop()
        self.connecting += 1
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.address, self.port, limit=READ_SIZE),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            self.counters["backend_connect_failures"] += 1
            self.down_until = loop.time() + self.down_for
            raise ConnectFailed(f"{self.label}: {exc or type(exc).__name__}") from exc
        finally:
            self.connecting -= 1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.down_until = 0.0
        self.opened += 1
        self.counters["backend_connects"] += 1
        return BackendConn(reader, writer, self, loop.time())

    async def acquire(self) -> BackendConn:
        """An idle pooled connection, or a new one (``ConnectFailed``)."""
        while self.idle:
            conn = self.idle.pop()  # most recently used: least likely timed out
            if conn.usable():
                self.busy += 1
                self.reused += 1
                if len(self.idle) < self.min_idle:
                    self.changed.set()
                return conn
            self._discard(conn)
        self.changed.set()
        conn = await self.connect()
        self.busy += 1
        return conn

    def release(self, conn: BackendConn, reusable: bool) -> None:
        """Give back a connection taken with ``acquire`` after its response ended."""
        self.busy -= 1
        conn.requests += 1
        if reusable and conn.usable() and len(self.idle) < self.max_idle:
            conn.idle_since = asyncio.get_running_loop().time()
            self.idle.append(conn)
        else:
            self._discard(conn)

    def _discard(self, conn: BackendConn) -> None:
        self.discarded += 1
        conn.close()
        self.changed.set()

    def expire(self, now: float, idle_timeout: float) -> None:
        keep: deque[BackendConn] = deque()
        for conn in self.idle:
            if conn.usable() and now - conn.idle_since < idle_timeout:
                keep.append(conn)
            else:
                self._discard(conn)
        self.idle = keep

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()

    def status(self, now: float) -> dict[str, object]:
        return {
            "host": self.host,
            "endpoint": f"{self.address}:{self.port}",
            "up": self.up(now),
            "idle": len(self.idle),
            "busy": self.busy,
            "opened": self.opened,
            "reused": self.reused,
            "discarded": self.discarded,
        }


class PoolKeeper:
    """Keeps every pool at ``min_idle`` connections and retries endpoints that are down."""

    def __init__(self, pools: list[HostPool], *, interval: float, idle_timeout: float) -> None:
        self.pools = pools
        self.interval = interval
        self.idle_timeout = idle_timeout
        self._wake = asyncio.Event()
        for p in pools:
            p.changed = self._wake

    async def fill(self) -> None:
        """One round: top every pool up (in parallel); failures mark endpoints down."""
        now = asyncio.get_running_loop().time()
        jobs = []
        for p in self.pools:
            p.expire(now, self.idle_timeout)
            missing = p.min_idle - len(p.idle) - p.connecting
            if missing <= 0 or (not p.up(now) and p.connecting):
                continue
            if not p.up(now):
                missing = 1  # one probe connect for an endpoint that is down
            jobs += [self._add(p) for _ in range(missing)]
        if jobs:
            await asyncio.gather(*jobs)

    async def _add(self, pool: HostPool) -> None:
        try:
            conn = await pool.connect()
        except ConnectFailed:
            return
        if len(pool.idle) < pool.max_idle:
            pool.idle.append(conn)
        else:
            conn.close()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            await self.fill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            # a burst of releases wakes us once; let it settle
            await asyncio.sleep(0.01)

    def close(self) -> None:
        for p in self.pools:
            p.close()
