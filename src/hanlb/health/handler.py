"""The health and load (HL) handler (claims 6-7, 14, 27, 35-42, 67-74).

``HandlerCore`` is the logic without I/O:

- it caches every host's health/load table. On each ``Heartbeat`` it compares
  the whole-table checksum with its cached copy; if they differ it sends
  ``GetTableSnapshot`` for exactly the portions whose checksums differ, or for
  the whole table when the host is unknown (a handler that starts empty) or
  its version went backwards (the agent restarted). Hosts are authoritative;
  the cache is rebuilt from them alone;
- a host whose heartbeats stop for ``heartbeat_misses * heartbeat_interval``
  (measured from the last heartbeat received) has all its endpoints counted
  down, at exactly that time;
- it turns the cache into token allotments (``allot_tokens``) and sends a
  ``TokenAllotment`` to a subscriber on ``Subscribe``, on
  ``RequestAllotment``, and to every subscriber of an application whenever
  the set of that application's endpoints that are up changes;
- a handler that has just started answers nobody for an application until it
  has a snapshot from every host of the application's pool, or until
  ``heartbeat_misses * heartbeat_interval`` have passed since it started
  (hosts that have said nothing by then are down): a fresh, empty handler never
  hands out an allotment that sends every flow to the few hosts it heard from
  first. Requests meanwhile are answered when the application is ready.

``HandlerService`` is the asyncio shell: one listening socket for agents and
for classifiers/request routers (each starts with ``Hello``), liveness
``Ping``/``Pong`` answers, and the admin endpoint (``/status``, ``/hosts``,
``/metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..admin import AdminServer, CountersCollector
from ..config import ClusterConfig, HealthSettings, pool_change
from ..net import Link, LinkClosed, accept_link
from ..protocol.messages import Hello, Ping, Pong
from .messages import (
    GetTableSnapshot,
    Heartbeat,
    RequestAllotment,
    SendTableSnapshot,
    Subscribe,
    TokenAllotment,
    TokenEntry,
)
from .table import HealthTable

__all__ = [
    "MIN_SPARE_MILLI",
    "AppHealthChanged",
    "Candidate",
    "HandlerCore",
    "HandlerService",
    "HostLost",
    "HostSeen",
    "TableUpdated",
    "allot_tokens",
    "spare_milli",
]

log = logging.getLogger("hanlb.health.handler")

MIN_SPARE_MILLI = 50
"""The spare capacity floor, in thousandths (0.05)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One endpoint of an application as the allotment sees it."""

    host: str
    weight: int
    up: bool
    cpu: float = 0.0
    app_load: float = -1.0


def spare_milli(cpu: float, app_load: float) -> int:
    """Spare capacity in thousandths: 1000 - round(1000 * max(cpu, app_load)), in [50, 1000].

    ``app_load`` < 0 (unknown) counts as 0.
    """
    load = max(cpu, app_load if app_load >= 0 else 0.0, 0.0)
    return min(1000, max(MIN_SPARE_MILLI, 1000 - round(1000 * load)))


def allot_tokens(total: int, candidates: Sequence[Candidate]) -> list[int]:
    """Spread ``total`` tokens over ``candidates``; returns tokens per candidate, in order.

    For one application, with ``T = health.allotment_tokens`` and its pool
    endpoints ``i`` (in configuration order)::

        load_i   = max(cpu_i, app_load_i)            app_load_i unknown (-1) counts as 0
        spare_i  = min(1000, max(50, 1000 - round(1000 * load_i)))    thousandths, 0.05 .. 1
        share_i  = weight_i * spare_i                if endpoint i is up, else 0
        quota_i  = T * share_i / S,                  S = sum of share_j over all j
        tokens_i = floor(quota_i) + (1 if i is among the R endpoints with the
                   largest remainders quota_i - floor(quota_i), else 0)
                   where R = T - sum_j floor(quota_j); ties go to the earlier
                   endpoint in pool order

    so the tokens add up to exactly ``T`` (largest-remainder rounding), an
    endpoint that is down or has weight 0 gets 0, and if no endpoint is up
    every endpoint gets 0. "Up" means the host's heartbeats are current and its
    agent reports the endpoint up; ``weight_i`` is the endpoint's weight in the
    pool the handler holds (the configuration's, changed at run time by
    ``hanlb ctl pool``). Active connections are reported but take no part:
    without a capacity per endpoint a count is not a fraction of anything.
    All arithmetic is on integers, so the result is exact and deterministic.
    """
    shares = [
        c.weight * spare_milli(c.cpu, c.app_load) if c.up and c.weight > 0 else 0
        for c in candidates
    ]
    whole = sum(shares)
    if whole == 0:
        return [0] * len(candidates)
    tokens = [total * s // whole for s in shares]
    remainders = [total * s % whole for s in shares]
    left = total - sum(tokens)
    order = sorted(range(len(shares)), key=lambda i: (-remainders[i], i))
    for i in order[:left]:
        tokens[i] += 1
    return tokens


# -- events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostSeen:
    """A host's heartbeats started (again)."""

    host: str
    at: float


