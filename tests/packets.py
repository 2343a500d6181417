"""Build Ethernet/IPv4/TCP frames for tests.

The checksums here are computed independently of ``hanlb.flow`` (RFC 1071,
written out the long way), so tests can check the package against them.

    >>> frame = tcp_frame("192.0.2.1", 40000, "198.51.100.10", 80, SYN)
    >>> len(frame)
    54
"""

from __future__ import annotations

import socket
import struct

__all__ = [
    "ACK",
    "FIN",
    "PSH",
    "RST",
    "SYN",
    "checksum",
    "ipv4_checksum_ok",
    "mac_to_bytes",
    "tcp_checksum",
    "tcp_checksum_ok",
    "tcp_frame",
]

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

CLIENT_MAC = "02:00:00:00:00:c1"
FORWARDER_MAC = "02:00:00:00:00:f1"

ETH_HEADER = 14
TCP_PROTO = 6


def mac_to_bytes(mac: str | bytes) -> bytes:
    """``"02:00:00:00:00:01"`` (or 6 raw bytes) -> 6 bytes."""
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ValueError(f"a MAC is 6 bytes, not {len(mac)}")
        return mac
    raw = bytes(int(part, 16) for part in mac.split(":"))
    if len(raw) != 6:
        raise ValueError(f"bad MAC {mac!r}")
    return raw


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(src: bytes, dst: bytes, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, TCP_PROTO, length)


def tcp_checksum(src: str, dst: str, segment: bytes) -> int:
    """Checksum of a TCP segment whose checksum field is zero."""
    return checksum(
        _pseudo_header(socket.inet_aton(src), socket.inet_aton(dst), len(segment)) + segment
    )


def tcp_frame(
    src: str,
    sport: int,
    dst: str,
    dport: int,
    flags: int,
    payload: bytes = b"",
    src_mac: str | bytes = CLIENT_MAC,
    dst_mac: str | bytes = FORWARDER_MAC,
    *,
    seq: int = 1000,
    ack: int = 0,
    window: int = 65535,
    ttl: int = 64,
    ident: int = 1,
    dont_fragment: bool = True,
    ip_options: bytes = b"",
    tcp_options: bytes = b"",
) -> bytes:
    """One Ethernet frame carrying IPv4/TCP, with correct IPv4 and TCP checksums.

    ``flags`` is the TCP flags byte (``SYN | ACK`` ...). Options must be a
    multiple of 4 bytes long. No Ethernet padding is added.
    """
    if len(ip_options) % 4 or len(tcp_options) % 4:
        raise ValueError("options must be a multiple of 4 bytes")
    saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
    tcp_len = 20 + len(tcp_options)
    segment = bytearray(
        struct.pack(
            "!HHIIBBHHH",
            sport,
            dport,
            seq,
            ack,
            (tcp_len // 4) << 4,
            flags,
            window,
            0,  # checksum, filled in below
            0,  # urgent pointer
        )
        + tcp_options
        + payload
    )
    csum = checksum(_pseudo_header(saddr, daddr, len(segment)) + bytes(segment))
    segment[16:18] = struct.pack("!H", csum)

    ihl = 20 + len(ip_options)
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl // 4,
            0,
            ihl + len(segment),
            ident,
            0x4000 if dont_fragment else 0,
            ttl,
            TCP_PROTO,
            0,  # header checksum, filled in below
            saddr,
            daddr,
        )
        + ip_options
    )
    header[10:12] = struct.pack("!H", checksum(bytes(header)))

    eth = mac_to_bytes(dst_mac) + mac_to_bytes(src_mac) + b"\x08\x00"
    return eth + bytes(header) + bytes(segment)


def ipv4_checksum_ok(frame: bytes) -> bool:
    ihl = (frame[ETH_HEADER] & 0x0F) * 4
    return checksum(frame[ETH_HEADER : ETH_HEADER + ihl]) == 0


def tcp_checksum_ok(frame: bytes) -> bool:
    """Whether the TCP checksum of an Ethernet/IPv4/TCP frame verifies."""
    ihl = (frame[ETH_HEADER] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, ETH_HEADER + 2)[0]
    segment = frame[ETH_HEADER + ihl : ETH_HEADER + total]
    src, dst = frame[26:30], frame[30:34]
    return checksum(_pseudo_header(src, dst, len(segment)) + segment) == 0
