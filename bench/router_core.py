"""Request router benchmark: small requests straight to a backend vs through the router.

Three processes on loopback: one ``EchoBackend`` (127.0.0.2), one ``RouterService``
(127.0.0.1, pooled keep-alive backend connections, affinity off) and this
process as the load generator (uvloop, keep-alive connections, one request in
flight per connection). Each phase runs twice, directly and through the router,
in the same run:

- latency: one connection, sequential requests: p50/p99 per request, and the
  router's added latency (p50 and p99 through the router minus direct);
- throughput: ``--conns`` connections for ``--seconds``: requests/s and p50/p99.

Usage: ``python bench/router_core.py [--seconds 3] [--conns 32] [--json]``.
The load generator shares the machine's cores with the router and the backend;
compare numbers from the same run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from hanlb.config import NodeConfig, parse_config
from hanlb.router import RouterSettings
from hanlb.router.echo import EchoBackend
from hanlb.router.http import END, ResponseHead, ResponseReader
from hanlb.router.service import RouterService

BACKEND = "127.0.0.2"
REQUEST = b"GET /small HTTP/1.1\r\nHost: bench\r\nUser-Agent: router-core\r\n\r\n"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_backend(port: int, ready: Any) -> None:
    async def main() -> None:
        b = EchoBackend("h1")
        await b.start(BACKEND, port)
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


def run_router(backend_port: int, listen_port: int, run_dir: str, ready: Any) -> None:
    config = parse_config(
        {
            "cluster": {"key": "k" * 32, "run_dir": run_dir},
            "hosts": [{"name": "h1", "address": BACKEND, "mac": "02:00:00:00:00:01"}],
            "applications": [
                {
                    "name": "web",
                    "vip": "10.93.0.1",
                    "port": backend_port,
                    "mode": "http",
                    "pool": [{"host": "h1"}],
                }
            ],
        }
    )
    settings = RouterSettings(affinity=False, pool_min_idle=8, pool_max_idle=256)
    node = NodeConfig(name="rtbench", listen=f"127.0.0.1:{listen_port}")

    async def main() -> None:
        svc = RouterService(config, "rtbench", settings=settings, node=node)
        task = asyncio.create_task(svc.run())
        await svc.ready.wait()
        ready.set()
        await task

    uvloop.run(main())


async def one_conn(
    addr: tuple[str, int], until: float, count: int | None, lat: list[float]
) -> None:
    reader, writer = await asyncio.open_connection(*addr)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    parser = ResponseReader()
    loop = asyncio.get_running_loop()
    done = 0
    try:
        while (count is None or done < count) and loop.time() < until:
            parser.start("GET")
            t0 = time.perf_counter()
            writer.write(REQUEST)
            status = 0
            finished = False
            while not finished:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed")
                parser.feed(data)
                while parser.events:
                    ev = parser.events.popleft()
                    if isinstance(ev, ResponseHead):
                        status = ev.status
                    elif ev is END:
                        finished = True
            lat.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"status {status}")
            done += 1
    finally:
        writer.close()


async def phase(
    addr: tuple[str, int], conns: int, seconds: float, count: int | None
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    t0 = time.perf_counter()
    until = loop.time() + seconds
    await asyncio.gather(*(one_conn(addr, until, count, lat) for _ in range(conns)))
    elapsed = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) >= 100 else [lat[len(lat) // 2]] * 99
    return {
        "requests": len(lat),
        "rps": len(lat) / elapsed,
        "p50_us": q[49] * 1e6,
        "p99_us": q[98] * 1e6,
    }


async def measure(direct: tuple[str, int], routed: tuple[str, int], args: Any) -> dict[str, Any]:
    # warm-up
    await phase(direct, 4, 0.3, None)
    await phase(routed, 4, 0.3, None)
    out: dict[str, Any] = {}
    out["latency_direct"] = await phase(direct, 1, args.seconds, args.latency_requests)
    out["latency_router"] = await phase(routed, 1, args.seconds, args.latency_requests)
    out["added_p50_us"] = out["latency_router"]["p50_us"] - out["latency_direct"]["p50_us"]
    out["added_p99_us"] = out["latency_router"]["p99_us"] - out["latency_direct"]["p99_us"]
    out["throughput_direct"] = await phase(direct, args.conns, args.seconds, None)
    out["throughput_router"] = await phase(routed, args.conns, args.seconds, None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--latency-requests", type=int, default=5000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    backend_port = free_port(BACKEND)
    router_port = free_port("127.0.0.1")
    b_ready, r_ready = ctx.Event(), ctx.Event()
    with tempfile.TemporaryDirectory() as run_dir:
        procs = [
            ctx.Process(target=run_backend, args=(backend_port, b_ready), daemon=True),
            ctx.Process(
                target=run_router,
                args=(backend_port, router_port, str(Path(run_dir)), r_ready),
                daemon=True,
            ),
        ]
        procs[0].start()
        if not b_ready.wait(10):
            raise SystemExit("backend did not start")
        procs[1].start()
        if not r_ready.wait(10):
            raise SystemExit("router did not start")
        try:
            result = uvloop.run(measure((BACKEND, backend_port), ("127.0.0.1", router_port), args))
        finally:
            for p in procs:
                p.terminate()
                p.join(5)
    result["conns"] = args.conns
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print("small GET, loopback; load generator, router and backend share the machine")
    for kind in ("latency", "throughput"):
        for via in ("direct", "router"):
            r = result[f"{kind}_{via}"]
            print(
                f"{kind:10} {via:6}  {r['requests']:8d} req  {r['rps']:9.0f} req/s"
                f"  p50 {r['p50_us']:7.0f} us  p99 {r['p99_us']:7.0f} us"
            )
    print(
        f"added latency through the router: p50 {result['added_p50_us']:.0f} us, "
        f"p99 {result['added_p99_us']:.0f} us"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
