"""A classifier's (or request router's) link to the HL handlers (claims 6, 35-42).

``HealthClient`` connects to the first handler of ``config.handlers`` that
answers, introduces itself (``Hello``), subscribes to every application, and
feeds each ``TokenAllotment`` into its ``TokenSelector``. Every
``timers.liveness_interval`` it pings the handler and sends a
``RequestAllotment`` for each application the selector wants. A handler that
has sent nothing (pongs included) for ``liveness_misses`` intervals, or whose
connection closes, is dead: the client moves on to the next handler in the
list (wrapping around), subscribes there, and asks again for whatever it was
waiting for. Meanwhile the selector keeps choosing from its allotments and,
when they run out, from its fallback, so new flows never wait for a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter

from ..config import ClusterConfig
from ..net import Link, LinkClosed, open_link
from ..protocol.messages import Hello, Ping, Pong
from .messages import RequestAllotment, Subscribe, TokenAllotment
from .tokens import TokenSelector

__all__ = ["HealthClient"]

log = logging.getLogger("hanlb.health.client")


class HealthClient:
    def __init__(
        self,
        config: ClusterConfig,
        node_name: str,
        selector: TokenSelector,
        role: str = "classifier",
    ) -> None:
        self.config = config
        self.node = node_name
        self.role = role
        self.selector = selector
        self.handler: str | None = None
        """The handler in use, or None while there is none."""
        self.counters: Counter[str] = Counter()
        self.incarnation = int.from_bytes(os.urandom(4), "big")
        self._link: Link | None = None
        self._stopping = asyncio.Event()
        self._last_heard = 0.0

    def stop(self) -> None:
        self._stopping.set()
        if self._link is not None:
            self._link.close()

    async def run(self) -> None:
        handlers = self.config.handlers
        if not handlers:
            raise ValueError("no [[handlers]] in the configuration")
        t = self.config.timers
        index = 0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            node = handlers[index % len(handlers)]
            host, port = node.endpoint
            try:
                link = await open_link(host, port, self.config.key_bytes, self.counters, 1.0)
            except (OSError, TimeoutError):
                self.counters["handler_connect_failures"] += 1
                index += 1
                await asyncio.sleep(t.reconnect_interval)
                continue
            self._link, self.handler = link, node.name
            self.counters["handler_connects"] += 1
            self.selector.forget_requests()
            self._last_heard = loop.time()
            log.info("%s %s: handler %s", self.role, self.node, node.name)
            ticker = asyncio.create_task(self._tick(link))
            try:
                link.send(
                    Hello(self.node, self.role, self.incarnation),
                    Subscribe(self.node, [a.name for a in self.config.applications]),
                )
                await self._read(link)
            except (LinkClosed, OSError) as exc:
                log.warning("%s %s: handler %s lost: %s", self.role, self.node, node.name, exc)
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                link.close()
                self._link, self.handler = None, None
                self.counters["handler_losses"] += 1
            index += 1

    async def _read(self, link: Link) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msgs = await link.recv()
            now = loop.time()
            self._last_heard = now
            for msg in msgs:
                if isinstance(msg, TokenAllotment):
                    self.selector.on_allotment(msg, now)
                    self.counters["allotments"] += 1
                elif isinstance(msg, Ping):
                    link.send(Pong(msg.seq, msg.sent))
                elif not isinstance(msg, Pong):
                    self.counters["messages_unexpected"] += 1
            self._request(link, now)

    def _request(self, link: Link, now: float) -> None:
        wanted = self.selector.wanted(now)
        if wanted:
            link.send(*(RequestAllotment(a, self.selector.allotment_id(a)) for a in wanted))
            self.counters["allotment_requests"] += len(wanted)

    async def _tick(self, link: Link) -> None:
        t = self.config.timers
        loop = asyncio.get_running_loop()
        seq = 0
        try:
            while True:
                await asyncio.sleep(t.liveness_interval)
                now = loop.time()
                if now - self._last_heard > t.liveness_interval * t.liveness_misses:
                    self.counters["handler_liveness_timeouts"] += 1
                    link.close()
                    return
                seq += 1
                link.send(Ping(seq, now))
                self._request(link, now)
        except LinkClosed:
            return
