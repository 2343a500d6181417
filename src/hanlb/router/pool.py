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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .http import ResponseReader

__all__ = ["BackendConn", "ConnectFailed", "HostPool", "Kick", "PoolKeeper", "Stream"]

READ_SIZE = 256 * 1024


class Kick(Exception):
    """Raised by ``Stream.read`` when ``kick`` woke it: the reader's owner has work for it."""


class Stream(asyncio.Protocol):
    """One TCP (or TLS) connection: a lean stand-in for a StreamReader/StreamWriter pair.

    ``read`` behaves as ``StreamReader.read`` (an error the connection was lost
    with comes first, then buffered bytes, then b"" at EOF) with a timeout of its
    own (``TimeoutError``): one timer per connection, moved lazily, instead of a
    timer and a cancel scope per read. Reading pauses while more than
    ``2 * limit`` bytes wait to be read, as with ``StreamReader``.
    """

    def __init__(self, limit: int = READ_SIZE) -> None:
        self.transport: asyncio.Transport | None = None
        self._limit = limit
        self._buf = bytearray()
        self._eof = False
        self._exc: BaseException | None = None
        self._lost = False
        self._waiter: asyncio.Future[bytes] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._over_ssl = False
        self._loop = self.loop = asyncio.get_event_loop()
        self.hook: Callable[[bytes | None], None] | None = None
        """When set, received data goes to it instead of the buffer; None: EOF or loss."""

    # -- protocol callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._over_ssl = transport.get_extra_info("sslcontext") is not None

    def data_received(self, data: bytes) -> None:
        hook = self.hook
        if hook is not None:
            hook(data)
            return
        w = self._waiter
        if w is not None and not self._buf:
            self._waiter = None
            if not w.done():
                w.set_result(data)
                return
        self._buf += data
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(b"")  # wake up; read() takes the buffer
        if not self._paused and len(self._buf) > 2 * self._limit:
            assert self.transport is not None
            try:
                self.transport.pause_reading()
            except NotImplementedError:
                pass
            else:
                self._paused = True

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        self._unhook()
        return not self._over_ssl  # keep the writing side open, as StreamReaderProtocol

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is None:
            self._eof = True
        else:
            self._exc = exc
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        d = self._drain_waiter
        if d is not None:
            self._drain_waiter = None
            if not d.done():
                if exc is None:
                    d.set_result(None)
                else:
                    d.set_exception(exc)
        self._unhook()

    def _unhook(self) -> None:
        hook = self.hook
        if hook is not None:
            self.hook = None
            hook(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        d = self._drain_waiter
        if d is not None:
            self._drain_waiter = None
            if not d.done():
                d.set_result(None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(b"")

    def has_data(self) -> bool:
        """Bytes are buffered for ``read``."""
        return bool(self._buf)

    def waiting(self) -> bool:
        """A ``read`` is suspended waiting for data."""
        w = self._waiter
        return w is not None and not w.done()

    def kick(self) -> bool:
        """Make a suspended ``read`` raise ``Kick``; False if none is suspended."""
        w = self._waiter
        if w is None or w.done():
            return False
        self._waiter = None
        w.set_exception(Kick())
        return True

    def push(self, data: bytes) -> None:
        """Buffer ``data`` for ``read`` without waking it."""
        self._buf += data

    def set_deadline(self, deadline: float) -> None:
        """Move the timeout of the suspended ``read`` to ``deadline`` (loop time)."""
        self._deadline = deadline
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    # -- reading ------------------------------------------------------------------------

    def at_eof(self) -> bool:
        return self._eof and not self._buf

    async def read(self, n: int, timeout: float | None = None) -> bytes:
        """Up to ``n`` bytes; b"" at EOF; ``TimeoutError`` after ``timeout`` seconds."""
        while True:
            if self._exc is not None:
                raise self._exc
            buf = self._buf
            if buf:
                if len(buf) <= n:
                    data = bytes(buf)
                    buf.clear()
                else:
                    data = bytes(buf[:n])
                    del buf[:n]
                if self._paused and len(buf) <= self._limit:
                    self._paused = False
                    assert self.transport is not None
                    self.transport.resume_reading()
                return data
            if self._eof:
                return b""
            if self._waiter is not None:
                raise RuntimeError("read() called while another coroutine is already waiting")
            loop = self._loop
            w = self._waiter = loop.create_future()
            if timeout is not None:
                self._deadline = deadline = loop.time() + timeout
                if self._timer is None or self._timer_at > deadline:
                    if self._timer is not None:
                        self._timer.cancel()
                    self._timer_at = deadline
                    self._timer = loop.call_at(deadline, self._on_timer)
            else:
                self._deadline = 0.0
            try:
                data = await w
            finally:
                self._waiter = None
            if data:
                if len(data) <= n:
                    return data
                self._buf[:0] = data[n:]
                return data[:n]

    def _on_timer(self) -> None:
        self._timer = None
        w = self._waiter
        if w is None or w.done() or not self._deadline:
            return
        if self._loop.time() >= self._deadline:
            self._waiter = None
            w.set_exception(TimeoutError())
        else:
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    # -- writing ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def buffered(self) -> int:
        """Bytes written and not sent yet."""
        assert self.transport is not None
        return self.transport.get_write_buffer_size()

    async def drain(self) -> None:
        if self._exc is not None:
            raise self._exc
        if self._lost:
            raise ConnectionResetError("Connection lost")
        if not self._write_paused:
            return
        d = self._drain_waiter = self._loop.create_future()
        await d

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def get_extra_info(self, name: str, default: object = None) -> object:
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()


class ConnectFailed(ConnectionError):
    """A new connection to a backend could not be established (nothing was sent)."""


@dataclass(slots=True)
class BackendConn:
    stream: Stream
    pool: HostPool
    idle_since: float
    requests: int = 0
    parser: ResponseReader | None = None

    def usable(self) -> bool:
        return not self.stream.is_closing() and not self.stream.at_eof()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stream.close()


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
            _, stream = await asyncio.wait_for(
                loop.create_connection(Stream, self.address, self.port),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            self.counters["backend_connect_failures"] += 1
            self.down_until = loop.time() + self.down_for
            raise ConnectFailed(f"{self.label}: {exc or type(exc).__name__}") from exc
        finally:
            self.connecting -= 1
        sock: Any = stream.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.down_until = 0.0
        self.opened += 1
        self.counters["backend_connects"] += 1
        return BackendConn(stream, self, loop.time())

    def take(self) -> BackendConn | None:
        """An idle pooled connection, or None (then ``acquire`` connects)."""
        while self.idle:
            conn = self.idle.pop()  # most recently used: least likely timed out
            if conn.usable():
                self.busy += 1
                self.reused += 1
                if len(self.idle) < self.min_idle:
                    self.changed.set()
                return conn
            self._discard(conn)
        return None

    async def acquire(self) -> BackendConn:
        """An idle pooled connection, or a new one (``ConnectFailed``)."""
        conn = self.take()
        if conn is not None:
            return conn
        self.changed.set()
        conn = await self.connect()
        self.busy += 1
        return conn

    def release(self, conn: BackendConn, reusable: bool) -> None:
        """Give back a connection taken with ``acquire`` after its response ended."""
        self.busy -= 1
        conn.requests += 1
        if reusable and conn.usable() and len(self.idle) < self.max_idle:
            conn.idle_since = conn.stream.loop.time()
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
