"""Each component's admin endpoint: HTTP on a unix socket (and optionally TCP).

``GET /status`` (JSON), ``GET /routes`` (JSON, forwarders), ``GET /metrics``
(Prometheus text), and ``POST`` actions with query parameters (``POST
/pool?app=web&host=h5&weight=1``); an action's ``KeyError`` or ``ValueError``
becomes a 400 with the reason. The unix socket lives at ``<run_dir>/<name>.sock``; unix
sockets are reachable from every network namespace, which is how ``hanlb ctl``
talks to components in the lab. ``query`` is the client side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["AdminServer", "CountersCollector", "query", "socket_path"]

Handler = Callable[[], Any]
Action = Callable[[dict[str, str]], Any]


def socket_path(run_dir: str, name: str) -> Path:
    return Path(run_dir) / f"{name}.sock"


class CountersCollector(Collector):
    """Exposes a component's plain counter dicts as Prometheus metrics."""

    def __init__(
        self,
        prefix: str,
        name: str,
        counters: Callable[[], dict[str, int]],
        gauges: Callable[[], dict[str, float]],
    ) -> None:
        self.prefix, self.name, self.counters, self.gauges = prefix, name, counters, gauges

    def collect(self) -> Iterator[Metric]:
        for key, value in sorted(self.counters().items()):
            m = CounterMetricFamily(f"{self.prefix}_{key}", key, labels=["component"])
            m.add_metric([self.name], value)
            yield m
        for key, fvalue in sorted(self.gauges().items()):
            g = GaugeMetricFamily(f"{self.prefix}_{key}", key, labels=["component"])
            g.add_metric([self.name], fvalue)
            yield g


class AdminServer:
    def __init__(self, run_dir: str, name: str, tcp: str | None = None) -> None:
        self.path = socket_path(run_dir, name)
        self.tcp = tcp
        self.routes: dict[str, Handler] = {}
        self.actions: dict[str, Action] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self._servers: list[asyncio.Server] = []
        self.routes["/metrics"] = lambda: generate_latest(self.registry)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._servers.append(await asyncio.start_unix_server(self._serve, path=str(self.path)))
        if self.tcp:
            host, _, port = self.tcp.rpartition(":")
            self._servers.append(await asyncio.start_server(self._serve, host, int(port)))

    def close(self) -> None:
        for s in self._servers:
            s.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            method = parts[0] if parts else ""
            path, _, qs = (parts[1] if len(parts) >= 2 else "").partition("?")
            status, ctype = "200 OK", "application/json"
            result: Any
            if method == "POST" and path in self.actions:
                try:
                    result = self.actions[path](dict(urllib.parse.parse_qsl(qs)))
                except (KeyError, ValueError) as exc:
                    status = "400 Bad Request"
                    result = {"error": str(exc.args[0] if exc.args else exc)}
            elif method == "GET" and path in self.routes:
                result = self.routes[path]()
            else:
                status, result = "404 Not Found", {"error": f"no {method} {path}"}
            if isinstance(result, bytes):
                ctype, body = "text/plain; version=0.0.4", result
            else:
                body = json.dumps(result, indent=1, default=str).encode()
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()


def query(
    run_dir: str,
    name: str,
    path: str,
    timeout: float = 5.0,
    *,
    method: str = "GET",
    params: dict[str, str] | None = None,
) -> Any:
    """``path`` from component ``name``'s unix admin socket; JSON decoded. A
    non-200 answer raises ``ConnectionError`` with the component's reason."""
    if params:
        path = f"{path}?{urllib.parse.urlencode(params)}"
    sock_file = socket_path(run_dir, name)
    if not os.path.exists(sock_file):
        raise ConnectionError(f"no admin socket for {name!r} at {sock_file}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_file))
        s.sendall(f"{method} {path} HTTP/1.0\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        reason = head.splitlines()[0].decode(errors="replace") if head else "no answer"
        with contextlib.suppress(ValueError):
            reason = str(json.loads(body).get("error", reason))
        raise ConnectionError(f"{name}: {reason}")
    if b"application/json" in head:
        return json.loads(body)
    return body.decode()
