"""The forwarder's datapaths behind one interface (claims 17-19).

A datapath moves frames; the forwarder core (core.py) decides. Three kinds:

- ``kernel`` (kernel.py): nftables netdev ingress on the LAN interface. Route
  hits are rewritten and forwarded by the kernel; the core only sees *misses*
  (frames still addressed to the forwarder's own MAC) and *close copies* (a
  FIN or RST of a routed flow, duplicated after the rewrite, so addressed to
  the host's MAC). ``fast_path`` is True.
- ``userspace`` (userspace.py): an AF_PACKET socket; every VIP frame reaches
  the core, which looks it up in its own table and transmits. ``fast_path``
  is False.
- ``memory`` (this module): no sockets, for unit and simulation tests.

Every method is called from the event loop thread; none blocks for long.
``install``/``remove`` take whole batches: the kernel datapath turns one batch
into one libnftables call.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

from ..flow import FlowKey

__all__ = ["Datapath", "MemoryDatapath"]

Deliver = Callable[[bytes], None]


class Datapath(abc.ABC):
    fast_path: bool = False
    """True when route hits are forwarded without the core seeing them."""

    @abc.abstractmethod
    def open(self, deliver: Deliver, vips: Sequence[tuple[str, int]], own_mac: bytes) -> None:
        """Start: create what is needed and call ``deliver(frame)`` for each frame
        the core must see (see module docstring). ``vips`` are (address, port)."""

    @abc.abstractmethod
    def install(self, routes: Sequence[tuple[FlowKey, bytes]]) -> None:
        """Add or replace routes: flow -> host MAC (6 bytes)."""

    @abc.abstractmethod
    def remove(self, flows: Sequence[FlowKey]) -> None:
        """Delete routes; flows not present are ignored."""

    @abc.abstractmethod
    def install_drops(self, drops: Sequence[tuple[FlowKey, float]]) -> None:
        """Drop these flows' packets in the datapath for ttl seconds."""

    @abc.abstractmethod
    def lift_drops(self, flows: Sequence[FlowKey]) -> None:
        """End these flows' drop routes before their ttl (a route replaced them);
        flows whose drop already ended are ignored."""

    @abc.abstractmethod
    def transmit(self, frame: bytes) -> None:
        """Send an already rewritten frame out of the LAN interface."""

    @abc.abstractmethod
    def packet_counts(self) -> dict[FlowKey, int] | None:
        """Per-route packet counters kept by the datapath, or None if the core
        counts (non fast-path datapaths)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Remove everything the datapath made (rules, devices, sockets)."""

    def trust(self, sources: Sequence[str]) -> None:
        """Client addresses that completed a connection: exempt them from the
        miss-path flood limits (kernel datapath). Others ignore it."""
        return

    def stats(self) -> dict[str, int]:
        """Datapath counters for status pages (kernel: packets forwarded in-kernel)."""
        return {}


class MemoryDatapath(Datapath):
    """In-memory datapath: records what the core asked for."""

    def __init__(self) -> None:
        self.routes: dict[FlowKey, bytes] = {}
        self.drops: dict[FlowKey, float] = {}
        self.sent: list[bytes] = []
        self.deliver: Deliver | None = None
        self.install_batches: list[int] = []
        self.closed = False

    def open(self, deliver: Deliver, vips: Sequence[tuple[str, int]], own_mac: bytes) -> None:
        self.deliver = deliver

    def install(self, routes: Sequence[tuple[FlowKey, bytes]]) -> None:
        self.install_batches.append(len(routes))
        self.routes.update(routes)

    def remove(self, flows: Sequence[FlowKey]) -> None:
        for f in flows:
            self.routes.pop(f, None)

    def install_drops(self, drops: Sequence[tuple[FlowKey, float]]) -> None:
        self.drops.update(drops)

    def lift_drops(self, flows: Sequence[FlowKey]) -> None:
        for f in flows:
            self.drops.pop(f, None)

    def transmit(self, frame: bytes) -> None:
        self.sent.append(frame)

    def packet_counts(self) -> dict[FlowKey, int] | None:
        return None

    def close(self) -> None:
        self.closed = True
