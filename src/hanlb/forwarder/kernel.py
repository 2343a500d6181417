"""Kernel datapath: nftables netdev ingress on the LAN interface (claims 18-19).

One ``netdev`` table hooks the LAN interface's ingress; VIP traffic jumps
(``goto``) to chain ``vip`` after one lookup, everything else passes at once:

- ``routes`` hit, neither SYN, FIN nor RST (nearly every packet): forwarded at
  once (below), after one lookup;
- ``drops`` (set with timeouts): packets of dropped flows are discarded. A
  flow is never in both (a drop route deletes the flow's route, a route lifts
  the flow's drop: ``lift_drops``), so checking drops after the common case
  costs the common case nothing;
- every connection-opening SYN (SYN without ACK) to a VIP goes to the miss
  TAP, routed or not: the core tells a retransmitted SYN (same sequence
  number: same host) from a new connection that reuses a closed flow's
  addresses and ports (it must be classified anew; the old route may point at
  a host that is gone). New connections miss anyway, so this costs nothing;
- ``routes`` (map flow key -> host MAC, per-element counters): a hit gets
  ``ether daddr`` = host MAC, ``ether saddr`` = own MAC and is ``fwd``ed back
  out of the LAN interface. A FIN or RST of a routed flow is also ``dup``ed,
  after the rewrite, to the miss TAP, so the core sees close copies addressed
  to the host MAC;
- a VIP packet that misses the map is ``fwd``ed unchanged (still addressed to
  the forwarder's own MAC) to the miss TAP, which the core reads.

Miss-path protection (claim 34's concern: a flood must not starve the
classifier). Before anything reaches the TAP:

- an address becomes *trusted* when it closes a routed connection with a FIN
  (the core sees the FIN's copy and adds the address to the ``trusted`` set,
  ``trust``): it had completed a handshake through this forwarder, which a
  blind spoofer does not. It stays trusted for ``trusted_ttl``. Trusted
  addresses are not limited here (the classifier's firewall policy limits each
  address's new connections). Granting trust from the hit path instead would
  cost a set update per forwarded packet: measured, about 20% of one flow's
  throughput;
- each untrusted address may send at most ``per_source_pps`` packets a second
  to the miss path (a per-address meter; over it: dropped, ``limited_source``);
- all untrusted addresses together share ``global_pps`` packets a second
  (over it: dropped, ``limited_global``).

So under a flood of spoofed SYNs the classifier sees at most ``global_pps``
of them, and known clients' new connections are not starved by it. A client
new to this forwarder competes with the flood for the global budget: its SYN
may be dropped and retransmitted by TCP.

Frames to the forwarder itself, ARP and non-VIP traffic pass untouched. A map
lookup miss ends a rule, which is what makes the three VIP rules compose.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..flow import TCP, FlowKey
from .datapath import Datapath, Deliver
from .nft import Nft, NftError
from .tap import close_tap, open_tap, set_up

__all__ = ["KernelDatapath", "MissLimits", "ruleset"]

ETH_P_ALL = 0x0003
CHUNK = 2000
READS_PER_WAKEUP = 256
FRAME_MAX = 65536


def mac_str(mac: bytes) -> str:
    if len(mac) != 6:
        raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
    return ":".join(f"{b:02x}" for b in mac)


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass(frozen=True, slots=True)
class MissLimits:
    """Miss-path protection (see the module docstring). 0 disables a limit."""

    global_pps: int = 500
    per_source_pps: int = 50
    trusted_ttl: float = 300.0


def ruleset(
    table: str,
    interface: str,
    miss_device: str,
    vips: Sequence[tuple[str, int]],
    own_mac: bytes,
    limits: MissLimits = MissLimits(),
) -> str:
    """The nft text that (re)creates the table atomically."""
    own = mac_str(own_mac)
    key = "ip saddr . tcp sport . ip daddr . tcp dport"
    vip = "meta protocol ip meta l4proto tcp ip daddr . tcp dport @vips"
    route = f"ether daddr set {key} map @routes ether saddr set {own}"
    opening = "tcp flags & (syn|ack) == syn"
    elements = ", ".join(f"{addr} . {int(port)}" for addr, port in vips)
    vip_elements = f" elements = {{ {elements} }};" if elements else ""
    trusted_s = max(1, int(limits.trusted_ttl))
    limit_rules = ""
    if limits.per_source_pps:
        p = limits.per_source_pps
        limit_rules += (
            "    ip saddr != @trusted update @misslimit "
            f"{{ ip saddr limit rate over {p}/second burst {p} packets }} "
            'counter name "limited_source" drop\n'
        )
    if limits.global_pps:
        g = limits.global_pps
        limit_rules += (
            f"    ip saddr != @trusted limit rate over {g}/second burst "
            f'{max(1, g // 10)} packets counter name "limited_global" drop\n'
        )
    return f"""table netdev {table}
