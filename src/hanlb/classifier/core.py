"""The classifier's logic, without I/O (claims 1, 10-11, 21-27, 43-48).

For each ``Miss`` in a ``ClassifyBatch`` from a forwarder:

1. the flow's application is found by VIP and port; none -> a drop route;
2. a flow this classifier already placed is sent to the *same* host again
   (a forwarder that lost the route, or a flow that moved between forwarders);
3. a new connection (SYN without ACK) gets a host from the ``HostSelector``;
4. anything else is a mid-flow packet of an unknown flow: the application's
   ``mid_flow_miss`` policy answers (``drop``: a short drop route).

The answer to one batch is one ``AddRoutes`` and at most one ``DropRoutes``,
sent back to the forwarder that asked. The flow memory here is the
classifier's own; the session tracker takes its place in a later issue.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..config import ClusterConfig
from ..flow import ACK, SYN, FlowKey
from ..protocol.messages import (
    AddRoutes,
    ClassifyBatch,
    DropRoute,
    DropRoutes,
    Route,
    RoutesRemoved,
)
from .selection import HostSelector, StaticSelector

__all__ = ["MID_FLOW_DROP_TTL", "NO_APP_DROP_TTL", "ClassifierCore"]

MID_FLOW_DROP_TTL = 2.0
NO_APP_DROP_TTL = 10.0


@dataclass(slots=True)
class _Flow:
    host: str
    forwarders: set[str] = field(default_factory=set)


class ClassifierCore:
    def __init__(self, config: ClusterConfig, selector: HostSelector | None = None) -> None:
        self.config = config
        self._apps = {(a.vip, a.port): a for a in config.applications}
        self._macs = {h.name: h.mac for h in config.hosts}
        self.selector: HostSelector = selector or StaticSelector(
            {a.name: {m.host: m.weight for m in a.pool} for a in config.applications}
        )
        self.flows: dict[FlowKey, _Flow] = {}
        self.counters: Counter[str] = Counter()
        self.placed: Counter[str] = Counter()
        """New flows placed per host."""

    def on_message(self, peer: str, msg: object, now: float) -> list[object]:
        """A message from forwarder ``peer``; returns the replies to it."""
        if isinstance(msg, ClassifyBatch):
            return self.classify(peer, msg, now)
        if isinstance(msg, RoutesRemoved):
            self.routes_removed(peer, msg.flows)
            return []
        self.counters["messages_unexpected"] += 1
        return []

    def classify(self, peer: str, batch: ClassifyBatch, now: float) -> list[object]:
        routes: list[Route] = []
        drops: list[DropRoute] = []
        self.counters["classify_batches"] += 1
        for miss in batch.misses:
            flow = miss.flow
            self.counters["classify_requests"] += 1
            app = self._apps.get((flow.dst, flow.dport))
            if app is None:
                self.counters["no_application"] += 1
                drops.append(DropRoute(flow, NO_APP_DROP_TTL))
                continue
            known = self.flows.get(flow)
            if known is not None:
                self.counters["replumbed_known"] += 1
                known.forwarders.add(peer)
                routes.append(Route(flow, known.host, self._macs[known.host]))
                continue
            if miss.tcp_flags & SYN and not miss.tcp_flags & ACK:
                host = self.selector.choose(app.name, now)
                if host is None:
                    self.counters["no_host"] += 1
                    continue
                self.flows[flow] = _Flow(host, {peer})
                self.placed[host] += 1
                self.counters["new_flows"] += 1
                routes.append(Route(flow, host, self._macs[host]))
                continue
            self.counters["mid_flow_unknown"] += 1
            drops.append(DropRoute(flow, MID_FLOW_DROP_TTL))
        out: list[object] = []
        if routes:
            out.append(AddRoutes(routes))
        if drops:
            out.append(DropRoutes(drops))
        return out

    def routes_removed(self, peer: str, flows: list[FlowKey]) -> None:
        for flow in flows:
            entry = self.flows.get(flow)
            if entry is None:
                continue
            entry.forwarders.discard(peer)
            if not entry.forwarders:
                del self.flows[flow]
                self.counters["flows_forgotten"] += 1

    def peer_lost(self, peer: str) -> None:
        """A forwarder went away; its flows stay known so another forwarder that
        receives them re-plumbs the same host."""
        self.counters["forwarders_lost"] += 1
