"""Agents, handlers and a classifier's health client over real loopback TCP.

Two hosts (127.0.0.2 and 127.0.0.3) each run a tiny HTTP application; two
agents probe them and heartbeat to two handlers; a health client subscribes
to the first handler. Handler 1 dies: the client moves to handler 2 and
allotments keep coming. Then a fresh handler 1 starts empty and rebuilds its
cache from the agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path

from hanlb.admin import query
from hanlb.config import ClusterConfig, parse_config
from hanlb.health.agent import AgentService
from hanlb.health.client import HealthClient
from hanlb.health.handler import HandlerService
from hanlb.health.tokens import TokenSelector

HB = 0.1
RECONNECT = 0.05


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def config(run_dir: Path, app_port: int) -> ClusterConfig:
    return parse_config(
        {
            "cluster": {"key": "k" * 32, "run_dir": str(run_dir)},
            "timers": {"liveness_interval": 0.05, "reconnect_interval": RECONNECT},
            "health": {"heartbeat_interval": HB, "heartbeat_misses": 3},
            "hosts": [
                {"name": "h1", "address": "127.0.0.2", "mac": "02:00:00:00:00:01"},
                {"name": "h2", "address": "127.0.0.3", "mac": "02:00:00:00:00:02"},
            ],
            "applications": [
                {
                    "name": "web",
                    "vip": "10.93.0.1",
                    "port": app_port,
                    "pool": [{"host": "h1", "weight": 1}, {"host": "h2", "weight": 3}],
                    "health_check": {"interval": 0.05, "timeout": 0.3, "rise": 1, "fall": 1},
                }
            ],
            "handlers": [
                {"name": "hl1", "listen": f"127.0.0.1:{free_port()}"},
                {"name": "hl2", "listen": f"127.0.0.1:{free_port()}"},
            ],
        }
    )


async def app_server(address: str, port: int, load: str) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.0 200 OK\r\nX-Load: {load}\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, address, port, reuse_address=True)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not cond():
        assert loop.time() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.005)
    return loop.time() - start


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_failover_and_cache_rebuild(tmp_path: Path) -> None:
    app_port = free_port()
    cfg = config(tmp_path, app_port)

    async def scenario() -> None:
        apps = [
            await app_server("127.0.0.2", app_port, "0.0"),
            await app_server("127.0.0.3", app_port, "0.5"),
        ]
        hl1, hl2 = HandlerService(cfg, "hl1"), HandlerService(cfg, "hl2")
        t_hl1 = asyncio.create_task(hl1.run())
        t_hl2 = asyncio.create_task(hl2.run())
        await asyncio.sleep(0.05)
        agents = [
            AgentService(cfg, "h1", probe_address="127.0.0.2"),
            AgentService(cfg, "h2", probe_address="127.0.0.3"),
        ]
        t_agents = [asyncio.create_task(a.run()) for a in agents]
        selector = TokenSelector.from_config(cfg)
        client = HealthClient(cfg, "cl1", selector)
        t_client = asyncio.create_task(client.run())
        loop = asyncio.get_running_loop()

        def tokens() -> dict[str, int] | None:
            return selector.tokens_left("web", loop.time())

        # both endpoints up, h2 reports load 0.5: shares 1 * 1000 : 3 * 500
        await until(lambda: client.handler == "hl1" and tokens() == {"h1": 400, "h2": 600})
        hosts = await asyncio.to_thread(query, str(tmp_path), "hl1", "/hosts")
        assert hosts["h2"]["alive"] and hosts["h2"]["in_sync"]
        assert hosts["h2"]["endpoints"]["web"]["app_load"] == 0.5
        assert hosts["h2"]["endpoints"]["web"]["tokens"] == 600
        assert hosts["h1"]["last_heartbeat"] is not None
        status = await asyncio.to_thread(query, str(tmp_path), "hl1", "/status")
        assert status["subscribers"] == {"classifier:cl1": ["web"]}
        metrics = await asyncio.to_thread(query, str(tmp_path), "hl1", "/metrics")
        assert "hanlb_handler_heartbeats_total" in metrics
        agent_status = await asyncio.to_thread(query, str(tmp_path), "h1-agent", "/status")
        assert agent_status["endpoints"]["web"]["up"] is True

        # spending tokens makes the client ask for more, and they come
        for _ in range(700):
            assert selector.choose("web", loop.time()) in ("h1", "h2")
        await until(lambda: selector.counters["allotments_received"] >= 2)

        # handler 1 dies: the client moves to handler 2; allotments keep coming
        await stop(t_hl1)
        await until(lambda: client.handler == "hl2")
        received = selector.counters["allotments_received"]
        for _ in range(700):
            selector.choose("web", loop.time())
        await until(lambda: selector.counters["allotments_received"] > received)
        assert selector.counters["no_host_all_down"] == 0

        # the application on h2 dies: its tokens go to 0
        apps[1].close()
        await apps[1].wait_closed()
        await until(lambda: tokens() == {"h1": 1000, "h2": 0})

        # a fresh handler 1 rebuilds its cache from the agents
        hl1b = HandlerService(cfg, "hl1")
        t_hl1b = asyncio.create_task(hl1b.run())
        await until(lambda: hasattr(hl1b, "core"))

        def converged() -> bool:
            return all(
                hl1b.core.hosts[a.name].synced
                and hl1b.core.hosts[a.name].table.checksum() == a.core.table.checksum()
                for a in agents
            )

        took = await until(converged)
        assert took < RECONNECT + 3 * HB, took
        assert hl1b.core.tokens("web") == {"h1": 1000, "h2": 0}

        await stop(t_client)
        for t in [*t_agents, t_hl2, t_hl1b]:
            await stop(t)
        apps[0].close()

    asyncio.run(scenario())
