"""Forwarder and classifier services over real loopback TCP, memory datapath."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

from hanlb.admin import query
from hanlb.classifier.service import ClassifierService
from hanlb.config import parse_config
from hanlb.flow import SYN
from hanlb.forwarder.datapath import MemoryDatapath
from hanlb.forwarder.service import ForwarderService
from hanlb.net import open_link
from hanlb.protocol.messages import Hello
from tests.packets import tcp_frame


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster(run_dir: Path, port: int) -> dict[str, object]:
    return {
        "cluster": {"key": "k" * 32, "run_dir": str(run_dir)},
        "hosts": [
            {"name": f"h{i}", "address": f"10.92.0.{100 + i}", "mac": f"02:92:00:00:01:{i:02x}"}
            for i in (1, 2)
        ],
        "applications": [
            {
                "name": "web",
                "vip": "10.93.0.1",
                "port": 80,
                "pool": [{"host": "h1"}, {"host": "h2"}],
            }
        ],
        "forwarders": [{"name": "fw1", "address": "127.0.0.1", "datapath": "memory"}],
        "classifiers": [{"name": "cl1", "listen": f"127.0.0.1:{port}"}],
    }


async def until(cond: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_misses_are_plumbed_through_a_real_classifier(tmp_path: Path) -> None:
    config = parse_config(cluster(tmp_path, free_port()))

    async def scenario() -> None:
        cl = ClassifierService(config, "cl1")
        dp = MemoryDatapath()
        fw = ForwarderService(config, "fw1", datapath=dp)
        tasks = [asyncio.create_task(cl.run())]
        await asyncio.sleep(0.05)
        tasks.append(asyncio.create_task(fw.run()))
        await until(lambda: fw.link is not None)
        assert dp.deliver is not None
        for port in range(2000, 2200):
            dp.deliver(
                tcp_frame("10.91.1.2", port, "10.93.0.1", 80, SYN, dst_mac="02:00:00:00:00:01")
            )
        await until(lambda: len(dp.sent) == 200)
        assert len(dp.routes) == 200
        assert sum(dp.install_batches) == 200
        assert len(dp.install_batches) < 200  # batched
        hosts = {mac for mac in dp.routes.values()}
        assert len(hosts) == 2
        assert cl.core.counters["classify_requests"] == 200
        status = await asyncio.to_thread(query, str(tmp_path), "fw1", "/status")
        assert status["routes"] == 200 and status["classifier"] == "cl1"
        metrics = await asyncio.to_thread(query, str(tmp_path), "cl1", "/metrics")
        assert "hanlb_classifier_new_flows_total" in metrics

        # a peer with the wrong key is dropped and counted, nothing crashes
        host, port = config.classifier("cl1").endpoint
        counters: dict[str, int] = {}
        bad = await open_link(host, port, b"x" * 32, counters, timeout=1)  # type: ignore[arg-type]
        bad.send(Hello("mallory", "forwarder", 1))
        await until(lambda: cl.net_counters["rejected_BAD_MAC"] == 1)
        bad.close()
        raw_reader, raw_writer = await asyncio.open_connection(host, port)
        raw_writer.write(b"GET / HTTP/1.0\r\n\r\n")
        await until(lambda: cl.net_counters["closed_BAD_MAGIC"] == 1)
        assert await raw_reader.read() == b""
        raw_writer.close()

        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    asyncio.run(scenario())


def test_forwarder_moves_to_the_next_classifier_and_retries_held_misses(tmp_path: Path) -> None:
    doc = cluster(tmp_path, free_port())
    doc["classifiers"] = [  # type: ignore[index]
        {"name": "cl1", "listen": f"127.0.0.1:{free_port()}"},
        {"name": "cl2", "listen": f"127.0.0.1:{free_port()}"},
    ]
    doc["forwarders"][0]["classifiers"] = ["cl1", "cl2"]  # type: ignore[index]
    config = parse_config(doc)

    async def scenario() -> None:
        cl1, cl2 = ClassifierService(config, "cl1"), ClassifierService(config, "cl2")
        dp = MemoryDatapath()
        fw = ForwarderService(config, "fw1", datapath=dp)
        t1 = asyncio.create_task(cl1.run())
        t2 = asyncio.create_task(cl2.run())
        await asyncio.sleep(0.05)
        tf = asyncio.create_task(fw.run())
        await until(lambda: fw.classifier == "cl1")
        t1.cancel()  # classifier 1 dies
        with contextlib.suppress(asyncio.CancelledError):
            await t1
        assert cl1._server is not None
        cl1._server.close()
        for link in list(cl1.forwarders.values()):
            link.close()
        assert dp.deliver is not None
        dp.deliver(tcp_frame("10.91.1.2", 3000, "10.93.0.1", 80, SYN, dst_mac="02:00:00:00:00:01"))
        await until(lambda: fw.classifier == "cl2")
        await until(lambda: len(dp.sent) == 1)
        for t in (t2, tf):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t

    asyncio.run(scenario())


def test_a_returning_classifier_takes_its_forwarder_back(tmp_path: Path) -> None:
    doc = cluster(tmp_path, free_port())
    doc["classifiers"] = [  # type: ignore[index]
        {"name": "cl1", "listen": f"127.0.0.1:{free_port()}"},
        {"name": "cl2", "listen": f"127.0.0.1:{free_port()}"},
    ]
    doc["forwarders"][0]["classifiers"] = ["cl1", "cl2"]  # type: ignore[index]
    config = parse_config(doc)

    async def scenario() -> None:
        dp = MemoryDatapath()
        fw = ForwarderService(config, "fw1", datapath=dp)
        cl1 = ClassifierService(config, "cl1")
        t1 = asyncio.create_task(cl1.run())
        t2 = asyncio.create_task(ClassifierService(config, "cl2").run())
        await asyncio.sleep(0.05)
        tf = asyncio.create_task(fw.run())
        await until(lambda: fw.classifier == "cl1")
        t1.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t1
        for link in list(cl1.forwarders.values()):
            link.close()
        await until(lambda: fw.classifier == "cl2")
        # cl1 comes back: within the take-back interval the forwarder returns
        cl1_again = ClassifierService(config, "cl1")
        t1 = asyncio.create_task(cl1_again.run())
        await until(lambda: fw.classifier == "cl1", timeout=5.0)
        assert fw.net_counters["classifier_takebacks"] == 1
        assert dp.deliver is not None
        dp.deliver(tcp_frame("10.91.1.2", 3001, "10.93.0.1", 80, SYN, dst_mac="02:00:00:00:00:01"))
        await until(lambda: len(dp.sent) == 1)
        assert cl1_again.core.counters["new_flows"] == 1
        for t in (t1, t2, tf):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t

    asyncio.run(scenario())
