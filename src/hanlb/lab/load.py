"""The lab's load generator; run it inside a client namespace.

    python -m hanlb.lab.load --mode http --address 10.93.0.1 --port 80 \\
        --connections 1000 --concurrency 50

Modes, each printing one JSON object on stdout:

``http``
    ``--connections`` new TCP connections, ``--concurrency`` at a time, each sending
    ``GET <path>`` with ``Connection: close`` and reading the whole response::

        {"mode": "http", "connections": N, "concurrency": C,
         "ok": int, "failed": int, "errors": {kind: count},
         "status": {"200": count, ...}, "served_by": {host: count},
         "elapsed": seconds, "conn_per_s": ok / elapsed,
         "latency_ms": {"p50": ms, "p99": ms, "max": ms}}

``stream``
    ``--connections`` concurrent ``GET /stream?seconds=S`` connections::

        {"mode": "stream", "seconds": S, "complete": int, "failed": int,
         "errors": {kind: count}, "served_by": {host: count},
         "stall": {"p50": s, "p99": s, "max": s}, "elapsed": seconds,
         "connections": [{"host": str | null, "status": int | null, "bytes": int,
                          "complete": bool, "outcome": "complete" | kind,
                          "max_stall": seconds, "duration": seconds}]}

    ``max_stall`` is the longest gap between two reads of the response (the first gap
    runs from the moment the request was sent).

``upload``
    One connection to a sink port (``--port``, default 5001), sending for ``--seconds``,
    then a half-close; the sink answers the byte count it received::

        {"mode": "upload", "bytes": received_by_sink, "sent": int, "seconds": s,
         "gbit_per_s": float}

``probe``
    ``GET --path`` (default ``/health``) once on each of ``--targets A:P,A:P``::

        {"mode": "probe", "results": {"A:P": {"status": int | null,
                                              "served_by": str | null,
                                              "error": str | null}}}

Error kinds: ``timeout``, ``refused``, ``reset``, ``unreachable``, ``eof`` (closed before
the response was complete), ``bad_response``, ``status_<code>`` (any non-200), or the
exception's class name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httptools

__all__ = [
    "ResponseReader",
    "StreamRecord",
    "main",
    "percentile",
    "run_http",
    "run_probe",
    "run_stream",
    "run_upload",
]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    if isinstance(exc, OSError) and exc.errno in (
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
    ):
        return "unreachable"
    if isinstance(exc, httptools.HttpParserError):
        return "bad_response"
    return type(exc).__name__


class ResponseReader:
    """Incremental HTTP/1.1 response parser (httptools) that keeps what the lab needs."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status: int | None = None
        self.served_by: str | None = None
        self.body_bytes = 0
        self.complete = False
        self.headers_done = False

    def feed(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-served-by":
            self.served_by = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        self.complete = True


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


async def _fetch(address: str, port: int, path: str, timeout: float) -> ResponseReader:
    """One connection, one request, the whole response. Raises on failure."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(address, port)
        try:
            writer.write(_request(path))
            resp = ResponseReader()
            while not resp.complete:
                data = await reader.read(65536)
                if not data:
                    # Connection: close without a length ends the body at EOF.
                    resp.parser.feed_data(b"")
                    break
                resp.feed(data)
            return resp
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def run_http(
    address: str,
    port: int,
    connections: int,
    concurrency: int,
    timeout: float = 5.0,
    path: str = "/",
    duration: float = 0.0,
    timeline: bool = False,
) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    served: Counter[str] = Counter()
    latencies: list[float] = []
    events: list[tuple[float, str | None, str]] = []
    ok = 0
    remaining = connections
    start = time.perf_counter()
    deadline = start + duration if duration > 0 else None

    def more() -> bool:
        if deadline is not None:
            return time.perf_counter() < deadline
        return remaining > 0

    async def worker() -> None:
        nonlocal ok, remaining
        while more():
            remaining -= 1
            t0 = time.perf_counter()
            wall = time.time()
            try:
                resp = await _fetch(address, port, path, timeout)
            except Exception as exc:
                errors[error_kind(exc)] += 1
                events.append((wall, None, error_kind(exc)))
                continue
            if not resp.complete:
                errors["eof"] += 1
                events.append((wall, resp.served_by, "eof"))
                continue
            statuses[str(resp.status)] += 1
            if resp.served_by is not None:
                served[resp.served_by] += 1
            if resp.status != 200:
                errors[f"status_{resp.status}"] += 1
                events.append((wall, resp.served_by, f"status_{resp.status}"))
                continue
            ok += 1
            latencies.append(time.perf_counter() - t0)
            events.append((wall, resp.served_by, "ok"))

    workers = concurrency if deadline is not None else min(concurrency, connections)
    await asyncio.gather(*(worker() for _ in range(max(1, workers))))
    elapsed = time.perf_counter() - start
    failed = sum(errors.values())
    extra: dict[str, Any] = {"timeline": sorted(events)} if timeline else {}
    return {
        **extra,
        "mode": "http",
        "connections": ok + sum(errors.values()),
        "concurrency": concurrency,
        "ok": ok,
        "failed": failed,
        "errors": dict(errors),
        "status": dict(statuses),
        "served_by": dict(served),
        "elapsed": elapsed,
        "conn_per_s": ok / elapsed if elapsed > 0 else 0.0,
        "latency_ms": {
            "p50": percentile(latencies, 50) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "max": max(latencies, default=0.0) * 1000,
        },
    }


@dataclass(slots=True)
class StreamRecord:
    host: str | None = None
    status: int | None = None
    bytes: int = 0
    complete: bool = False
    outcome: str = "complete"
    max_stall: float = 0.0
    duration: float = 0.0
    _last: float = field(default=0.0, repr=False)


async def _stream_one(
    address: str, port: int, seconds: float, timeout: float, idle_timeout: float
) -> StreamRecord:
    rec = StreamRecord()
    start = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(seconds + timeout):
            reader, writer = await asyncio.open_connection(address, port)
            writer.write(_request(f"/stream?seconds={seconds:g}"))
            rec._last = time.perf_counter()
            resp = ResponseReader()
            while not resp.complete:
                data = await asyncio.wait_for(reader.read(65536), idle_timeout)
                now = time.perf_counter()
                rec.max_stall = max(rec.max_stall, now - rec._last)
                rec._last = now
                if not data:
                    break
                resp.feed(data)
                rec.host = resp.served_by
                rec.status = resp.status
                rec.bytes = resp.body_bytes
            if resp.complete and resp.status == 200:
                rec.complete = True
                rec.outcome = "complete"
            elif resp.complete:
                rec.outcome = f"status_{resp.status}"
            else:
                rec.outcome = "eof"
    except Exception as exc:
        now = time.perf_counter()
        if rec._last:
            rec.max_stall = max(rec.max_stall, now - rec._last)
        rec.outcome = error_kind(exc)
    finally:
        if writer is not None:
            writer.close()
    rec.duration = time.perf_counter() - start
    return rec


async def run_stream(
    address: str,
    port: int,
    connections: int,
    seconds: float,
    timeout: float = 5.0,
) -> dict[str, Any]:
    start = time.perf_counter()
    records = await asyncio.gather(
        *(_stream_one(address, port, seconds, timeout, timeout) for _ in range(connections))
    )
    elapsed = time.perf_counter() - start
    stalls = [r.max_stall for r in records]
    errors = Counter(r.outcome for r in records if not r.complete)
    served = Counter(r.host for r in records if r.host is not None)
    out_records = []
    for r in records:
        d = asdict(r)
        d.pop("_last")
        out_records.append(d)
    return {
        "mode": "stream",
        "seconds": seconds,
        "complete": sum(r.complete for r in records),
        "failed": sum(not r.complete for r in records),
        "errors": dict(errors),
        "served_by": dict(served),
        "stall": {
            "p50": percentile(stalls, 50),
            "p99": percentile(stalls, 99),
            "max": max(stalls, default=0.0),
        },
        "elapsed": elapsed,
        "connections": out_records,
    }


def run_upload(address: str, port: int, seconds: float, timeout: float = 10.0) -> dict[str, Any]:
    buf = memoryview(bytearray(1 << 20))
    sent = 0
    with socket.create_connection((address, port), timeout=timeout) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            sent += sock.send(buf)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while len(answer) < 8:
            data = sock.recv(8 - len(answer))
            if not data:
                raise ConnectionError(f"sink closed after {len(answer)} of 8 answer bytes")
            answer += data
        elapsed = time.perf_counter() - start
    (received,) = struct.unpack(">Q", answer)
    return {
        "mode": "upload",
        "bytes": received,
        "sent": sent,
        "seconds": elapsed,
        "gbit_per_s": received * 8 / elapsed / 1e9 if elapsed > 0 else 0.0,
    }


async def run_probe(targets: list[str], path: str, timeout: float) -> dict[str, Any]:
    async def one(target: str) -> dict[str, Any]:
        address, _, port = target.rpartition(":")
        try:
            resp = await _fetch(address, int(port), path, timeout)
        except Exception as exc:
            return {"status": None, "served_by": None, "error": error_kind(exc)}
        return {
            "status": resp.status,
            "served_by": resp.served_by,
            "error": None if resp.complete else "eof",
        }

    results = await asyncio.gather(*(one(t) for t in targets))
    return {"mode": "probe", "results": dict(zip(targets, results, strict=True))}


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hanlb.lab.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", choices=["http", "stream", "upload", "probe"], default="http")
    parser.add_argument("--address", default="10.93.0.1")
    parser.add_argument("--port", type=int, default=None, help="default 80 (5001 for upload)")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=5.0, help="per connection, seconds")
    parser.add_argument("--seconds", type=float, default=5.0, help="stream/upload duration")
    parser.add_argument("--path", default=None, help="http: '/', probe: '/health'")
    parser.add_argument("--targets", default="", help="probe: comma-separated ADDRESS:PORT")
    parser.add_argument(
        "--duration", type=float, default=0.0, help="http: run this long instead of a count"
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="http: add [wall time, host, outcome] of every connection",
    )
    args = parser.parse_args(argv)

    port = args.port if args.port is not None else (5001 if args.mode == "upload" else 80)
    result: dict[str, Any]
    if args.mode == "http":
        result = _run_async(
            run_http(
                args.address,
                port,
                args.connections,
                args.concurrency,
                args.timeout,
                args.path or "/",
                duration=args.duration,
                timeline=args.timeline,
            )
        )
    elif args.mode == "stream":
        result = _run_async(
            run_stream(args.address, port, args.connections, args.seconds, args.timeout)
        )
    elif args.mode == "upload":
        try:
            result = run_upload(args.address, port, args.seconds, args.timeout)
        except OSError as exc:
            json.dump({"mode": "upload", "error": error_kind(exc), "detail": str(exc)}, sys.stdout)
            sys.stdout.write("\n")
            return 1
    else:
        targets = [t for t in args.targets.split(",") if t]
        result = _run_async(run_probe(targets, args.path or "/health", args.timeout))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
