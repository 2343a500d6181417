"""The request router process: ``RouterService`` (claims 2, 12, 50-55).

It listens on its ``listen`` address (TLS when ``router.tls_cert``/``tls_key``
are set), fills its backend pools before it accepts the first client
(claim 52), and serves until ``stop()``. Host choice uses a ``TokenSelector``
fed by a ``HealthClient`` when the cluster has HL handlers, else a
``StaticSelector`` over the configured weights; affinity goes through the
session tracker when the cluster has tracker nodes.

Admin socket (``<run_dir>/<name>.sock``): ``/status`` (counters, pools per
host, client connections) and ``/metrics`` (Prometheus, ``hanlb_router_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import Counter
from typing import Any

from ..admin import AdminServer, CountersCollector
from ..classifier.selection import HostSelector, StaticSelector
from ..config import ClusterConfig, ConfigError, NodeConfig
from ..health.client import HealthClient
from ..health.tokens import TokenSelector
from ..tracker.client import AsyncTrackerClient
from .affinity import AffinityTable
from .config import RouterSettings, router_nodes, router_settings
from .pool import PoolKeeper, Stream
from .proxy import ClientConnection, Router

__all__ = ["RouterService", "main", "tls_context"]

log = logging.getLogger("hanlb.router")


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class _ClientStream(Stream):
    """A client connection: its ``ClientConnection`` starts when the connection does."""

    def __init__(self, router: Router, tasks: set[asyncio.Task[None]]) -> None:
        super().__init__(256 * 1024)
        self._router = router
        self._tasks = tasks
        self._conn: ClientConnection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock: Any = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = self._conn = ClientConnection(self._router, self)
        task = asyncio.get_running_loop().create_task(conn.serve())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn is not None and conn._idle_wait and conn.client_data(data):
            return  # taken by the fast path
        super().data_received(data)


class RouterService:
    """One request router instance.

    ``settings`` and ``node`` default to ``config.router`` and the entry of
    ``config.routers`` named ``name``; pass them to run a router the cluster
    file does not describe (tests, benchmarks).
    """

    def __init__(
        self,
        config: ClusterConfig,
        name: str,
        *,
        settings: RouterSettings | None = None,
        node: NodeConfig | None = None,
        selector: HostSelector | None = None,
        use_tracker: bool = True,
        use_health: bool = True,
    ) -> None:
        self.config = config
        self.name = name
        self.settings = settings if settings is not None else router_settings(config)
        if node is None:
            nodes = {n.name: n for n in router_nodes(config)}
            if name not in nodes:
                raise KeyError(f"no router named {name!r}")
            node = nodes[name]
        self.node = node
        problems = self.settings.problems(config)
        if problems:
            raise ConfigError(problems, f"router {name}")
        self.counters: Counter[str] = Counter()
        self.tracker = (
            AsyncTrackerClient(config, self.counters, name=f"router-{name}")
            if use_tracker and config.trackers
            else None
        )
        self.health: HealthClient | None = None
        if selector is None:
            if use_health and config.handlers:
                tokens = TokenSelector.from_config(config)
                self.health = HealthClient(config, name, tokens, role="router")
                selector = tokens
            else:
                selector = StaticSelector(
                    {a.name: {m.host: m.weight for m in a.pool} for a in config.applications}
                )
        self.selector = selector
        s = self.settings
        self.affinity = AffinityTable(
            self.tracker, self.counters, cache_size=s.affinity_cache_size, timeout=s.tracker_timeout
        )
        self.ssl = tls_context(s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key else None
        self.router = Router(
            config,
            s,
            selector=selector,
            affinity=self.affinity,
            counters=self.counters,
            tls=self.ssl is not None,
        )
        self.keeper = PoolKeeper(
            list(self.router.pools.values()),
            interval=s.pool_check_interval,
            idle_timeout=s.pool_idle_timeout,
        )
        self.ready = asyncio.Event()
        """Set once the pools are filled and the listener is up."""
        self.address: tuple[str, int] | None = None
        self._stopping = asyncio.Event()
        self._serving: set[asyncio.Task[None]] = set()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        tasks: list[asyncio.Task[Any]] = []
        admin = AdminServer(self.config.cluster.run_dir, self.name, self.node.admin)
        admin.routes["/status"] = self.status
        admin.registry.register(
            CountersCollector(
                "hanlb_router",
                self.name,
                lambda: dict(self.counters),
                self.gauges,
            )
        )
        server: asyncio.Server | None = None
        try:
            if self.health is not None:
                tasks.append(asyncio.create_task(self.health.run()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.keeper.fill(), self.settings.backend_connect_timeout + 0.5
                )
            tasks.append(asyncio.create_task(self.keeper.run()))
            host, port = self.node.endpoint
            server = await asyncio.get_running_loop().create_server(
                self._client_stream,
                host,
                port,
                ssl=self.ssl,
                reuse_address=True,
                backlog=1024,
            )
            sock = server.sockets[0].getsockname()
            self.address = (str(sock[0]), int(sock[1]))
            await admin.start()
            self.ready.set()
            log.info("router %s: listening on %s:%d", self.name, host, port)
            await self._stopping.wait()
        finally:
            if server is not None:
                server.close()
            for conn in list(self.router.connections):
                conn.close()
            admin.close()
            if self.health is not None:
                self.health.stop()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            self.keeper.close()
            self.affinity.close()
            if self.tracker is not None:
                self.tracker.close()
            self.ready.clear()

    def _client_stream(self) -> Stream:
        return _ClientStream(self.router, self._serving)

    # -- admin ---------------------------------------------------------------------------

    def gauges(self) -> dict[str, float]:
        pools = self.router.pools.values()
        return {
            "client_connections_open": float(len(self.router.connections)),
            "backend_idle": float(sum(len(p.idle) for p in pools)),
            "backend_busy": float(sum(p.busy for p in pools)),
            "affinity_cached": float(len(self.affinity)),
        }

    def status(self) -> dict[str, object]:
        now = asyncio.get_running_loop().time()
        return {
            "name": self.name,
            "listen": self.node.listen,
            "tls": self.ssl is not None,
            "connections": len(self.router.connections),
            "pools": [p.status(now) for p in self.router.pools.values()],
            "handler": self.health.handler if self.health is not None else None,
            "tracker": sorted(self.tracker.links) if self.tracker is not None else None,
            "affinity_cached": len(self.affinity),
            "counters": dict(sorted(self.counters.items())),
        }


def main(config: ClusterConfig, name: str) -> None:
    """Run router ``name`` on uvloop until interrupted."""
    import uvloop

    async def run() -> None:
        await RouterService(config, name).run()

    uvloop.run(run())
