"""The request router over real loopback TCP, with in-process backends.

Three backends (``EchoBackend``, on 127.0.0.2-4, one port) answer with their
name; a ``RouterService`` on 127.0.0.1 routes to them. Every scenario runs on
uvloop under a deadline, so a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from hanlb.admin import query as admin_query
from hanlb.config import ClusterConfig, NodeConfig, parse_config
from hanlb.router import RouterSettings
from hanlb.router.echo import EchoBackend
from hanlb.router.http import END, ResponseHead, ResponseReader
from hanlb.router.service import RouterService
from hanlb.tracker.service import TrackerService

HOSTS = {"h1": "127.0.0.2", "h2": "127.0.0.3", "h3": "127.0.0.4"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def common_port() -> int:
    """A port free on every backend address."""
    for _ in range(50):
        port = free_port(HOSTS["h1"])
        try:
            for addr in HOSTS.values():
                with socket.socket() as s:
                    s.bind((addr, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no common free port")


def cluster_config(run_dir: Path, app_port: int, trackers: int = 0) -> ClusterConfig:
    return parse_config(
        {
            "cluster": {"key": "k" * 32, "run_dir": str(run_dir)},
            "timers": {"liveness_interval": 0.05, "reconnect_interval": 0.05},
            "hosts": [
                {"name": n, "address": a, "mac": f"02:00:00:00:00:0{i + 1}"}
                for i, (n, a) in enumerate(HOSTS.items())
            ],
            "applications": [
                {
                    "name": "web",
                    "vip": "10.93.0.1",
                    "port": app_port,
                    "mode": "http",
                    "pool": [{"host": h} for h in HOSTS],
                },
                {
                    "name": "api",
                    "vip": "10.93.0.2",
                    "port": app_port,
                    "mode": "http",
                    "pool": [{"host": "h3"}],
                },
            ],
            "trackers": [
                {"name": f"tr{i}", "listen": f"127.0.0.1:{free_port()}"} for i in range(trackers)
            ],
        }
    )


def run(scenario: Callable[[], Awaitable[None]], timeout: float = 20.0) -> None:
    async def main() -> None:
        await asyncio.wait_for(scenario(), timeout)

    uvloop.run(main())


@dataclass
class Lab:
    config: ClusterConfig
    backends: dict[str, EchoBackend]
    routers: list[RouterService] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def add_router(self, name: str, settings: RouterSettings) -> RouterService:
        node = NodeConfig(name=name, listen=f"127.0.0.1:{free_port()}")
        svc = RouterService(self.config, name, settings=settings, node=node)
        self.routers.append(svc)
        self.tasks.append(asyncio.create_task(svc.run()))
        await asyncio.wait_for(svc.ready.wait(), 5)
        return svc


@contextlib.asynccontextmanager
async def lab(
    tmp_path: Path,
    settings: RouterSettings | None = None,
    *,
    trackers: int = 0,
    routers: int = 1,
    dead: tuple[str, ...] = (),
) -> AsyncIterator[Lab]:
    port = common_port()
    config = cluster_config(tmp_path, port, trackers)
    backends = {n: EchoBackend(n) for n in HOSTS if n not in dead}
    for n, b in backends.items():
        await b.start(HOSTS[n], port)
    tracker_services = [TrackerService(config, t.name) for t in config.trackers]
    tracker_tasks = [asyncio.create_task(t.run()) for t in tracker_services]
    the_lab = Lab(config, backends)
    try:
        for i in range(routers):
            await the_lab.add_router(f"rt{i + 1}", settings or RouterSettings())
        yield the_lab
    finally:
        for r in the_lab.routers:
            r.stop()
        for t in the_lab.tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(t, 5)
        for ts in tracker_services:
            ts.stop()
        for t in tracker_tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(t, 5)
        for b in backends.values():
            b.close()
        await asyncio.sleep(0.01)


class Client:
    """One keep-alive client connection with a tiny response reader."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = ResponseReader()
        self.cookies: dict[str, str] = {}

    @classmethod
    async def open(cls, svc: RouterService, ssl_ctx: ssl.SSLContext | None = None) -> Client:
        assert svc.address is not None
        r, w = await asyncio.open_connection(*svc.address, ssl=ssl_ctx, limit=1 << 20)
        return cls(r, w)

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        *,
        chunked: bool = False,
        cookies: bool = False,
        host: str = "example.com",
    ) -> tuple[ResponseHead, bytes]:
        h = {"Host": host, **(headers or {})}
        if cookies and self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if body is not None and chunked:
            h["Transfer-Encoding"] = "chunked"
        elif body is not None:
            h["Content-Length"] = str(len(body))
        raw = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
        self.writer.write(raw.encode() + b"\r\n")
        if body is not None:
            if chunked:
                for i in range(0, len(body), 100_000):
                    part = body[i : i + 100_000]
                    self.writer.write(b"%x\r\n%b\r\n" % (len(part), part))
                self.writer.write(b"0\r\n\r\n")
            else:
                self.writer.write(body)
        await self.writer.drain()
        return await self.response(method)

    async def response(self, method: str = "GET") -> tuple[ResponseHead, bytes]:
        p = self.parser
        p.start(method)
        head: ResponseHead | None = None
        parts: list[bytes] = []
        while True:
            while p.events:
                ev = p.events.popleft()
                if isinstance(ev, ResponseHead):
                    head = ev
                elif isinstance(ev, bytes):
                    parts.append(ev)
                elif ev is END:
                    assert head is not None
                    for k, v in head.headers:
                        if k.lower() == b"set-cookie":
                            name, _, rest = v.decode().partition("=")
                            self.cookies[name] = rest.split(";")[0]
                    return head, b"".join(parts)
            data = await self.reader.read(1 << 20)
            if data:
                p.feed(data)
            else:
                p.feed_eof()

    def close(self) -> None:
        self.writer.close()


