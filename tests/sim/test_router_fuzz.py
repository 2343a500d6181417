"""Bad input to a running router over real sockets: 4xx or a closed connection, never a
crash, never a hang. The malformed-request corpus of the unit tests, then Hypothesis.

One router and its backends live for the whole module, on a uvloop running in a
background thread; each example talks to it with a blocking socket and a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hanlb.config import NodeConfig
from hanlb.router import RouterSettings
from hanlb.router.echo import EchoBackend
from hanlb.router.service import RouterService
from tests.sim.test_router_proxy import HOSTS, cluster_config, common_port, free_port
from tests.unit.test_router_http import CORPUS

TIMEOUT = 3.0


class Running:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.loop = uvloop.new_event_loop()
        self.ready = threading.Event()
        self.service: RouterService | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.error: BaseException | None = None

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._run())
        except BaseException as exc:  # reported by the fixture
            self.error = exc
        finally:
            self.loop.close()

    async def _run(self) -> None:
        port = common_port()
        config = cluster_config(self.run_dir, port)
        backends = {n: EchoBackend(n) for n in HOSTS}
        for n, b in backends.items():
            await b.start(HOSTS[n], port)
        node = NodeConfig(name="rtf", listen=f"127.0.0.1:{free_port()}")
        settings = RouterSettings(
            max_header_bytes=4096,
            max_body_bytes=1 << 16,
            client_header_timeout=0.5,
            client_idle_timeout=1.0,
        )
        self.service = RouterService(config, "rtf", settings=settings, node=node)
        task = asyncio.create_task(self.service.run())
        await self.service.ready.wait()
        self.ready.set()
        try:
            await task
        finally:
            for b in backends.values():
                b.close()
            await asyncio.sleep(0.01)

    @property
    def address(self) -> tuple[str, int]:
        assert self.service is not None and self.service.address is not None
        return self.service.address

    def stop(self) -> None:
        if self.service is not None:
            self.loop.call_soon_threadsafe(self.service.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    r = Running(tmp_path_factory.mktemp("router-fuzz"))
    r.thread.start()
    assert r.ready.wait(10), r.error
    yield r
    r.stop()
    assert r.error is None, r.error


def exchange(address: tuple[str, int], data: bytes, half_close: bool = True) -> bytes:
    """Send ``data``, then read until the router closes; a hang fails the test."""
    with socket.create_connection(address, timeout=TIMEOUT) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"router hung on {data[:80]!r}") from None
            if not chunk:
                break
            out += chunk
        return out


def statuses(out: bytes) -> list[int]:
    codes = []
    for line in out.split(b"\r\n"):
        if line.startswith(b"HTTP/1.1 ") and line[9:12].isdigit():
            codes.append(int(line[9:12]))
    return codes


def still_serving(address: tuple[str, int]) -> None:
    out = exchange(address, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200"), out[:200]


@pytest.mark.parametrize(("name", "raw", "allowed"), CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_over_the_socket(router: Running, name: str, raw: bytes, allowed: set[int]) -> None:
    out = exchange(router.address, raw)
    codes = statuses(out)
    # a 413/431 may be chosen over the unit test's status when the router's limits are lower
    assert codes and codes[-1] in allowed | {413, 431}, f"{name}: {out[:200]!r}"
    assert all(c == 200 for c in codes[:-1])  # nothing forwarded but whole good requests


def test_smuggled_request_is_not_forwarded(router: Running) -> None:
    smuggle = (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    out = exchange(router.address, smuggle)
    assert statuses(out) == [400]
    still_serving(router.address)


def test_idle_and_slow_clients_are_cut_off(router: Running) -> None:
    with socket.create_connection(router.address, timeout=TIMEOUT) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHo")
        assert s.recv(4096).startswith(b"HTTP/1.1 408")
    with socket.create_connection(router.address, timeout=TIMEOUT) as s:
        assert s.recv(4096) == b""  # idle: closed without a word


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.binary(min_size=1, max_size=400))
def test_fuzz_random_bytes_over_the_socket(router: Running, data: bytes) -> None:
    out = exchange(router.address, data)
    for code in statuses(out)[-1:]:
        assert 200 <= code < 600


_parts = st.sampled_from(
    [
        b"GET / HTTP/1.1\r\n", b"POST /echo HTTP/1.1\r\n", b"Host: a\r\n",
        b"Content-Length: 3\r\n", b"Content-Length: 99999\r\n", b"Transfer-Encoding: chunked\r\n",
        b"\r\n", b"abc", b"3\r\nabc\r\n", b"0\r\n\r\n", b"zz\r\n", b"\n", b"\x00",
        b"Expect: 100-continue\r\n", b"Connection: close\r\n", b"X: " + b"y" * 3000 + b"\r\n",
    ]
)  # fmt: skip


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(_parts, min_size=1, max_size=25))
def test_fuzz_http_shaped_input_over_the_socket(router: Running, parts: list[bytes]) -> None:
    out = exchange(router.address, b"".join(parts))
    for code in statuses(out):
        assert code in (100, 200, 400, 408, 413, 417, 431, 501, 505), out[:300]


def test_router_survived(router: Running) -> None:
    still_serving(router.address)
    assert router.service is not None
    assert router.service.counters["requests"] > 0