@dataclass(frozen=True, slots=True)
class HostLost:
    """A host's heartbeats stopped for heartbeat_misses * heartbeat_interval."""

    host: str
    at: float


@dataclass(frozen=True, slots=True)
class TableUpdated:
    """A snapshot changed these portions of a host's cached table."""

    host: str
    portions: tuple[str, ...]
    version: int


@dataclass(frozen=True, slots=True)
class AppHealthChanged:
    """The set of an application's endpoints that are up changed."""

    app: str
    up: tuple[str, ...]
    at: float


HandlerEvent = HostSeen | HostLost | TableUpdated | AppHealthChanged


@dataclass(slots=True)
class _Host:
    table: HealthTable = field(default_factory=HealthTable)
    synced: bool = False
    """A whole snapshot has been applied at least once."""
    alive: bool = False
    last_heartbeat: float | None = None
    peer: str | None = None
    heartbeat_checksum: bytes = b""
    heartbeat_version: int = 0


class HandlerCore:
    def __init__(
        self,
        name: str,
        pools: dict[str, dict[str, int]],
        settings: HealthSettings,
        now: float,
        first_allotment_id: int = 1,
    ) -> None:
        self.name = name
        self.pools = pools
        """Application -> {host: configured weight}, in configuration order."""
        self.settings = settings
        self.dead_after = settings.heartbeat_misses * settings.heartbeat_interval
        self.hosts: dict[str, _Host] = {h: _Host() for pool in pools.values() for h in pool}
        self.subscribers: dict[str, set[str]] = {}
        """Peer -> applications it subscribed to."""
        self.counters: Counter[str] = Counter()
        self.started = now
        self._ready_at = now + self.dead_after
        self._ready: set[str] = set()
        self._deferred: dict[str, set[str]] = {}
        self._pending: dict[int, tuple[str, bool]] = {}  # req_id -> (host, whole)
        self._next_req = 1
        # Allotment ids grow across restarts (they start from the wall clock in
        # milliseconds), so a subscriber that saw this handler's earlier life
        # does not take a restarted handler's allotments for stale ones.
        self._next_allotment = first_allotment_id
        self._health: dict[str, tuple[str, ...]] = {app: () for app in pools}
        self._out: list[tuple[str, object]] = []
        self._events: list[HandlerEvent] = []

    @classmethod
    def from_config(
        cls, config: ClusterConfig, name: str, now: float, first_allotment_id: int = 1
    ) -> HandlerCore:
        pools = {a.name: {m.host: m.weight for m in a.pool} for a in config.applications}
        return cls(name, pools, config.health, now, first_allotment_id)

    # -- inputs ----------------------------------------------------------------------

    def on_message(self, peer: str, msg: object, now: float) -> None:
        """A message from ``peer`` (an agent's or a subscriber's connection)."""
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(peer, msg, now)
        elif isinstance(msg, SendTableSnapshot):
            self._on_snapshot(msg, now)
        elif isinstance(msg, Subscribe):
            self._on_subscribe(peer, msg, now)
        elif isinstance(msg, RequestAllotment):
            self.counters["allotment_requests"] += 1
            if msg.app not in self.pools:
                self.counters["unknown_app"] += 1
            elif msg.app in self._ready:
                self._send_allotment(peer, msg.app)
            else:
                self._deferred.setdefault(msg.app, set()).add(peer)
        else:
            self.counters["messages_unexpected"] += 1

    def peer_lost(self, peer: str) -> None:
        """A connection closed: forget its subscriptions. A host is judged by heartbeats."""
        self.subscribers.pop(peer, None)
        for waiting in self._deferred.values():
            waiting.discard(peer)
        for h in self.hosts.values():
            if h.peer == peer:
                h.peer = None

    def handle_timer(self, now: float) -> None:
        for name, h in self.hosts.items():
            if (
                h.alive
                and h.last_heartbeat is not None
                and now >= h.last_heartbeat + self.dead_after
            ):
                h.alive = False
                self.counters["hosts_lost"] += 1
                self._events.append(HostLost(name, now))
                log.info("handler %s: host %s lost (no heartbeat)", self.name, name)
        self._refresh(now)

    # -- outputs ---------------------------------------------------------------------

    def get_timer(self) -> float:
        times = [
            h.last_heartbeat + self.dead_after
            for h in self.hosts.values()
            if h.alive and h.last_heartbeat is not None
        ]
        if len(self._ready) < len(self.pools):
            times.append(self._ready_at)
        return min(times) if times else float("inf")

    def messages(self) -> list[tuple[str, object]]:
        """(peer, message) pairs to send."""
        out, self._out = self._out, []
        return out

    def events(self) -> list[HandlerEvent]:
        out, self._events = self._events, []
        return out

    def is_up(self, app: str, host: str) -> bool:
        h = self.hosts.get(host)
        if h is None or not h.alive:
            return False
        row = h.table.row(app)
        return row is not None and row.up

    def candidates(self, app: str) -> list[Candidate]:
        """The pool's endpoints with the weight of the pool this handler holds (the
        configuration, changed at run time by ``set_pool``) and the host's health
        and load."""
        out = []
        for host, weight in self.pools[app].items():
            row = self.hosts[host].table.row(app)
            if row is None:
                out.append(Candidate(host, 0, False))
            else:
                out.append(Candidate(host, weight, self.is_up(app, host), row.cpu, row.app_load))
        return out

    def set_pool(self, app: str, weights: dict[str, int], now: float) -> None:
        """Replace ``app``'s pool (host -> weight) and push new allotments."""
        if app not in self.pools:
            raise KeyError(f"no application named {app!r}")
        self.pools[app] = dict(weights)
        for host in weights:
            self.hosts.setdefault(host, _Host())
        self.counters["pool_changes"] += 1
        self._health[app] = ()
        self._refresh(now)

    def tokens(self, app: str) -> dict[str, int]:
        """The allotment the cache gives ``app`` now (host -> tokens)."""
        cands = self.candidates(app)
        counts = allot_tokens(self.settings.allotment_tokens, cands)
        return {c.host: n for c, n in zip(cands, counts, strict=True)}

    def allotment(self, app: str) -> TokenAllotment:
        """A new allotment for ``app`` (takes the next allotment id)."""
        entries = [TokenEntry(h, n) for h, n in self.tokens(app).items()]
        msg = TokenAllotment(
            app, self._next_allotment, entries, self.settings.allotment_ttl, self.name
        )
        self._next_allotment += 1
        return msg

    def ready(self, app: str) -> bool:
        return app in self._ready

    # -- heartbeat and snapshot ------------------------------------------------------

    def _on_heartbeat(self, peer: str, hb: Heartbeat, now: float) -> None:
        h = self.hosts.get(hb.host)
        if h is None:
            self.counters["heartbeats_unknown_host"] += 1
            return
        self.counters["heartbeats"] += 1
        h.peer = peer
        if not h.alive:
            h.alive = True
            self._events.append(HostSeen(hb.host, now))
        h.last_heartbeat = now
        previous_version = h.heartbeat_version
        h.heartbeat_checksum, h.heartbeat_version = hb.checksum, hb.version
        if h.synced and hb.checksum == h.table.checksum():
            self.counters["heartbeats_in_sync"] += 1
        elif not h.synced or hb.version < h.table.version or hb.version < previous_version:
            self._request(hb.host, h, [])
        else:
            portions = h.table.differing(hb.portions)
            self._request(hb.host, h, portions)
        self._refresh(now)

    def _request(self, host: str, h: _Host, portions: list[str]) -> None:
        assert h.peer is not None
        req = self._next_req
        self._next_req += 1
        self._pending[req] = (host, not portions)
        self._out.append((h.peer, GetTableSnapshot(req, portions)))
        self.counters[
            "snapshot_requests_whole" if not portions else "snapshot_requests_partial"
        ] += 1
        if portions:
            self.counters["snapshot_portions_requested"] += len(portions)
        if len(self._pending) > 10_000:  # answers that never came
            for old in sorted(self._pending)[:5_000]:
                del self._pending[old]

    def _on_snapshot(self, snap: SendTableSnapshot, now: float) -> None:
        pending = self._pending.pop(snap.req_id, None)
        h = self.hosts.get(snap.host)
        if pending is None or h is None or pending[0] != snap.host:
            self.counters["snapshots_unsolicited"] += 1
            return
        whole = pending[1]
        if not whole and (not h.synced or snap.version < h.table.version):
            self.counters["snapshots_stale"] += 1
            return
        changed = h.table.apply(snap.rows, snap.version, whole)
        if whole:
            h.synced = True
        self.counters["snapshots_applied"] += 1
        if changed:
            self._events.append(TableUpdated(snap.host, tuple(sorted(changed)), snap.version))
        self._refresh(now)

    # -- subscriptions and allotments ------------------------------------------------

    def _on_subscribe(self, peer: str, msg: Subscribe, now: float) -> None:
        apps = [a for a in msg.apps if a in self.pools] if msg.apps else list(self.pools)
        if msg.apps and len(apps) < len(msg.apps):
            self.counters["unknown_app"] += len(msg.apps) - len(apps)
        self.subscribers[peer] = set(apps)
        self.counters["subscribes"] += 1
        for app in apps:
            if app in self._ready:
                self._send_allotment(peer, app)

    def _send_allotment(self, peer: str, app: str) -> None:
        self._out.append((peer, self.allotment(app)))
        self.counters["allotments_sent"] += 1

    def _refresh(self, now: float) -> None:
        """Mark applications ready, and push allotments whose health changed."""
        for app, pool in self.pools.items():
            if app not in self._ready:
                if now < self._ready_at and not all(self.hosts[h].synced for h in pool):
                    continue
                self._ready.add(app)
                self._health[app] = self._up(app)
                self.counters["apps_ready"] += 1
                peers = {p for p, apps in self.subscribers.items() if app in apps}
                peers |= self._deferred.pop(app, set())
                for peer in sorted(peers):
                    self._send_allotment(peer, app)
                continue
            up = self._up(app)
            if up != self._health[app]:
                self._health[app] = up
                self._events.append(AppHealthChanged(app, up, now))
                self.counters["health_changes"] += 1
                for peer in sorted(p for p, apps in self.subscribers.items() if app in apps):
                    self._send_allotment(peer, app)

    def _up(self, app: str) -> tuple[str, ...]:
        return tuple(h for h in self.pools[app] if self.is_up(app, h))

    # -- views -----------------------------------------------------------------------

    def hosts_view(self, now: float) -> dict[str, object]:
        """Per host: liveness, last heartbeat, and each endpoint's health, load and tokens."""
        tokens = {app: self.tokens(app) for app in self.pools}
        out: dict[str, object] = {}
        for name, h in sorted(self.hosts.items()):
            endpoints: dict[str, object] = {}
            for app, pool in self.pools.items():
                if name not in pool:
                    continue
                row = h.table.row(app)
                endpoints[app] = {
                    "up": self.is_up(app, name),
                    "reported_up": row.up if row else None,
                    "active_connections": row.active_connections if row else None,
                    "cpu": row.cpu if row else None,
                    "app_load": row.app_load if row else None,
                    "weight": pool[name],
                    "tokens": tokens[app][name],
                }
            out[name] = {
                "alive": h.alive,
                "synced": h.synced,
                "version": h.table.version,
                "checksum": h.table.checksum().hex(),
                "in_sync": h.synced and h.table.checksum() == h.heartbeat_checksum,
                "last_heartbeat": h.last_heartbeat,
                "heartbeat_age": None if h.last_heartbeat is None else now - h.last_heartbeat,
                "endpoints": endpoints,
            }
        return out