def hdr(head: ResponseHead, name: str) -> str | None:
    for k, v in head.headers:
        if k.decode().lower() == name.lower():
            return v.decode()
    return None


async def raw_exchange(svc: RouterService, data: bytes, timeout: float = 3.0) -> bytes:
    """Send raw bytes, half-close, and read everything until the router closes."""
    assert svc.address is not None
    r, w = await asyncio.open_connection(*svc.address)
    try:
        w.write(data)
        await w.drain()
        with contextlib.suppress(OSError):
            w.write_eof()
        out = b""
        async with asyncio.timeout(timeout):
            while chunk := await r.read(65536):
                out += chunk
        return out
    finally:
        w.close()


NO_AFFINITY = RouterSettings(affinity=False, pool_min_idle=2)


# -- routing and pooling ---------------------------------------------------------------


def test_each_request_on_one_connection_is_routed_on_its_own(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with lab(tmp_path, NO_AFFINITY) as lb:
            svc = lb.routers[0]
            c = await Client.open(svc)
            seen = []
            for _ in range(6):
                head, body = await c.request("GET", "/")
                assert head.status == 200
                seen.append(json.loads(body)["backend"])
            c.close()
            assert set(seen) == {"h1", "h2", "h3"}, seen
            assert seen[:3] != [seen[0]] * 3
            # the pools were filled before the first request and are shared
            status = await asyncio.to_thread(admin_query, str(tmp_path), svc.name, "/status")
            assert {p["host"] for p in status["pools"]} == {"h1", "h2", "h3"}
            assert all(p["idle"] >= 2 for p in status["pools"] if p["host"] != "h3")
            assert sum(p["reused"] for p in status["pools"]) >= 6
            assert status["counters"]["requests"] == 6
            metrics = await asyncio.to_thread(admin_query, str(tmp_path), svc.name, "/metrics")
            assert "hanlb_router_requests_total" in metrics

    run(scenario)


def test_pools_are_established_before_requests_and_shared(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with lab(tmp_path, RouterSettings(affinity=False, pool_min_idle=3)) as lb:
            svc = lb.routers[0]
            # 3 warm connections per host were opened before any client came
            assert all(b.connections == 3 for b in lb.backends.values())
            clients = [await Client.open(svc) for _ in range(10)]
            for c in clients:
                head, _ = await c.request("GET", "/")
                assert head.status == 200
            for c in clients:
                c.close()
            # ten client connections, carried by the pooled connections
            assert sum(b.connections for b in lb.backends.values()) <= 9 + 3
            assert sum(b.counters["requests"] for b in lb.backends.values()) == 10

    run(scenario)


def test_rules_route_by_host_and_path(tmp_path: Path) -> None:
    settings = RouterSettings(
        affinity=False,
        rules=[
            {"app": "api", "path_prefix": "/api/"},  # type: ignore[list-item]
            {"app": "api", "host": "*.api.test"},  # type: ignore[list-item]
        ],
        default_app="web",
    )

    async def scenario() -> None:
        async with lab(tmp_path, settings) as lb:
            c = await Client.open(lb.routers[0])
            for _ in range(3):
                _, body = await c.request("GET", "/api/x")
                assert json.loads(body)["backend"] == "h3"
                _, body = await c.request("GET", "/", host="v1.api.test:8080")
                assert json.loads(body)["backend"] == "h3"
            got = {json.loads((await c.request("GET", "/x"))[1])["backend"] for _ in range(3)}
            assert got == {"h1", "h2", "h3"}
            c.close()

    run(scenario)


def test_request_is_modified(tmp_path: Path) -> None:
    settings = RouterSettings(
        affinity=False,
        header_rules=[
            {  # type: ignore[list-item]
                "app": "web",
                "request_set": {"X-App": "web"},
                "request_remove": ["X-Secret"],
                "response_set": {"X-Via": "hanlb"},
                "response_remove": ["X-Backend"],
            }
        ],
    )

    async def scenario() -> None:
        async with lab(tmp_path, settings) as lb:
            c = await Client.open(lb.routers[0])
            head, body = await c.request(
                "GET",
                "/",
                {
                    "X-Forwarded-For": "10.0.0.9",
                    "Connection": "keep-alive, X-Hop",
                    "X-Hop": "1",
                    "Keep-Alive": "timeout=5",
                    "Proxy-Authorization": "x",
                    "TE": "trailers",
                    "X-Secret": "s",
                },
            )
            seen = json.loads(body)["headers"]
            assert seen["x-forwarded-for"] == "10.0.0.9, 127.0.0.1"
            assert seen["x-forwarded-proto"] == "http"
            assert seen["x-request-id"]
            assert seen["x-app"] == "web"
            for gone in ("connection", "x-hop", "keep-alive", "proxy-authorization", "te"):
                assert gone not in seen, gone
            assert "x-secret" not in seen
            assert hdr(head, "X-Via") == "hanlb" and hdr(head, "X-Backend") is None
            _, body = await c.request("GET", "/", {"X-Request-Id": "abc"})
            assert json.loads(body)["headers"]["x-request-id"] == "abc"
            c.close()

    run(scenario)


# -- affinity ------------------------------------------------------------------------------


def test_affinity_cookie_keeps_a_client_on_one_host(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with lab(tmp_path, RouterSettings()) as lb:
            c = await Client.open(lb.routers[0])
            head, body = await c.request("GET", "/", cookies=True)
            first = json.loads(body)["backend"]
            assert "HANLB_AFFINITY" in c.cookies
            cookie = c.cookies["HANLB_AFFINITY"]
            for _ in range(6):
                head, body = await c.request("GET", "/", cookies=True)
                assert json.loads(body)["backend"] == first
                assert hdr(head, "Set-Cookie") is None
            assert c.cookies["HANLB_AFFINITY"] == cookie
            # the host dies: the client is moved and gets a new cookie
            lb.backends[first].close()
            await asyncio.sleep(0.05)
            head, body = await c.request("GET", "/", cookies=True)
            assert head.status == 200
            moved = json.loads(body)["backend"]
            assert moved != first
            assert c.cookies["HANLB_AFFINITY"] != cookie
            for _ in range(3):
                _, body = await c.request("GET", "/", cookies=True)
                assert json.loads(body)["backend"] == moved
            c.close()

    run(scenario)


@pytest.mark.parametrize("forward", [False, True])
def test_backends_do_not_see_the_affinity_cookie(tmp_path: Path, forward: bool) -> None:
    async def scenario() -> None:
        settings = RouterSettings(forward_affinity_cookie=forward)
        async with lab(tmp_path, settings) as lb:
            c = await Client.open(lb.routers[0])
            _, body = await c.request("GET", "/", cookies=True)
            first = json.loads(body)["backend"]
            pair = f"HANLB_AFFINITY={c.cookies['HANLB_AFFINITY']}"
            for cookie, seen in (
                (f"a=1; {pair}; b=2", f"a=1; {pair}; b=2" if forward else "a=1; b=2"),
                (pair, pair if forward else None),
                ("a=1", "a=1"),
            ):
                # twice: requests after a connection's first may take the
                # callback fast path, which renders the request the same way
                for _ in range(2):
                    _, body = await c.request("GET", "/", {"Cookie": cookie})
                    got = json.loads(body)
                    assert got["headers"].get("cookie") == seen, cookie
                    if pair in cookie:
                        assert got["backend"] == first  # still pinned by it
            c.close()

    run(scenario)


def test_affinity_survives_the_router_through_the_tracker(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with lab(tmp_path, RouterSettings(), trackers=2, routers=2) as lb:
            r1, r2 = lb.routers
            hosts_by_cookie: dict[str, str] = {}
            for _ in range(4):  # four clients, pinned by router 1
                c = await Client.open(r1)
                _, body = await c.request("GET", "/", cookies=True)
                hosts_by_cookie[c.cookies["HANLB_AFFINITY"]] = json.loads(body)["backend"]
                c.close()
            assert len(set(hosts_by_cookie.values())) >= 2
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while r1.counters["affinity_tracker_inserts"] < 4:
                assert loop.time() < deadline, dict(r1.counters)
                await asyncio.sleep(0.01)
            r1.stop()
            await lb.tasks[0]
            for cookie, host in hosts_by_cookie.items():
                c = await Client.open(r2)
                for _ in range(2):
                    head, body = await c.request("GET", "/", {"Cookie": f"HANLB_AFFINITY={cookie}"})
                    assert json.loads(body)["backend"] == host
                    assert hdr(head, "Set-Cookie") is None
                c.close()
            assert r2.counters["affinity_tracker_hits"] == 4

    run(scenario, timeout=30)


def test_application_cookie_pins_its_host(tmp_path: Path) -> None:
    async def scenario() -> None:
        settings = RouterSettings(affinity=True, app_cookie="SID")
        async with lab(tmp_path, settings) as lb:
            svc = lb.routers[0]
            # a host's answer sets the application cookie: record it
            conn = svc.router
            conn.affinity.record(conn.affinity.key("http-cookie", "SID=abc"), "h2")
            c = await Client.open(svc)
            for _ in range(4):
                _, body = await c.request("GET", "/", {"Cookie": "SID=abc"})
                assert json.loads(body)["backend"] == "h2"
            c.close()

    run(scenario)


# -- TLS -------------------------------------------------------------------------------------


def make_cert(tmp_path: Path) -> tuple[str, str]:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the TLS test needs the openssl CLI"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=test",
            "-days", "2", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def test_tls_termination(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    settings = RouterSettings(tls_cert=cert, tls_key=key)

    async def scenario() -> None:
        async with lab(tmp_path, settings) as lb:
            ctx = ssl.create_default_context(cafile=cert)
            ctx.check_hostname = False
            c = await Client.open(lb.routers[0], ctx)
            head, body = await c.request("GET", "/", cookies=True)
            assert head.status == 200
            doc = json.loads(body)
            assert doc["headers"]["x-forwarded-proto"] == "https"
            set_cookie = hdr(head, "Set-Cookie")
            assert set_cookie is not None and "Secure" in set_cookie
            for _ in range(3):
                _, body = await c.request("GET", "/", cookies=True)
                assert json.loads(body)["backend"] == doc["backend"]
            c.close()

    run(scenario)


# -- HTTP semantics ---------------------------------------------------------------------------


def test_chunked_bodies_both_ways_head_and_100_continue(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with lab(tmp_path, NO_AFFINITY) as lb:
            c = await Client.open(lb.routers[0])
            payload = os.urandom(300_000)
            head, body = await c.request("POST", "/echo", body=payload, chunked=True)
            assert head.status == 200 and body == payload
            echoed = json.loads(hdr(head, "X-Echo-Headers") or "{}")
            assert echoed["transfer-encoding"] == "chunked"
            head, body = await c.request("GET", "/chunked?n=5&size=1000")
            assert hdr(head, "Transfer-Encoding") == "chunked"
            assert body == b"".join(bytes([0x61 + i]) * 1000 for i in range(5))
            head, body = await c.request("HEAD", "/")
            assert head.status == 200 and body == b"" and int(hdr(head, "Content-Length") or 0)
            head, body = await c.request("HEAD", "/chunked")
            assert head.status == 200 and body == b""
            # close-delimited backend answers are re-chunked for a 1.1 client
            head, body = await c.request("GET", "/close")
            assert body.startswith(b"closing from") and hdr(head, "Transfer-Encoding")
            # Expect: 100-continue: the router answers 100 itself, then reads the body
            assert c.writer is not None
            c.writer.write(
                b"PUT /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5\r\n\r\n"
            )
            await c.writer.drain()
            interim = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 2)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            c.writer.write(b"hello")
            head, body = await c.response("PUT")
            assert head.status == 200 and body == b"hello"
            echoed = json.loads(hdr(head, "X-Echo-Headers") or "{}")
            assert "expect" not in echoed
            # the connection still works
            head, _ = await c.request("GET", "/")
            assert head.status == 200
            c.close()

    run(scenario)


def test_five_megabytes_both_ways(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with lab(tmp_path, NO_AFFINITY) as lb:
            c = await Client.open(lb.routers[0])
            payload = os.urandom(5 << 20)
            head, body = await c.request("POST", "/echo", body=payload)
            assert head.status == 200 and body == payload
            head, body = await c.request("PUT", "/echo", body=payload, chunked=True)
            assert head.status == 200 and body == payload
            head, body = await c.request("GET", f"/chunked?n=50&size={100 << 10}")
            assert len(body) == 50 * (100 << 10)
            c.close()

    run(scenario)


def test_http_10_client(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with lab(tmp_path, NO_AFFINITY) as lb:
            out = await raw_exchange(lb.routers[0], b"GET /chunked?n=2&size=3 HTTP/1.0\r\n\r\n")
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert b"chunked" not in head.lower() and body == b"aaabbb"

    run(scenario)


# -- failures ------------------------------------------------------------------------------------


def test_dead_backend_is_retried_on_another_host(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with lab(tmp_path, NO_AFFINITY) as lb:
            svc = lb.routers[0]
            c = await Client.open(svc)
            # h2 dies with its pooled connections open: the router finds out on use
            lb.backends["h2"].close()
            await asyncio.sleep(0.05)
            for _ in range(9):
                head, body = await c.request("GET", "/")
                assert head.status == 200
                assert json.loads(body)["backend"] != "h2"
            c.close()
            assert svc.counters["backend_connect_retries"] + svc.counters["retries"] >= 1

    run(scenario)


def test_post_to_dead_backend_is_502_and_no_host_is_503(tmp_path: Path) -> None:
    settings = RouterSettings(
        affinity=False,
        rules=[{"app": "api", "path_prefix": "/api"}],  # type: ignore[list-item]
        host_down_for=0.05,
        pool_check_interval=10,
    )

    async def scenario() -> None:
        async with lab(tmp_path, settings, dead=("h3",)) as lb:
            svc = lb.routers[0]
            # app "api" has only h3, which never came up: the pool keeper marked it down
            pool = svc.router.app_pools["api"]["h3"]
            assert pool.opened == 0
            await asyncio.sleep(0.1)  # no longer marked down: a connect is tried, refused
            c = await Client.open(svc)
            head, _ = await c.request("POST", "/api/x", body=b"data")
            assert head.status == 502
            c.close()
            c = await Client.open(svc)
            head, _ = await c.request("GET", "/api/x")  # marked down again: no host
            assert head.status == 503
            head, _ = await c.request("GET", "/")  # the connection goes on
            assert head.status == 200
            c.close()

    run(scenario)


def test_slow_backend_is_504(tmp_path: Path) -> None:
    settings = RouterSettings(affinity=False, backend_response_timeout=0.3)

    async def scenario() -> None:
        async with lab(tmp_path, settings) as lb:
            c = await Client.open(lb.routers[0])
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            head, _ = await c.request("GET", "/slow?delay=2")
            assert head.status == 504
            assert loop.time() - t0 < 1.5
            c.close()

    run(scenario)


def test_limits(tmp_path: Path) -> None:
    settings = RouterSettings(
        affinity=False, max_body_bytes=1000, max_header_bytes=1024, client_header_timeout=0.3
    )

    async def scenario() -> None:
        async with lab(tmp_path, settings) as lb:
            svc = lb.routers[0]
            out = await raw_exchange(
                svc, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
            )
            assert out.startswith(b"HTTP/1.1 413")
            c = await Client.open(svc)
            head, _ = await c.request("POST", "/echo", body=b"x" * 5000, chunked=True)
            assert head.status == 413
            c.close()
            out = await raw_exchange(
                svc, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
            )
            assert out.startswith(b"HTTP/1.1 431")
            out = await raw_exchange(svc, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 431")
            out = await raw_exchange(svc, b"GARBAGE\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 400")
            # a head that never ends: 408 after client_header_timeout
            assert svc.address is not None
            r, w = await asyncio.open_connection(*svc.address)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            got = await asyncio.wait_for(r.read(), 2)
            assert got.startswith(b"HTTP/1.1 408")
            w.close()

    run(scenario)


pytestmark = pytest.mark.timeout(60)
