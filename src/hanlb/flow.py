"""Flow keys and the few packet fields the miss path reads.

A flow is identified by its transport 5-tuple seen from the client:
``(protocol, client address, client port, VIP, VIP port)``. ``parse_frame``
reads an Ethernet frame carrying IPv4/TCP and returns the flow and TCP flags;
anything else (too short, not IPv4, not TCP, bad lengths) raises ``BadPacket``
so the miss path can drop and count it.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from .protocol.codec import record

__all__ = [
    "ACK",
    "FIN",
    "RST",
    "SYN",
    "BadPacket",
    "FlowKey",
    "Packet",
    "internet_checksum",
    "parse_frame",
    "rewrite_macs",
    "tcp_checksum_fix",
]

TCP = 6
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
ETH_P_IP = 0x0800


@record
@dataclass(frozen=True, slots=True)
class FlowKey:
    proto: int
    src: str
    sport: int
    dst: str
    dport: int

    def __post_init__(self) -> None:
        if self.proto != TCP:
            raise ValueError(f"protocol {self.proto} is not TCP")
        if not (0 <= self.sport < 65536 and 0 < self.dport < 65536):
            raise ValueError("port out of range")
        for addr in (self.src, self.dst):
            try:  # strict dotted quad: no short forms, no leading zeros
                socket.inet_pton(socket.AF_INET, addr)
            except (OSError, TypeError, ValueError):
                raise ValueError(f"{addr!r} is not an IPv4 address") from None

    @classmethod
    def trusted(cls, proto: int, src: str, sport: int, dst: str, dport: int) -> FlowKey:
        """Build without checks, for fields just read out of a parsed packet (the
        miss path); keys from the wire go through ``__post_init__``."""
        key = object.__new__(cls)
        for name, value in zip(_FIELDS, (proto, src, sport, dst, dport), strict=True):
            object.__setattr__(key, name, value)
        return key

    def __str__(self) -> str:
        return f"tcp {self.src}:{self.sport} -> {self.dst}:{self.dport}"

    def nft(self) -> str:
        """The key as an nftables concatenation (saddr . sport . daddr . dport)."""
        return f"{self.src} . {self.sport} . {self.dst} . {self.dport}"


_FIELDS = ("proto", "src", "sport", "dst", "dport")


class BadPacket(ValueError):
    """A frame the miss path cannot use; the reason is the message."""


@dataclass(frozen=True, slots=True)
class Packet:
    flow: FlowKey
    flags: int
    frame: bytes
    seq: int = 0
    """The TCP sequence number."""


_ETH = struct.Struct("!6s6sH")


def parse_frame(frame: bytes) -> Packet:
    if len(frame) < 14 + 20 + 20:
        raise BadPacket("short frame")
    _dst, _src, ethertype = _ETH.unpack_from(frame)
    if ethertype != ETH_P_IP:
        raise BadPacket(f"ethertype {ethertype:#06x}")
    vihl = frame[14]
    if vihl >> 4 != 4:
        raise BadPacket("not IPv4")
    ihl = (vihl & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    if ihl < 20 or total < ihl + 20 or 14 + total > len(frame):
        raise BadPacket("bad IPv4 lengths")
    if frame[23] != TCP:
        raise BadPacket(f"protocol {frame[23]}")
    if struct.unpack_from("!H", frame, 20)[0] & 0x1FFF:
        raise BadPacket("IPv4 fragment")
    t = 14 + ihl
    sport, dport = struct.unpack_from("!HH", frame, t)
    if dport == 0:
        raise BadPacket("port 0")
    flags = frame[t + 13]
    seq = struct.unpack_from("!I", frame, t + 4)[0]
    src = socket.inet_ntoa(frame[26:30])
    dst = socket.inet_ntoa(frame[30:34])
    return Packet(FlowKey.trusted(TCP, src, sport, dst, dport), flags, frame, seq)


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def rewrite_macs(frame: bytes, src_mac: bytes, dst_mac: bytes) -> bytes:
    """L2 direct server return: same IP packet, new Ethernet addresses."""
    return dst_mac + src_mac + frame[12:]


def internet_checksum(data: bytes) -> int:
    """The ones'-complement sum of RFC 1071 (IPv4 header, TCP)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_checksum_fix(frame: bytes) -> bytes:
    """Recompute the TCP checksum of an Ethernet/IPv4/TCP frame.

    Used on frames read from a TAP or AF_PACKET socket whose checksum the sender
    left to offload (veth hands those over with the checksum not filled in).
    """
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    t = 14 + ihl
    seg = bytearray(frame[t : 14 + total])
    seg[16:18] = b"\0\0"
    pseudo = frame[26:34] + struct.pack("!BBH", 0, TCP, len(seg))
    c = internet_checksum(pseudo + bytes(seg))
    seg[16:18] = struct.pack("!H", c)
    return frame[:t] + bytes(seg) + frame[14 + total :]
