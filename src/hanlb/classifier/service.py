"""The classifier process: a listener for forwarders around ``ClassifierCore``,
with a session-tracker client (when the config has trackers) and a health
client feeding token allotments (when the config has HL handlers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Coroutine
from typing import Any

from ..admin import AdminServer, CountersCollector
from ..config import ClusterConfig
from ..net import Link, LinkClosed, accept_link
from ..protocol.messages import Hello, Ping, Pong
from .core import ClassifierCore, Lookup
from .selection import HostSelector

__all__ = ["ClassifierService"]

log = logging.getLogger("hanlb.classifier")


class ClassifierService:
    def __init__(self, config: ClusterConfig, name: str) -> None:
        self.config = config
        self.cc = config.classifier(name)
        self.name = name
        self.net_counters: Counter[str] = Counter()
        selector: HostSelector | None = None
        self.health = None
        self.selector_counters: Counter[str] = Counter()
        if config.handlers:
            from ..health.client import HealthClient
            from ..health.tokens import TokenSelector

            tokens = TokenSelector.from_config(config)
            self.selector_counters = tokens.counters
            selector = tokens
            self.health = HealthClient(config, name, tokens)
        self.tracker = None
        if config.trackers:
            from ..tracker.client import AsyncTrackerClient

            self.tracker = AsyncTrackerClient(config, self.net_counters, name=name)
        self.core = ClassifierCore(config, selector, use_tracker=self.tracker is not None)
        self.forwarders: dict[str, Link] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {**self.core.counters, **self.net_counters}
        out.update({f"selector_{k}": v for k, v in self.selector_counters.items()})
        if self.health is not None:
            out.update({f"health_{k}": v for k, v in self.health.counters.items()})
        return out

    async def run(self) -> None:
        admin = AdminServer(self.config.cluster.run_dir, self.name, self.cc.admin)
        admin.routes["/status"] = self.status
        admin.actions["/pool"] = self.core.change_pool
        admin.registry.register(
            CountersCollector(
                "hanlb_classifier",
                self.name,
                self.counters,
                lambda: {"flows": len(self.core.flows), "forwarders": len(self.forwarders)},
            )
        )
        await admin.start()
        if self.tracker is not None:
            await self.tracker.connect()
        if self.health is not None:
            self._spawn(self.health.run())
        self._spawn(self._housekeeping())
        host, port = self.cc.endpoint
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        log.info("classifier %s listening on %s:%d", self.name, host, port)
        try:
            await self._server.serve_forever()
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self.health is not None:
                self.health.stop()
            if self.tracker is not None:
                self.tracker.close()
            admin.close()

    def status(self) -> dict[str, object]:
        return {
            "role": "classifier",
            "name": self.name,
            "forwarders": sorted(self.forwarders),
            "flows": len(self.core.flows),
            "placed": dict(self.core.placed),
            "pools": self.core.pools,
            "firewall": self.core.firewall_counts(),
            "tracker": self.tracker is not None,
            "health": self.health is not None,
            "handler": self.health.handler if self.health is not None else None,
            "counters": self.counters(),
        }

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            self.core.handle_timer(loop.time())

    # -- the session tracker -----------------------------------------------------

    def _after_core(self, link: Link) -> None:
        """Send what the core left for the tracker; start lookups."""
        if self.tracker is None:
            return
        writes, deletes = self.core.tracker_writes()
        # Deletes first, in order on the same links: a flow that ended and a new
        # connection reusing its 4-tuple in one batch must end up inserted.
        if deletes:
            self.tracker.delete_nowait(deletes)
        if writes:
            self.tracker.insert_nowait(writes)
        for lookup in self.core.lookups():
            self._spawn(self._lookup(lookup, link))

    async def _lookup(self, lookup: Lookup, link: Link) -> None:
        assert self.tracker is not None
        from ..tracker.entry import flow_key

        loop = asyncio.get_running_loop()
        try:
            found = await self.tracker.query([flow_key(m.flow) for m in lookup.misses])
        except (OSError, TimeoutError, RuntimeError) as exc:
            log.warning("tracker lookup failed: %s", exc)
            self.core.lookup_failed(lookup)
            return
        replies = self.core.resolve(lookup, found, loop.time())
        with contextlib.suppress(LinkClosed):
            if replies:
                link.send(*replies)
        self._after_core(link)

    # -- forwarders ---------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = accept_link(reader, writer, self.config.key_bytes, self.net_counters)
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
                        self._after_core(link)
        except LinkClosed:
            pass
        finally:
            link.close()
            if peer is not None and self.forwarders.get(peer) is link:
                del self.forwarders[peer]
                self.core.peer_lost(peer, loop.time())
                log.info("forwarder %s disconnected", peer)
