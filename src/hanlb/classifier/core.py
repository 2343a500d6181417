"""The classifier's logic, without I/O (claims 1, 10-11, 21-27, 43-49, 61-66).

For each ``Miss`` in a ``ClassifyBatch`` from a forwarder:

1. the flow's application is found by VIP and port; none -> a drop route;
2. a flow this classifier already placed goes to the *same* host again (a
   forwarder that lost the route, or a flow that moved between forwarders),
   unless the packet is a SYN with a new sequence number: a new connection
   reusing the addresses and ports, which is placed anew;
3. a new connection (SYN without ACK) must pass the application's firewall
   policy (firewall.py; refused: a drop route, claims 33-34), then gets a host
   from the ``HostSelector`` (static weights, or health/load tokens) and is
   recorded in the session tracker;
4. anything else is a mid-flow packet of a flow this classifier does not know
   (it moved here from a dead forwarder or a dead classifier): with a session
   tracker it is *looked up* there and re-plumbed to the host the tracker
   names (claims 43-49, 61-66); a flow the tracker does not know either gets the
   application's ``mid_flow_miss`` answer (``drop``: a short drop route).

When is a new flow written to the tracker? The route is plumbed first and the
entry is written right after, without waiting (``tracker_writes``, sent by the
shell with no acknowledgement). A new connection never waits for the tracker.
Window of loss: if the classifier dies, or the tracker node that received the
write dies, within about one network round trip after the SYN was plumbed, the
entry is lost; the flow still works while its forwarder lives, and only if that
forwarder *also* dies would a later lookup miss (one dropped connection). Every
re-plumb of a looked-up flow rewrites the entry with its new forwarder.

The answer to one batch is one ``AddRoutes`` and at most one ``DropRoutes``;
lookups answer later, through ``resolve``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..config import ClusterConfig, pool_change
from ..flow import ACK, SYN, FlowKey
from ..protocol.messages import (
    AddRoutes,
    ClassifyBatch,
    DropRoute,
    DropRoutes,
    Miss,
    Route,
    RoutesRemoved,
)
from ..tracker.entry import Entry, flow_key
from .firewall import Firewall, Verdict
from .selection import HostSelector, StaticSelector

__all__ = ["MID_FLOW_DROP_TTL", "NO_APP_DROP_TTL", "ClassifierCore", "Lookup"]

MID_FLOW_DROP_TTL = 2.0
NO_APP_DROP_TTL = 10.0


@dataclass(slots=True)
class _Flow:
    host: str
    app: str
    forwarders: set[str] = field(default_factory=set)
    orphaned: float | None = None
    """When the last forwarder carrying it went away (None while one does)."""
    syn_seq: int | None = None
    """Sequence number of the SYN that opened it, if this classifier placed it."""


def _syn_seq(miss: Miss) -> int | None:
    """The TCP sequence number in a miss's packet head, if it is there."""
    head = miss.head
    if not head:
        return None
    ihl = (head[0] & 0x0F) * 4
    if len(head) < ihl + 8:
        return None
    return int.from_bytes(head[ihl + 4 : ihl + 8], "big")


@dataclass(frozen=True, slots=True)
class Lookup:
    """Misses of one forwarder that wait for the session tracker's answer."""

    peer: str
    misses: list[Miss]


