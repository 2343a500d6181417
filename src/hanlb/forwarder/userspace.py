"""Userspace datapath: an AF_PACKET socket on the LAN interface, all in Python.

Every IPv4/TCP frame addressed to this host (PACKET_HOST) whose destination is
a VIP reaches the core, which looks the flow up in its own table and calls
``transmit``. Flows given to ``install_drops`` are dropped here until their
ttl runs out. Slower than the kernel datapath, portable, and the reference it
is tested against.

The kernel stack also sees the frames an AF_PACKET socket reads: the forwarder
namespace must not route VIP traffic itself (no VIP address, no forwarding).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Sequence

from ..flow import TCP, FlowKey, tcp_checksum_fix
from .datapath import Datapath, Deliver

__all__ = ["UserspaceDatapath"]

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_HOST = 0
TP_STATUS_CSUMNOTREADY = 1 << 3
READS_PER_WAKEUP = 256
FRAME_MAX = 65536 + 14
_AUX = struct.Struct("=IIIHHHH")
_ANC = socket.CMSG_SPACE(_AUX.size)


def raw_key(flow: FlowKey) -> bytes:
    """saddr, sport, daddr, dport as they appear in the packet (12 bytes)."""
    return (
        socket.inet_aton(flow.src)
        + flow.sport.to_bytes(2, "big")
        + socket.inet_aton(flow.dst)
        + flow.dport.to_bytes(2, "big")
    )


class UserspaceDatapath(Datapath):
    """AF_PACKET datapath; the core decides every VIP frame."""

    fast_path = False

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.routes: dict[FlowKey, bytes] = {}
        self._vips: set[bytes] = set()
        self._drops: dict[bytes, float] = {}
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deliver: Deliver | None = None
        self._aux = False
        self.received = 0
        self.delivered = 0
        self.dropped = 0
        self.csum_fixed = 0
        self.transmitted = 0
        self.tx_errors = 0

    def open(self, deliver: Deliver, vips: Sequence[tuple[str, int]], own_mac: bytes) -> None:
        if self._sock is not None:
            raise RuntimeError("datapath already open")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.bind((self.interface, ETH_P_ALL))
            sock.setblocking(False)
            try:
                sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
                self._aux = True
            except OSError:
                self._aux = False
        except BaseException:
            sock.close()
            raise
        self._vips = {socket.inet_aton(a) + int(p).to_bytes(2, "big") for a, p in vips}
        self._sock, self._deliver, self._loop = sock, deliver, loop
        loop.add_reader(sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        self._sock = None
        self._loop = None
        self.routes.clear()
        self._drops.clear()

    def _on_readable(self) -> None:
        sock, deliver = self._sock, self._deliver
        if sock is None or deliver is None:
            return
        vips, drops, aux = self._vips, self._drops, self._aux
        now = 0.0
        for _ in range(READS_PER_WAKEUP):
            try:
                if aux:
                    frame, anc, _flags, addr = sock.recvmsg(FRAME_MAX, _ANC)
                else:
                    frame, addr = sock.recvfrom(FRAME_MAX)
                    anc = []
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.received += 1
            # Cheap byte checks first: to us, IPv4, TCP, not a later fragment.
            if addr[2] != PACKET_HOST or len(frame) < 54 or frame[12:14] != b"\x08\x00":
                continue
            vihl = frame[14]
            if vihl >> 4 != 4 or frame[23] != TCP or frame[20] & 0x1F or frame[21]:
                continue
            t = 14 + (vihl & 0x0F) * 4
            if frame[30:34] + frame[t + 2 : t + 4] not in vips:
                continue
            if drops:
                key = frame[26:30] + frame[t : t + 2] + frame[30:34] + frame[t + 2 : t + 4]
                expiry = drops.get(key)
                if expiry is not None:
                    if not now:
                        now = time.monotonic()
                    if expiry > now:
                        self.dropped += 1
                        continue
                    del drops[key]
            for level, kind, data in anc:
                if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= _AUX.size:
                    if _AUX.unpack_from(data)[0] & TP_STATUS_CSUMNOTREADY:
                        frame = tcp_checksum_fix(frame)
                        self.csum_fixed += 1
                    break
            self.delivered += 1
            deliver(frame)

    def transmit(self, frame: bytes) -> None:
        if self._sock is None:
            raise RuntimeError("datapath is not open")
        try:
            self._sock.send(frame)
        except OSError:
            self.tx_errors += 1
            return
        self.transmitted += 1

    def install(self, routes: Sequence[tuple[FlowKey, bytes]]) -> None:
        # The core looks routes up itself; kept for inspection and stats.
        self.routes.update(routes)

    def remove(self, flows: Sequence[FlowKey]) -> None:
        for f in flows:
            self.routes.pop(f, None)

    def install_drops(self, drops: Sequence[tuple[FlowKey, float]]) -> None:
        now = time.monotonic()
        for flow, ttl in drops:
            if ttl > 0:
                self._drops[raw_key(flow)] = now + ttl
        if len(self._drops) > 4096:
            self._drops = {k: e for k, e in self._drops.items() if e > now}

    def lift_drops(self, flows: Sequence[FlowKey]) -> None:
        for flow in flows:
            self._drops.pop(raw_key(flow), None)

    def packet_counts(self) -> dict[FlowKey, int] | None:
        return None

    def stats(self) -> dict[str, int]:
        """Frames received, delivered, dropped, checksum-fixed and transmitted."""
        return {
            "received": self.received,
            "delivered": self.delivered,
            "drops": self.dropped,
            "csum_fixed": self.csum_fixed,
            "transmitted": self.transmitted,
            "tx_errors": self.tx_errors,
            "routes": len(self.routes),
            "drop_entries": len(self._drops),
        }
