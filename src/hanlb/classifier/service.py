"""The classifier process: a listener for forwarders around ``ClassifierCore``."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter

from ..admin import AdminServer, CountersCollector
from ..config import ClusterConfig
from ..net import Link, LinkClosed
from ..protocol.messages import Hello, Ping, Pong
from .core import ClassifierCore

__all__ = ["ClassifierService"]

log = logging.getLogger("hanlb.classifier")


class ClassifierService:
    def __init__(self, config: ClusterConfig, name: str) -> None:
        self.config = config
        self.cc = config.classifier(name)
        self.name = name
        self.core = ClassifierCore(config)
        self.net_counters: Counter[str] = Counter()
        self.forwarders: dict[str, Link] = {}
        self._server: asyncio.Server | None = None

    async def run(self) -> None:
        admin = AdminServer(self.config.cluster.run_dir, self.name, self.cc.admin)
        admin.routes["/status"] = self.status
        admin.registry.register(
            CountersCollector(
                "hanlb_classifier",
                self.name,
                lambda: {**self.core.counters, **self.net_counters},
                lambda: {"flows": len(self.core.flows), "forwarders": len(self.forwarders)},
            )
        )
        await admin.start()
        host, port = self.cc.endpoint
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        log.info("classifier %s listening on %s:%d", self.name, host, port)
        try:
            await self._server.serve_forever()
        finally:
            admin.close()

    def status(self) -> dict[str, object]:
        return {
            "role": "classifier",
            "name": self.name,
            "forwarders": sorted(self.forwarders),
            "flows": len(self.core.flows),
            "placed": dict(self.core.placed),
            "counters": {**self.core.counters, **self.net_counters},
        }

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = Link(reader, writer, self.config.key_bytes, self.net_counters)
        loop = asyncio.get_running_loop()
        peer: str | None = None
        try:
            while True:
                for msg in await link.recv():
                    if peer is None:
                        if not isinstance(msg, Hello):
                            self.net_counters["no_hello"] += 1
                            link.close()
                            return
                        peer = msg.node
                        self.forwarders[peer] = link
                        log.info("forwarder %s connected from %s", peer, link.peer)
                    elif isinstance(msg, Ping):
                        link.send(Pong(msg.seq, msg.sent))
                    elif isinstance(msg, Pong):
                        pass
                    else:
                        replies = self.core.on_message(peer, msg, loop.time())
                        if replies:
                            link.send(*replies)
        except LinkClosed:
            pass
        finally:
            link.close()
            if peer is not None and self.forwarders.get(peer) is link:
                del self.forwarders[peer]
                self.core.peer_lost(peer)
                log.info("forwarder %s disconnected", peer)