class ClassifierCore:
    def __init__(
        self,
        config: ClusterConfig,
        selector: HostSelector | None = None,
        *,
        use_tracker: bool = False,
    ) -> None:
        self.config = config
        self.use_tracker = use_tracker
        self._apps = {(a.vip, a.port): a for a in config.applications}
        self._macs = {h.name: h.mac for h in config.hosts}
        self.pools = {a.name: {m.host: m.weight for m in a.pool} for a in config.applications}
        """The pools in force: the configuration's, changed at run time by ``change_pool``."""
        self.selector: HostSelector = selector or StaticSelector(
            {app: dict(pool) for app, pool in self.pools.items()}
        )
        self.flows: dict[FlowKey, _Flow] = {}
        self.firewalls = {a.name: Firewall(a.name, a.firewall) for a in config.applications}
        self.counters: Counter[str] = Counter()
        self.placed: Counter[str] = Counter()
        """New flows placed per host."""
        self._writes: list[Entry] = []
        self._deletes: list[str] = []
        self._lookups: list[Lookup] = []

    # -- inputs ----------------------------------------------------------------

    def on_message(self, peer: str, msg: object, now: float) -> list[object]:
        """A message from forwarder ``peer``; returns the replies to it."""
        if isinstance(msg, ClassifyBatch):
            return self.classify(peer, msg, now)
        if isinstance(msg, RoutesRemoved):
            self.routes_removed(peer, msg.flows, now)
            return []
        self.counters["messages_unexpected"] += 1
        return []

    def classify(self, peer: str, batch: ClassifyBatch, now: float) -> list[object]:
        routes: list[Route] = []
        drops: list[DropRoute] = []
        unknown: list[Miss] = []
        self.counters["classify_batches"] += 1
        for miss in batch.misses:
            flow = miss.flow
            self.counters["classify_requests"] += 1
            app = self._apps.get((flow.dst, flow.dport))
            if app is None:
                self.counters["no_application"] += 1
                drops.append(DropRoute(flow, NO_APP_DROP_TTL))
                continue
            opening = miss.tcp_flags & SYN and not miss.tcp_flags & ACK
            known = self.flows.get(flow)
            if known is not None and opening and _syn_seq(miss) != known.syn_seq:
                # A new connection reusing a known flow's addresses and ports (a
                # retransmitted SYN would carry the same sequence number): the old
                # one is over, and its host may be gone. Place it anew.
                self.counters["flows_reused"] += 1
                self._forget(flow)
                known = None
            if known is not None:
                self.counters["replumbed_known"] += 1
                if peer not in known.forwarders:
                    known.forwarders.add(peer)
                    known.orphaned = None
                    self._record(flow, known.host, peer)
                routes.append(Route(flow, known.host, self._macs[known.host]))
                continue
            if opening:
                firewall = self.firewalls[app.name]
                if not firewall.trivial:
                    verdict = firewall.admit(flow.src, flow.dport, now)
                    if verdict is not Verdict.ALLOWED:
                        self.counters[f"firewall_{verdict.value}"] += 1
                        drops.append(DropRoute(flow, app.firewall.drop_ttl))
                        continue
                host = self.selector.choose(app.name, now)
                if host is None:
                    self.counters["no_host"] += 1
                    if not firewall.trivial:
                        firewall.closed(flow.src)
                    continue
                self.flows[flow] = _Flow(host, app.name, {peer}, syn_seq=_syn_seq(miss))
                self.placed[host] += 1
                self.counters["new_flows"] += 1
                self._record(flow, host, peer)
                routes.append(Route(flow, host, self._macs[host]))
                continue
            if self.use_tracker:
                self.counters["tracker_lookups"] += 1
                unknown.append(miss)
                continue
            self.counters["mid_flow_unknown"] += 1
            drops.append(DropRoute(flow, MID_FLOW_DROP_TTL))
        if unknown:
            self._lookups.append(Lookup(peer, unknown))
        return self._answer(routes, drops)

    def resolve(self, lookup: Lookup, found: dict[str, Entry], now: float) -> list[object]:
        """The tracker answered ``lookup``: re-plumb the same host, or drop."""
        routes: list[Route] = []
        drops: list[DropRoute] = []
        for miss in lookup.misses:
            flow = miss.flow
            known = self.flows.get(flow)  # placed meanwhile (a SYN retransmit, another lookup)
            entry = found.get(flow_key(flow))
            host = known.host if known else (entry.host if entry is not None else None)
            if host is None or host not in self._macs:
                self.counters["mid_flow_unknown"] += 1
                drops.append(DropRoute(flow, MID_FLOW_DROP_TTL))
                continue
            self.counters["replumbed_from_tracker"] += 1
            if known is None:
                app = self._apps[(flow.dst, flow.dport)]
                self.flows[flow] = _Flow(host, app.name, {lookup.peer})
                if not self.firewalls[app.name].trivial:
                    self.firewalls[app.name].open[flow.src] += 1
            else:
                known.forwarders.add(lookup.peer)
                known.orphaned = None
            self._record(flow, host, lookup.peer)
            routes.append(Route(flow, host, self._macs[host]))
        return self._answer(routes, drops)

    def lookup_failed(self, lookup: Lookup) -> None:
        """No tracker answered: the forwarder keeps holding and will ask again."""
        self.counters["tracker_lookup_failures"] += len(lookup.misses)

    def routes_removed(self, peer: str, flows: list[FlowKey], now: float) -> None:
        for flow in flows:
            entry = self.flows.get(flow)
            if entry is None:
                continue
            entry.forwarders.discard(peer)
            if not entry.forwarders:
                self._forget(flow)
                self.counters["flows_forgotten"] += 1
                if self.use_tracker:
                    self._deletes.append(flow_key(flow))

    def peer_lost(self, peer: str, now: float) -> None:
        """A forwarder went away. Its flows stay known (here and in the tracker) so
        the forwarder that receives them next re-plumbs the same host."""
        self.counters["forwarders_lost"] += 1
        for entry in self.flows.values():
            entry.forwarders.discard(peer)
            if not entry.forwarders and entry.orphaned is None:
                entry.orphaned = now

    def handle_timer(self, now: float) -> None:
        """Forget flows that no forwarder has carried for a whole idle timeout."""
        limit = now - self.config.timers.route_idle_timeout
        stale = [f for f, e in self.flows.items() if e.orphaned is not None and e.orphaned < limit]
        for flow in stale:
            self._forget(flow)
        self.counters["flows_orphan_expired"] += len(stale)

    def change_pool(self, params: dict[str, str]) -> dict[str, int]:
        """``hanlb ctl pool add|remove``: new flows follow the new pool; established
        flows keep their host (a removed host keeps serving them until they end)."""
        app, pool = pool_change(self.pools, params, set(self._macs))
        self.selector.set_pool(app, dict(pool))
        self.counters["pool_changes"] += 1
        return pool

    # -- outputs ---------------------------------------------------------------

    def tracker_writes(self) -> tuple[list[Entry], list[str]]:
        """Entries to insert and keys to delete in the session tracker."""
        writes, deletes = self._writes, self._deletes
        self._writes, self._deletes = [], []
        return writes, deletes

    def lookups(self) -> list[Lookup]:
        out, self._lookups = self._lookups, []
        return out

    # -- internals -------------------------------------------------------------

    def _forget(self, flow: FlowKey) -> None:
        entry = self.flows.pop(flow)
        firewall = self.firewalls[entry.app]
        if not firewall.trivial:
            firewall.closed(flow.src)

    def firewall_counts(self) -> dict[str, dict[str, int]]:
        return {app: fw.counts() for app, fw in self.firewalls.items() if not fw.trivial}

    def _record(self, flow: FlowKey, host: str, forwarder: str) -> None:
        if self.use_tracker:
            self._writes.append(Entry(flow_key(flow), host, forwarder))

    def _answer(self, routes: list[Route], drops: list[DropRoute]) -> list[object]:
        out: list[object] = []
        if routes:
            out.append(AddRoutes(routes))
        if drops:
            out.append(DropRoutes(drops))
        return out
