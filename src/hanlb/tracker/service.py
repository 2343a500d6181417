"""The tracker node process: ``TrackerNode`` behind one TCP port and an admin socket.

Peers and clients connect to the same ``listen`` address; the first message
on a connection is ``Hello``: role ``tracker`` from a configured member makes
it a peer connection, anything else a client (named ``<node>#<n>`` inside the
core). Each node also dials every peer and sends its own messages to that peer
on the link it dialled (or, until that is up, on the peer's inbound link).
Frames that fail authentication or decoding are dropped and counted by the
``Link``; a connection that does not start with ``Hello`` is closed.

Admin socket (``<run_dir>/<name>.sock``): ``/status`` (members and their
liveness, entry counts, counters), ``/entries`` (every entry held, JSON) and
``/metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import Counter

from ..admin import AdminServer, CountersCollector
from ..config import ClusterConfig
from ..net import Link, LinkClosed, accept_link, open_link
from ..protocol.messages import Hello
from .node import EntriesPurged, HandedOff, PeerDown, PeerUp, TrackerNode

__all__ = ["TrackerService"]

log = logging.getLogger("hanlb.tracker")


class TrackerService:
    def __init__(self, config: ClusterConfig, name: str) -> None:
        nodes = {n.name: n for n in config.trackers}
        if name not in nodes:
            raise KeyError(f"no tracker named {name!r}")
        self.config = config
        self.name = name
        self.node_config = nodes[name]
        self.endpoints = {n: c.endpoint for n, c in nodes.items()}
        self.net_counters: Counter[str] = Counter()
        self.incarnation = int.from_bytes(os.urandom(4), "big")
        self.peer_links: dict[str, Link] = {}
        """Links this node dialled, by peer name."""
        self.inbound_peers: dict[str, Link] = {}
        self.clients: dict[str, Link] = {}
        self.core: TrackerNode | None = None
        self._client_ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = float("inf")
        self._stopping = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        core = self.core = TrackerNode.from_config(self.config, self.name, now=loop.time())
        admin = AdminServer(self.config.cluster.run_dir, self.name, self.node_config.admin)
        admin.routes["/status"] = self.status
        admin.routes["/entries"] = self.entry_rows
        admin.registry.register(
            CountersCollector(
                "hanlb_tracker",
                self.name,
                lambda: {**core.counters, **self.net_counters},
                lambda: {
                    "entries": float(len(core.entries)),
                    "live_members": float(len(core.live)),
                    "clients": float(len(self.clients)),
                },
            )
        )
        await admin.start()
        host, port = self.node_config.endpoint
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        log.info("tracker %s listening on %s:%d", self.name, host, port)
        for peer in core.peers:
            self._tasks.append(asyncio.create_task(self._peer_loop(peer)))
        self._arm_timer()
        try:
            await self._stopping.wait()
        finally:
            self._server.close()
            for task in self._tasks:
                task.cancel()
            for link in [*self.peer_links.values(), *self.inbound_peers.values()]:
                link.close()
            for link in self.clients.values():
                link.close()
            if self._timer is not None:
                self._timer.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            admin.close()
            log.info("tracker %s stopped", self.name)

    def stop(self) -> None:
        self._stopping.set()

    # -- admin ---------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        core = self._core()
        return {
            "role": "tracker",
            **core.status(asyncio.get_running_loop().time()),
            "peer_links": sorted(self.peer_links),
            "clients": sorted(self.clients),
            "counters": {**core.counters, **self.net_counters},
        }

    def entry_rows(self) -> list[dict[str, object]]:
        core = self._core()
        return [core.entries[k].to_json() for k in sorted(core.entries)]

    def _core(self) -> TrackerNode:
        if self.core is None:
            raise RuntimeError("tracker service not running")
        return self.core

    # -- connections ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        core = self._core()
        link = accept_link(reader, writer, self.config.key_bytes, self.net_counters)
        src: str | None = None
        peer = False
        try:
            while True:
                msgs = await link.recv()
                now, wall = asyncio.get_running_loop().time(), time.time()
                for msg in msgs:
                    if src is not None:
                        core.on_message(src, msg, now, wall)
                        continue
                    if not isinstance(msg, Hello):
                        self.net_counters["no_hello"] += 1
                        return
                    if msg.role == "tracker":
                        if msg.node not in core.last_heard:
                            self.net_counters["unknown_peer"] += 1
                            log.warning("tracker %s: unknown peer %r", self.name, msg.node)
                            return
                        src, peer = msg.node, True
                        self.inbound_peers[src] = link
                        core.on_peer_hello(src, msg.incarnation, now, wall)
                    else:
                        src = f"{msg.node}#{next(self._client_ids)}"
                        self.clients[src] = link
                        self.net_counters["client_connects"] += 1
                self._flush()
        except LinkClosed:
            pass
        finally:
            link.close()
            if src is not None:
                links = self.inbound_peers if peer else self.clients
                if links.get(src) is link:
                    del links[src]

    async def _peer_loop(self, peer: str) -> None:
        core = self._core()
        host, port = self.endpoints[peer]
        t = self.config.timers
        while True:
            try:
                link = await open_link(host, port, self.config.key_bytes, self.net_counters, 1.0)
            except (OSError, TimeoutError):
                self.net_counters["peer_connect_failures"] += 1
                await asyncio.sleep(t.reconnect_interval)
                continue
            link.send(Hello(self.name, "tracker", self.incarnation))
            self.peer_links[peer] = link
            self.net_counters["peer_connects"] += 1
            try:
                while True:
                    msgs = await link.recv()
                    now, wall = asyncio.get_running_loop().time(), time.time()
                    for msg in msgs:
                        core.on_message(peer, msg, now, wall)
                    self._flush()
            except LinkClosed:
                self.net_counters["peer_link_losses"] += 1
            finally:
                link.close()
                if self.peer_links.get(peer) is link:
                    del self.peer_links[peer]
            await asyncio.sleep(t.reconnect_interval)

    # -- the core's outputs and timer ---------------------------------------------------------

    def _flush(self) -> None:
        core = self._core()
        batches: dict[str, list[object]] = {}
        for dest, msg in core.messages():
            batches.setdefault(dest, []).append(msg)
        for dest, msgs in batches.items():
            link = self.peer_links.get(dest) or self.inbound_peers.get(dest)
            if link is None:
                link = self.clients.get(dest)
            if link is None:
                self.net_counters["messages_lost_no_link"] += len(msgs)
                continue
            try:
                link.send(*msgs)
            except LinkClosed:
                self.net_counters["messages_lost_link_down"] += len(msgs)
        while (ev := core.next_event()) is not None:
            if isinstance(ev, PeerDown):
                log.warning("tracker %s: peer %s is dead", self.name, ev.name)
            elif isinstance(ev, PeerUp):
                log.info("tracker %s: peer %s is alive", self.name, ev.name)
            elif isinstance(ev, EntriesPurged | HandedOff):
                log.debug("tracker %s: %s", self.name, ev)
        if core.get_timer() < self._timer_when:
            self._arm_timer()

    def _arm_timer(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = max(self._core().get_timer(), loop.time())
        self._timer = loop.call_at(self._timer_when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = float("inf")
        self._core().handle_timer(asyncio.get_running_loop().time(), time.time())
        self._flush()
        if self._timer is None:
            self._arm_timer()