delete table netdev {table}
table netdev {table} {{
  counter hits {{ }}
  counter closes {{ }}
  counter misses {{ }}
  counter syns {{ }}
  counter drops {{ }}
  counter limited_source {{ }}
  counter limited_global {{ }}
  set vips {{ type ipv4_addr . inet_service;{vip_elements} }}
  map routes {{ type ipv4_addr . inet_service . ipv4_addr . inet_service : ether_addr;
    size 1048576; counter; }}
  set drops {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; flags timeout;
    size 1048576; }}
  set trusted {{ type ipv4_addr; flags timeout; timeout {trusted_s}s; size 262144; }}
  set misslimit {{ type ipv4_addr; flags dynamic,timeout; timeout 10s; size 262144; }}
  chain ingress {{
    type filter hook ingress device "{interface}" priority 0; policy accept;
    {vip} goto vip
  }}
  chain vip {{
    tcp flags & (syn|fin|rst) == 0 {route} counter name "hits" fwd to "{interface}"
    {key} @drops counter name "drops" drop
    tcp flags & (fin|rst) != 0 {route} counter name "closes" dup to "{miss_device}" fwd to "{interface}"
{limit_rules}    {opening} counter name "syns" fwd to "{miss_device}"
    counter name "misses" fwd to "{miss_device}"
  }}
}}
"""  # noqa: E501


class KernelDatapath(Datapath):
    """nftables fast path; the core only sees misses and close copies via a TAP."""

    fast_path = True

    def __init__(
        self,
        interface: str,
        miss_device: str = "hlmiss0",
        table: str = "hanlb",
        chunk: int = CHUNK,
        limits: MissLimits = MissLimits(),
    ) -> None:
        self.interface = interface
        self.limits = limits
        self.miss_device = miss_device
        self.table = table
        self.chunk = chunk
        self.installed: dict[FlowKey, bytes] = {}
        self._nft: Nft | None = None
        # Counters are read through a second context, under a lock, so that
        # packet_counts()/stats() may run in a worker thread (asyncio.to_thread):
        # listing a big map takes libnftables ~30 us per element.
        self._reader: Nft | None = None
        self._reader_lock = threading.Lock()
        self._tap: int | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deliver: Deliver | None = None
        self.tap_frames = 0
        self.tap_ignored = 0
        self.transmitted = 0
        self.tx_errors = 0

    # -- lifecycle -----------------------------------------------------------

    def open(self, deliver: Deliver, vips: Sequence[tuple[str, int]], own_mac: bytes) -> None:
        if self._nft is not None:
            raise RuntimeError("datapath already open")
        loop = asyncio.get_running_loop()
        nft = Nft()
        reader: Nft | None = None
        tap = sock = None
        try:
            reader = Nft()
            tap = open_tap(self.miss_device)
            set_up(self.miss_device)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            sock.bind((self.interface, 0))
            sock.setblocking(False)
            # fwd/dup resolve device names when the rules load: TAP first.
            nft.run(
                ruleset(self.table, self.interface, self.miss_device, vips, own_mac, self.limits)
            )
        except BaseException:
            if sock is not None:
                sock.close()
            if tap is not None:
                close_tap(tap)
            nft.close()
            if reader is not None:
                reader.close()
            raise
        self._nft, self._tap, self._sock = nft, tap, sock
        with self._reader_lock:
            self._reader = reader
        self._deliver = deliver
        self._loop = loop
        self.installed.clear()
        loop.add_reader(tap, self._on_readable)

    def close(self) -> None:
        if self._loop is not None and self._tap is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._tap)
        self._loop = None
        if self._nft is not None:
            with contextlib.suppress(NftError):
                self._nft.run(f"delete table netdev {self.table}")
            self._nft.close()
            self._nft = None
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._tap is not None:
            close_tap(self._tap)
            self._tap = None
        self.installed.clear()

    # -- frames --------------------------------------------------------------

    def _on_readable(self) -> None:
        tap, deliver = self._tap, self._deliver
        if tap is None or deliver is None:
            return
        for _ in range(READS_PER_WAKEUP):
            try:
                frame = os.read(tap, FRAME_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not frame:
                return
            # Only IPv4/TCP reaches the TAP from our rules; skip anything the
            # kernel itself sends on the device.
            if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != TCP:
                self.tap_ignored += 1
                continue
            self.tap_frames += 1
            deliver(frame)

    def transmit(self, frame: bytes) -> None:
        sock = self._require_sock()
        try:
            sock.send(frame)
        except OSError:
            self.tx_errors += 1
            return
        self.transmitted += 1

    # -- routes --------------------------------------------------------------

    def install(self, routes: Sequence[tuple[FlowKey, bytes]]) -> None:
        nft = self._require_nft()
        wanted: dict[FlowKey, bytes] = {}
        for flow, mac in routes:
            if len(mac) != 6:
                raise ValueError(f"bad MAC for {flow}: {mac!r}")
            wanted[flow] = bytes(mac)
        todo = [(f, m) for f, m in wanted.items() if self.installed.get(f) != m]
        for i in range(0, len(todo), self.chunk):
            part = todo[i : i + self.chunk]
            replaced = [f.nft() for f, _ in part if f in self.installed]
            added = ", ".join(f"{f.nft()} : {mac_str(m)}" for f, m in part)
            cmd = ""
            if replaced:
                cmd = f"delete element netdev {self.table} routes {{ {', '.join(replaced)} }}\n"
            cmd += f"add element netdev {self.table} routes {{ {added} }}"
            nft.run(cmd)
            self.installed.update(part)

    def remove(self, flows: Sequence[FlowKey]) -> None:
        nft = self._require_nft()
        present = list(dict.fromkeys(f for f in flows if f in self.installed))
        for i in range(0, len(present), self.chunk):
            part = present[i : i + self.chunk]
            keys = ", ".join(f.nft() for f in part)
            try:
                nft.run(f"delete element netdev {self.table} routes {{ {keys} }}")
            except NftError:
                # Our view drifted from the kernel's: resynchronise, retry once.
                self._resync()
                part = [f for f in part if f in self.installed]
                if not part:
                    continue
                keys = ", ".join(f.nft() for f in part)
                nft.run(f"delete element netdev {self.table} routes {{ {keys} }}")
            for f in part:
                del self.installed[f]

    def install_drops(self, drops: Sequence[tuple[FlowKey, float]]) -> None:
        nft = self._require_nft()
        items = [f"{f.nft()} timeout {max(1, round(ttl * 1000))}ms" for f, ttl in drops if ttl > 0]
        # Re-adding a present element refreshes its timeout (checked on 6.18).
        for part in _chunks(items, self.chunk):
            nft.run(f"add element netdev {self.table} drops {{ {', '.join(part)} }}")

    def lift_drops(self, flows: Sequence[FlowKey]) -> None:
        nft = self._require_nft()
        for part in _chunks([f.nft() for f in flows], self.chunk):
            try:
                nft.run(f"delete element netdev {self.table} drops {{ {', '.join(part)} }}")
            except NftError:
                # One of them timed out meanwhile (nft 1.0.6 has no "destroy"):
                # delete them one by one, the expired ones fail harmlessly.
                for key in part:
                    with contextlib.suppress(NftError):
                        nft.run(f"delete element netdev {self.table} drops {{ {key} }}")

    def trust(self, sources: Sequence[str]) -> None:
        """Add client addresses to the ``trusted`` set (exempt from the global
        miss limit) for ``trusted_ttl``; re-adding refreshes the timeout."""
        if not sources or not (self.limits.global_pps or self.limits.per_source_pps):
            return
        nft = self._require_nft()
        for part in _chunks(list(sources), self.chunk):
            nft.run(f"add element netdev {self.table} trusted {{ {', '.join(part)} }}")

    # -- counters ------------------------------------------------------------

    def _list(self, cmd: str) -> list[dict[str, Any]]:
        with self._reader_lock:
            if self._reader is None:
                raise RuntimeError("datapath is not open")
            return self._reader.json(cmd)

    def _read_routes(self) -> dict[FlowKey, tuple[bytes, int]]:
        known = {(f.src, f.sport, f.dst, f.dport): f for f in self.installed.copy()}
        out: dict[FlowKey, tuple[bytes, int]] = {}
        for item in self._list(f"list map netdev {self.table} routes"):
            m = item.get("map")
            if not m:
                continue
            for elem in m.get("elem", []):
                if not isinstance(elem, list) or len(elem) != 2:
                    continue
                key, mac = elem
                inner = key.get("elem", key) if isinstance(key, dict) else key
                val = inner.get("val", inner) if isinstance(inner, dict) else inner
                concat = val.get("concat") if isinstance(val, dict) else None
                if not concat or len(concat) != 4:
                    continue
                src, sport, dst, dport = concat
                packets = 0
                if isinstance(inner, dict) and isinstance(inner.get("counter"), dict):
                    packets = int(inner["counter"].get("packets", 0))
                flow = known.get((src, sport, dst, dport)) or FlowKey(
                    TCP, str(src), int(sport), str(dst), int(dport)
                )
                out[flow] = (bytes.fromhex(str(mac).replace(":", "")), packets)
        return out

    def _resync(self) -> None:
        self.installed = {f: mac for f, (mac, _) in self._read_routes().items()}

    def packet_counts(self) -> dict[FlowKey, int] | None:
        """Per-route packet counters (O(routes); may run in a worker thread)."""
        return {f: n for f, (_, n) in self._read_routes().items()}

    def stats(self) -> dict[str, int]:
        """Kernel counters (hits, closes, misses, drops; ``forwarded`` = hits +
        closes) and this process's TAP/transmit counters."""
        counters = {
            "hits": 0,
            "closes": 0,
            "misses": 0,
            "syns": 0,
            "drops": 0,
            "limited_source": 0,
            "limited_global": 0,
        }
        for item in self._list(f"list counters table netdev {self.table}"):
            c = item.get("counter")
            if isinstance(c, dict) and c.get("name") in counters:
                counters[str(c["name"])] = int(c.get("packets", 0))
        return {
            "forwarded": counters["hits"] + counters["closes"],
            **counters,
            # every packet the kernel sent to the process: new connections' SYNs
            # and packets of flows with no route
            "misses": counters["misses"] + counters["syns"],
            "routes": len(self.installed),
            "tap_frames": self.tap_frames,
            "tap_ignored": self.tap_ignored,
            "transmitted": self.transmitted,
            "tx_errors": self.tx_errors,
        }

    # -- helpers -------------------------------------------------------------

    def _require_nft(self) -> Nft:
        if self._nft is None:
            raise RuntimeError("datapath is not open")
        return self._nft

    def _require_sock(self) -> socket.socket:
        if self._sock is None:
            raise RuntimeError("datapath is not open")
        return self._sock