# -- the asyncio shell ---------------------------------------------------------------


class HandlerService:
    """The HL handler process ``name`` (one of ``config.handlers``)."""

    def __init__(self, config: ClusterConfig, name: str) -> None:
        self.config = config
        self.node = next(h for h in config.handlers if h.name == name)
        self.name = name
        self.net_counters: Counter[str] = Counter()
        self.links: dict[str, Link] = {}
        self.incarnation = int.from_bytes(os.urandom(4), "big")
        self.core: HandlerCore
        self._server: asyncio.Server | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.core = HandlerCore.from_config(
            self.config, self.name, loop.time(), first_allotment_id=int(time.time() * 1000)
        )
        admin = AdminServer(self.config.cluster.run_dir, self.name, self.node.admin)
        admin.routes["/status"] = self.status
        admin.routes["/hosts"] = lambda: self.core.hosts_view(loop.time())
        admin.actions["/pool"] = self.change_pool
        admin.registry.register(
            CountersCollector(
                "hanlb_handler",
                self.name,
                lambda: {**self.core.counters, **self.net_counters},
                lambda: {
                    "hosts_alive": float(sum(h.alive for h in self.core.hosts.values())),
                    "subscribers": float(len(self.core.subscribers)),
                },
            )
        )
        await admin.start()
        host, port = self.node.endpoint
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        self._arm()
        log.info("handler %s listening on %s:%d", self.name, host, port)
        try:
            await self._server.serve_forever()
        finally:
            if self._timer:
                self._timer.cancel()
            self._server.close()
            for link in list(self.links.values()):
                link.close()
            admin.close()

    def status(self) -> dict[str, object]:
        hosts = self.core.hosts
        return {
            "role": "handler",
            "name": self.name,
            "hosts_alive": sorted(n for n, h in hosts.items() if h.alive),
            "hosts_synced": sorted(n for n, h in hosts.items() if h.synced),
            "apps_ready": sorted(a for a in self.core.pools if self.core.ready(a)),
            "subscribers": {p: sorted(a) for p, a in self.core.subscribers.items()},
            "counters": {**self.core.counters, **self.net_counters},
        }

    def change_pool(self, params: dict[str, str]) -> dict[str, int]:
        """``hanlb ctl pool add|remove``: new allotments follow the new pool."""
        pools = {app: dict(pool) for app, pool in self.core.pools.items()}
        app, pool = pool_change(pools, params, {h.name for h in self.config.hosts})
        self.core.set_pool(app, pool, asyncio.get_running_loop().time())
        self._flush()
        self._arm()
        return pool

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer:
            self._timer.cancel()
        when = self.core.get_timer()
        if when != float("inf"):
            self._timer = loop.call_at(max(when, loop.time()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(asyncio.get_running_loop().time())
        self._flush()

    def _flush(self) -> None:
        for peer, msg in self.core.messages():
            link = self.links.get(peer)
            if link is None:
                self.net_counters["messages_lost_link_down"] += 1
                continue
            try:
                link.send(msg)
            except LinkClosed:
                self.net_counters["messages_lost_link_down"] += 1
        self._arm()

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
                        peer = f"{msg.role}:{msg.node}"
                        old = self.links.get(peer)
                        if old is not None:
                            old.close()
                        self.links[peer] = link
                        self.net_counters[f"connects_{msg.role}"] += 1
                        log.info("handler %s: %s connected from %s", self.name, peer, link.peer)
                    elif isinstance(msg, Ping):
                        link.send(Pong(msg.seq, msg.sent))
                    elif not isinstance(msg, Pong):
                        self.core.on_message(peer, msg, loop.time())
                self._flush()
        except (LinkClosed, OSError):
            pass
        finally:
            link.close()
            if peer is not None and self.links.get(peer) is link:
                del self.links[peer]
                self.core.peer_lost(peer)
                self._flush()
