"""Flow keys and ``parse_frame`` (the miss path's packet reader), checked against
frames built by ``tests.packets``."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hanlb.flow import (
    BadPacket,
    FlowKey,
    Packet,
    mac_bytes,
    parse_frame,
    rewrite_macs,
    tcp_checksum_fix,
)
from tests.packets import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    checksum,
    ipv4_checksum_ok,
    mac_to_bytes,
    tcp_checksum_ok,
    tcp_frame,
)

ipv4s = st.ip_addresses(v=4).map(str)
ports = st.integers(0, 65535)
dports = st.integers(1, 65535)
flag_bytes = st.integers(0, 255)
payloads = st.binary(max_size=300)


def _patch(frame: bytes, offset: int, data: bytes) -> bytes:
    return frame[:offset] + data + frame[offset + len(data) :]


# -- the builder itself -------------------------------------------------------


def test_checksum_known_vector() -> None:
    # The IPv4 header example from RFC 1071's usual illustration (Wikipedia).
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert checksum(header) == 0xB861


def test_builder_layout() -> None:
    frame = tcp_frame("192.0.2.1", 40000, "198.51.100.10", 80, SYN, b"hi")
    assert len(frame) == 14 + 20 + 20 + 2
    assert frame[:6] == mac_to_bytes("02:00:00:00:00:f1")
    assert frame[6:12] == mac_to_bytes("02:00:00:00:00:c1")
    assert frame[12:14] == b"\x08\x00"
    assert frame[14] == 0x45
    assert struct.unpack_from("!H", frame, 16)[0] == 42
    assert frame[23] == 6
    assert frame[47] == SYN
    assert frame[-2:] == b"hi"
    assert ipv4_checksum_ok(frame)
    assert tcp_checksum_ok(frame)


@settings(max_examples=100)
@given(ipv4s, ports, ipv4s, dports, flag_bytes, payloads)
def test_builder_checksums_verify(
    src: str, sport: int, dst: str, dport: int, flags: int, payload: bytes
) -> None:
    frame = tcp_frame(src, sport, dst, dport, flags, payload)
    assert ipv4_checksum_ok(frame)
    assert tcp_checksum_ok(frame)
    # Any single changed payload bit breaks the TCP checksum.
    if payload:
        broken = bytearray(frame)
        broken[-1] ^= 0x01
        assert not tcp_checksum_ok(bytes(broken))


# -- parse_frame: good frames --------------------------------------------------


@pytest.mark.parametrize(
    "flags", [SYN, SYN | ACK, ACK, PSH | ACK, FIN | ACK, RST, RST | ACK, 0, 0xFF]
)
def test_parse_reads_flow_and_flags(flags: int) -> None:
    frame = tcp_frame("192.0.2.1", 40000, "198.51.100.10", 80, flags, b"payload", seq=1234567)
    pkt = parse_frame(frame)
    flow = FlowKey(6, "192.0.2.1", 40000, "198.51.100.10", 80)
    assert pkt == Packet(flow, flags, frame, seq=1234567)
    assert str(pkt.flow) == "tcp 192.0.2.1:40000 -> 198.51.100.10:80"
    assert pkt.flow.nft() == "192.0.2.1 . 40000 . 198.51.100.10 . 80"


def test_parse_with_ip_options_and_ethernet_padding() -> None:
    frame = tcp_frame("10.0.0.1", 1234, "10.0.0.2", 443, ACK, ip_options=b"\x01" * 8)
    assert frame[14] == 0x47
    padded = frame + b"\x00" * 10  # Ethernet trailer beyond the IPv4 total length
    pkt = parse_frame(padded)
    assert pkt.flow == FlowKey(6, "10.0.0.1", 1234, "10.0.0.2", 443)
    assert pkt.flags == ACK


def test_parse_accepts_source_port_zero() -> None:
    assert parse_frame(tcp_frame("10.0.0.1", 0, "10.0.0.2", 80, SYN)).flow.sport == 0


@settings(max_examples=150)
@given(ipv4s, ports, ipv4s, dports, flag_bytes, payloads)
def test_parse_round_trips_builder(
    src: str, sport: int, dst: str, dport: int, flags: int, payload: bytes
) -> None:
    frame = tcp_frame(src, sport, dst, dport, flags, payload)
    pkt = parse_frame(frame)
    assert pkt.flow == FlowKey(6, src, sport, dst, dport)
    assert pkt.flags == flags
    assert pkt.frame == frame


# -- parse_frame: what it refuses ----------------------------------------------

GOOD = tcp_frame("192.0.2.1", 40000, "198.51.100.10", 80, SYN)


def _bad_cases() -> dict[str, bytes]:
    return {
        "empty": b"",
        "ethernet header only": GOOD[:14],
        "short by one": GOOD[:53],
        "arp": _patch(GOOD, 12, b"\x08\x06"),
        "ipv6 ethertype": _patch(GOOD, 12, b"\x86\xdd"),
        "vlan tagged": GOOD[:12] + b"\x81\x00\x00\x01" + GOOD[12:],
        "ip version 6": _patch(GOOD, 14, b"\x65"),
        "ihl below 5": _patch(GOOD, 14, b"\x44"),
        "ihl beyond frame": _patch(GOOD, 14, b"\x4f"),
        "total length beyond frame": _patch(GOOD, 16, struct.pack("!H", 41)),
        "total length shorter than headers": _patch(GOOD, 16, struct.pack("!H", 39)),
        "total length zero": _patch(GOOD, 16, b"\x00\x00"),
        "udp": _patch(GOOD, 23, b"\x11"),
        "icmp": _patch(GOOD, 23, b"\x01"),
        "fragment offset": _patch(GOOD, 20, struct.pack("!H", 0x0001)),
        "last fragment": _patch(GOOD, 20, struct.pack("!H", 0x00B9)),
        "middle fragment": _patch(GOOD, 20, struct.pack("!H", 0x2010)),
        "destination port 0": _patch(GOOD, 36, b"\x00\x00"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_parse_refuses(case: str) -> None:
    with pytest.raises(BadPacket):
        parse_frame(_bad_cases()[case])


def test_bad_packet_is_a_value_error() -> None:
    assert issubclass(BadPacket, ValueError)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_parse_arbitrary_bytes(data: bytes) -> None:
    try:
        pkt = parse_frame(data)
    except BadPacket:
        return
    assert isinstance(pkt, Packet)
    assert pkt.frame == data


@settings(max_examples=300)
@given(
    st.builds(tcp_frame, ipv4s, ports, ipv4s, dports, flag_bytes, payloads),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
    st.integers(0, 400),
)
def test_parse_mutated_frames(frame: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    """A real frame with a few bytes changed and maybe cut short: Packet or BadPacket."""
    data = bytearray(frame)
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    del data[cut:]
    try:
        pkt = parse_frame(bytes(data))
    except BadPacket:
        return
    ipaddress.IPv4Address(pkt.flow.src)
    assert 0 < pkt.flow.dport < 65536


# -- checksum fix and MAC rewrite ----------------------------------------------


def _zero_tcp_checksum(frame: bytes) -> bytes:
    t = 14 + (frame[14] & 0x0F) * 4
    return _patch(frame, t + 16, b"\x00\x00")


@settings(max_examples=150)
@given(
    ipv4s,
    ports,
    ipv4s,
    dports,
    flag_bytes,
    payloads,
    st.sampled_from([b"", b"\x01\x01\x01\x01", b"\x00" * 12]),
    st.binary(max_size=8),
)
def test_tcp_checksum_fix_matches_builder(
    src: str,
    sport: int,
    dst: str,
    dport: int,
    flags: int,
    payload: bytes,
    ip_options: bytes,
    trailer: bytes,
) -> None:
    frame = tcp_frame(src, sport, dst, dport, flags, payload, ip_options=ip_options)
    # Offloaded checksum (zero) and garbage checksum are both repaired.
    assert tcp_checksum_fix(_zero_tcp_checksum(frame)) == frame
    t = 14 + len(ip_options) + 20
    assert tcp_checksum_fix(_patch(frame, t + 16, b"\xde\xad")) == frame
    # Ethernet padding after the IP packet is kept and not summed.
    assert tcp_checksum_fix(_zero_tcp_checksum(frame) + trailer) == frame + trailer


def test_rewrite_macs_keeps_ip_packet() -> None:
    frame = tcp_frame("192.0.2.1", 40000, "198.51.100.10", 80, SYN, b"x")
    own, host = mac_bytes("02:00:00:00:00:f1"), mac_bytes("02:00:00:00:01:01")
    out = rewrite_macs(frame, own, host)
    assert out[:6] == host
    assert out[6:12] == own
    assert out[12:] == frame[12:]
    assert parse_frame(out).flow == parse_frame(frame).flow


# -- FlowKey -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        (17, "10.0.0.1", 1, "10.0.0.2", 80),
        (6, "10.0.0.1", -1, "10.0.0.2", 80),
        (6, "10.0.0.1", 65536, "10.0.0.2", 80),
        (6, "10.0.0.1", 1, "10.0.0.2", 0),
        (6, "10.0.0.1", 1, "10.0.0.2", 65536),
        (6, "10.0.0.300", 1, "10.0.0.2", 80),
        (6, "10.0.0.1", 1, "::1", 80),
        (6, "10.0.0.1", 1, "", 80),
    ],
)
def test_flow_key_refuses(args: tuple[int, str, int, str, int]) -> None:
    with pytest.raises(ValueError):
        FlowKey(*args)


def test_flow_key_is_hashable_and_equal_by_value() -> None:
    a = FlowKey(6, "10.0.0.1", 1, "10.0.0.2", 80)
    b = FlowKey(6, "10.0.0.1", 1, "10.0.0.2", 80)
    assert a == b
    assert {a: 1}[b] == 1
