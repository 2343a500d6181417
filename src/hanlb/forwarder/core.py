"""The forwarder's logic, without I/O (claims 17-29).

The core owns the *local route table* (flow -> host) and the life of each route:

========  ===========================  ==============================
state     event                        next
========  ===========================  ==============================
(none)    AddRoutes from classifier    PLUMBED
PLUMBED   client FIN or RST seen       CLOSING (deadline = now+linger)
PLUMBED   no packet for idle timeout   removed ("idle")
CLOSING   linger deadline passed       removed ("closed")
any       a SYN with a new sequence    removed ("reused"), SYN classified
any       DeleteRoutes                 removed ("deleted")
========  ===========================  ==============================

A SYN (without ACK) for a routed flow is either the same connection's
retransmitted SYN (same sequence number as the SYN that opened it: same host)
or a *new* connection reusing the addresses and ports of one that ended
(clients reuse ports at once after a refused or reset connection, and a route
outlives a connection that closed without the client's FIN). The new one is
classified afresh: its old host may have left the pool or died.

Packets of unknown flows (misses) are held here, at most ``MAX_HELD`` per flow,
while a ``Miss`` goes to the classifier; when its route comes, the route is
installed in the datapath first and the held frames are sent after it. A miss
whose route does not come within ``classify_timeout`` is dropped (TCP
retransmits). Every decision is counted in ``counters``.

Inputs: ``on_frame``, ``on_message``, ``on_packet_counts``, ``handle_timer``,
``classifier_changed``. Outputs: ``actions()`` (datapath work, in order) and
``messages()`` (to the classifier). ``get_timer()`` says when to call
``handle_timer`` next.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..flow import ACK, FIN, RST, SYN, BadPacket, FlowKey, mac_bytes, parse_frame, rewrite_macs
from ..protocol.messages import (
    AddRoutes,
    ClassifyBatch,
    DeleteRoutes,
    DropRoute,
    DropRoutes,
    DumpRoutes,
    Miss,
    Route,
    RouteDump,
    RoutesRemoved,
)

__all__ = [
    "MAX_HELD",
    "ForwarderCore",
    "Install",
    "InstallDrops",
    "LiftDrops",
    "Remove",
    "RouteState",
    "Transmit",
]

MAX_HELD = 8
HEAD_BYTES = 128


class RouteState(enum.Enum):
    PLUMBED = "plumbed"
    CLOSING = "closing"


@dataclass(slots=True)
class _Route:
    host: str
    mac: str
    mac_raw: bytes
    state: RouteState
    last_active: float
    packets: int = 0
    deadline: float = 0.0
    syn_seq: int | None = None
    """Sequence number of the SYN that opened the flow, when this forwarder saw it."""


@dataclass(slots=True)
class _Pending:
    deadline: float
    frames: list[bytes] = field(default_factory=list)
    syn_seq: int | None = None


# -- actions for the datapath ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Install:
    routes: list[tuple[FlowKey, bytes]]


@dataclass(frozen=True, slots=True)
class Remove:
    flows: list[FlowKey]


@dataclass(frozen=True, slots=True)
class InstallDrops:
    drops: list[tuple[FlowKey, float]]


@dataclass(frozen=True, slots=True)
class LiftDrops:
    """Flows that had a drop route and now have a route: the route wins."""

    flows: list[FlowKey]


@dataclass(frozen=True, slots=True)
class Transmit:
    frame: bytes


@dataclass(frozen=True, slots=True)
class Trust:
    """Client addresses that closed a routed connection with a FIN."""

    sources: list[str]


Action = Install | Remove | InstallDrops | LiftDrops | Transmit | Trust

TRUST_REFRESH = 60.0
"""An address is re-trusted in the datapath at most this often."""


class ForwarderCore:
    def __init__(
        self,
        name: str,
        own_mac: bytes,
        vips: Iterable[tuple[str, int]],
        *,
        fast_path: bool,
        linger: float,
        idle_timeout: float,
        sweep_interval: float,
        classify_timeout: float,
        now: float,
    ) -> None:
        self.name = name
        self.own_mac = own_mac
        self.vips = frozenset(vips)
        self.fast_path = fast_path
        self.linger = linger
        self.idle_timeout = idle_timeout
        self.sweep_interval = sweep_interval
        self.classify_timeout = classify_timeout
        self.routes: dict[FlowKey, _Route] = {}
        self.drops: dict[FlowKey, float] = {}
        self.pending: dict[FlowKey, _Pending] = {}
        self.counters: Counter[str] = Counter()
        self._misses: list[Miss] = []
        self._removed: dict[str, list[FlowKey]] = {}
        self._actions: list[Action] = []
        self._trusted: dict[str, float] = {}
        self._trust: list[str] = []
        self._out: list[object] = []
        self._next_sweep = now + sweep_interval

    # -- inputs ----------------------------------------------------------------

    def on_frame(self, frame: bytes, now: float) -> None:
        """A frame from the datapath: a miss, a close copy (kernel), or any VIP
        frame (userspace)."""
        try:
            pkt = parse_frame(frame)
        except BadPacket:
            self.counters["frames_malformed"] += 1
            return
        flow = pkt.flow
        if (flow.dst, flow.dport) not in self.vips:
            self.counters["frames_not_vip"] += 1
            return
        route = self.routes.get(flow)
        closing = bool(pkt.flags & (FIN | RST))
        opening = pkt.flags & (SYN | ACK) == SYN
        if route is not None and opening and pkt.seq != route.syn_seq:
            # a new connection on a used 4-tuple: forget the old route, classify
            self.counters["routes_reused"] += 1
            self._remove([flow], "reused")
            route = None
        if self.fast_path and frame[:6] != self.own_mac:
            # The kernel forwarded this FIN/RST already; this is its copy.
            self.counters["close_copies"] += 1
            if route is not None and closing:
                self._start_closing(route, now)
                if pkt.flags & FIN and self._trusted.get(flow.src, 0.0) <= now:
                    self._trusted[flow.src] = now + TRUST_REFRESH
                    self._trust.append(flow.src)
            return
        if route is not None:
            # userspace hit, or a kernel miss that raced the install
            self.counters["forwarded_userspace" if not self.fast_path else "forwarded_late"] += 1
            route.packets += 1
            route.last_active = now
            if closing:
                self._start_closing(route, now)
            self._actions.append(Transmit(rewrite_macs(frame, self.own_mac, route.mac_raw)))
            return
        drop_until = self.drops.get(flow)
        if drop_until is not None:
            if drop_until > now:
                self.counters["dropped_by_route"] += 1
                return
            del self.drops[flow]
        self.counters["misses"] += 1
        pending = self.pending.get(flow)
        if pending is not None:
            if len(pending.frames) < MAX_HELD and frame not in pending.frames:
                pending.frames.append(frame)
            else:
                self.counters["held_overflow"] += 1
            return
        self.pending[flow] = _Pending(
            now + self.classify_timeout, [frame], pkt.seq if opening else None
        )
        self.counters["classify_requests"] += 1
        self._misses.append(Miss(flow, pkt.flags, frame[14 : 14 + HEAD_BYTES]))

    def on_message(self, msg: object, now: float) -> None:
        """A message from the classifier."""
        if isinstance(msg, AddRoutes):
            self.plumb(msg.routes, now)
        elif isinstance(msg, DeleteRoutes):
            self._remove([f for f in msg.flows if f in self.routes], "deleted")
        elif isinstance(msg, DropRoutes):
            self._install_drops([(d.flow, d.ttl) for d in msg.drops], now)
        elif isinstance(msg, DumpRoutes):
            self._out.append(self.dump(msg.req_id, now))
        else:
            self.counters["messages_unexpected"] += 1

    def plumb(self, routes: Sequence[Route], now: float) -> None:
        batch: list[tuple[FlowKey, bytes]] = []
        lifted: list[FlowKey] = []
        sends: list[Action] = []
        for r in routes:
            raw = mac_bytes(r.mac)
            old = self.routes.get(r.flow)
            if old is not None and old.mac_raw == raw:
                self.counters["routes_unchanged"] += 1
            else:
                batch.append((r.flow, raw))
            route = _Route(r.host, r.mac, raw, RouteState.PLUMBED, now)
            self.routes[r.flow] = route
            drop_until = self.drops.pop(r.flow, None)
            if drop_until is not None and drop_until > now:
                lifted.append(r.flow)
            pending = self.pending.pop(r.flow, None)
            if pending is not None:
                route.syn_seq = pending.syn_seq
            if pending is not None:
                for frame in pending.frames:
                    sends.append(Transmit(rewrite_macs(frame, self.own_mac, raw)))
                    flags = frame[14 + (frame[14] & 0x0F) * 4 + 13]
                    if flags & (FIN | RST):
                        self._start_closing(self.routes[r.flow], now)
        if lifted:
            self.counters["drop_routes_lifted"] += len(lifted)
            self._actions.append(LiftDrops(lifted))
        if batch:
            self.counters["routes_installed"] += len(batch)
            self.counters["install_batches"] += 1
            self._actions.append(Install(batch))
        self.counters["held_sent"] += len(sends)
        self._actions.extend(sends)

    def on_packet_counts(self, counts: dict[FlowKey, int], now: float) -> None:
        """Per-route packet counters read from a fast-path datapath."""
        total = 0
        for flow, packets in counts.items():
            total += packets
            route = self.routes.get(flow)
            if route is not None and packets != route.packets:
                route.packets = packets
                route.last_active = now
        self.counters["kernel_route_packets_seen"] = total

    def classifier_changed(self, now: float) -> None:
        """A new classifier took over: ask again for every flow still held."""
        for flow, pending in self.pending.items():
            pending.deadline = now + self.classify_timeout
            frame = pending.frames[0]
            flags = frame[14 + (frame[14] & 0x0F) * 4 + 13]
            self._misses.append(Miss(flow, flags, frame[14 : 14 + HEAD_BYTES]))
            self.counters["classify_retries"] += 1

    def handle_timer(self, now: float) -> None:
        expired = [f for f, p in self.pending.items() if p.deadline <= now]
        for f in expired:
            self.counters["held_timed_out"] += len(self.pending.pop(f).frames)
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep_interval
        closed = [
            f for f, r in self.routes.items() if r.state is RouteState.CLOSING and r.deadline <= now
        ]
        self._remove(closed, "closed")
        idle = [f for f, r in self.routes.items() if r.last_active + self.idle_timeout <= now]
        self._remove(idle, "idle")
        for f in [f for f, t in self.drops.items() if t <= now]:
            del self.drops[f]
        for a in [a for a, t in self._trusted.items() if t <= now]:
            del self._trusted[a]

    def get_timer(self) -> float:
        soonest = self._next_sweep
        for p in self.pending.values():
            soonest = min(soonest, p.deadline)
        return soonest

    # -- outputs ---------------------------------------------------------------

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        if self._trust:
            out.append(Trust(self._trust))
            self._trust = []
        return out

    def messages(self) -> list[object]:
        out, self._out = self._out, []
        # Removals first: a reused flow's old entry must be gone at the classifier
        # before the new connection's miss is classified.
        for reason, flows in self._removed.items():
            out.append(RoutesRemoved(flows, reason))
        self._removed = {}
        if self._misses:
            out.append(ClassifyBatch(self._misses))
            self._misses = []
        return out

    def dump(self, req_id: int, now: float) -> RouteDump:
        return RouteDump(
            req_id,
            [Route(f, r.host, r.mac) for f, r in self.routes.items()],
            [DropRoute(f, t - now) for f, t in self.drops.items() if t > now],
        )

    def route_rows(self) -> list[dict[str, object]]:
        return [
            {
                "proto": "tcp",
                "client": f"{f.src}:{f.sport}",
                "vip": f"{f.dst}:{f.dport}",
                "host": r.host,
                "mac": r.mac,
                "state": r.state.value,
                "packets": r.packets,
            }
            for f, r in self.routes.items()
        ]

    # -- internals -------------------------------------------------------------

    def _start_closing(self, route: _Route, now: float) -> None:
        if route.state is RouteState.PLUMBED:
            route.state = RouteState.CLOSING
            route.deadline = now + self.linger

    def _remove(self, flows: list[FlowKey], reason: str) -> None:
        if not flows:
            return
        for f in flows:
            del self.routes[f]
        self.counters[f"routes_removed_{reason}"] += len(flows)
        self._removed.setdefault(reason, []).extend(flows)
        self._actions.append(Remove(flows))

    def _install_drops(self, drops: list[tuple[FlowKey, float]], now: float) -> None:
        for flow, ttl in drops:
            self.drops[flow] = now + ttl
            self.pending.pop(flow, None)
            if flow in self.routes:
                self._remove([flow], "dropped")
        self.counters["drop_routes_installed"] += len(drops)
        self._actions.append(InstallDrops(drops))
