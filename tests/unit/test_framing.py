"""The frame envelope and what a ``Connection`` does with each kind of bad frame.

- wrong MAC, unknown type, bad body: ``Rejected`` event, counted, stream goes on;
- bad magic, bad version, oversize length: ``ProtocolError``, stream refused.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hanlb.flow import FlowKey
from hanlb.protocol.codec import MESSAGES, decode_body, encode_body, type_code
from hanlb.protocol.framing import (
    HEADER,
    MAC_LEN,
    MAGIC,
    MAX_BODY,
    VERSION,
    ErrorCode,
    FrameDecoder,
    ProtocolError,
    RawFrame,
    Rejected,
    encode_frame,
)
from hanlb.protocol.messages import (
    AddRoutes,
    ClassifyBatch,
    Connection,
    DeleteRoutes,
    DropRoute,
    DropRoutes,
    DumpRoutes,
    Hello,
    Miss,
    Ping,
    Pong,
    Route,
    RouteDump,
    RoutesRemoved,
)

KEY = b"test cluster key 0123456789"
OTHER_KEY = b"some other cluster key 98765"

FLOW = FlowKey(6, "192.0.2.1", 40000, "198.51.100.10", 80)
FLOW2 = FlowKey(6, "192.0.2.2", 40001, "198.51.100.10", 443)
ROUTE = Route(FLOW, "web1", "02:00:00:00:01:01")

SAMPLES: list[Any] = [
    Hello("fw1", "forwarder", 1234567890123),
    Ping(1, 12.5),
    Pong(1, 12.5),
    ClassifyBatch([Miss(FLOW, 0x02, b"\x45" + b"\x00" * 39), Miss(FLOW2, 0x10, b"")]),
    AddRoutes([ROUTE, Route(FLOW2, "web2", "02:00:00:00:01:02")]),
    DeleteRoutes([FLOW, FLOW2]),
    DropRoutes([DropRoute(FLOW, 2.0)]),
    RoutesRemoved([FLOW], "idle"),
    DumpRoutes(7),
    RouteDump(7, [ROUTE], [DropRoute(FLOW2, 0.5)]),
    ClassifyBatch([]),
]
samples = st.sampled_from(SAMPLES)


def frame(msg: Any, key: bytes = KEY) -> bytes:
    return encode_frame(key, type_code(msg), encode_body(msg))


def signed(msg_type: int, body: bytes, key: bytes = KEY) -> bytes:
    return encode_frame(key, msg_type, body)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


# -- layout ----------------------------------------------------------------------


def test_frame_layout() -> None:
    msg = Ping(3, 1.5)
    body = encode_body(msg)
    wire = Connection(KEY).send(msg)
    assert wire[:2] == MAGIC == b"HL"
    assert wire[2] == VERSION == 1
    assert wire[3] == 2 == type_code(msg)
    assert struct.unpack("!I", wire[4:8])[0] == len(body)
    assert wire[8 : 8 + len(body)] == body
    assert body == msgpack.packb([3, 1.5])
    mac = hmac.new(KEY, wire[: 8 + len(body)], hashlib.sha256).digest()
    assert wire[8 + len(body) :] == mac
    assert len(wire) == HEADER.size + len(body) + MAC_LEN


def test_nested_records_are_arrays() -> None:
    body = encode_body(AddRoutes([ROUTE]))
    assert msgpack.unpackb(body) == [
        [[[6, "192.0.2.1", 40000, "198.51.100.10", 80], "web1", "02:00:00:00:01:01"]]
    ]


def test_codes() -> None:
    assert {MESSAGES[c].__name__: c for c in sorted(MESSAGES) if c < 64} == {
        "Hello": 1,
        "Ping": 2,
        "Pong": 3,
        "ClassifyBatch": 32,
        "AddRoutes": 33,
        "DeleteRoutes": 34,
        "DropRoutes": 35,
        "RoutesRemoved": 36,
        "DumpRoutes": 37,
        "RouteDump": 38,
    }
    assert [e.value for e in ErrorCode] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_samples_round_trip(msg: Any) -> None:
    assert decode_body(type_code(msg), encode_body(msg)) == msg
    assert Connection(KEY).receive_data(frame(msg)) == [msg]


def test_frame_decoder_waits_for_whole_frames() -> None:
    wire = frame(Ping(1, 2.0))
    dec = FrameDecoder(KEY)
    for i, byte in enumerate(wire):
        assert dec.next_frame() is None, i
        dec.receive_data(bytes([byte]))
    assert dec.next_frame() == RawFrame(2, encode_body(Ping(1, 2.0)))
    assert dec.next_frame() is None


def test_empty_and_max_size_bodies() -> None:
    dec = FrameDecoder(KEY)
    dec.receive_data(signed(200, b""))
    assert dec.next_frame() == RawFrame(200, b"")
    big = bytes(MAX_BODY)
    dec.receive_data(signed(200, big))
    assert dec.next_frame() == RawFrame(200, big)


def test_encode_refuses_oversize_body() -> None:
    with pytest.raises(ProtocolError) as info:
        encode_frame(KEY, 2, bytes(MAX_BODY + 1))
    assert info.value.code is ErrorCode.TOO_LARGE


# -- wrong MAC: dropped, counted, stream goes on -------------------------------------


@settings(max_examples=50, deadline=None)
@given(samples, samples)
def test_other_key_is_rejected_and_stream_continues(bad: Any, good: Any) -> None:
    conn = Connection(KEY)
    events = conn.receive_data(frame(bad, OTHER_KEY) + frame(good))
    assert [type(e) for e in events] == [Rejected, type(good)]
    assert events[0].code is ErrorCode.BAD_MAC
    assert events[1] == good
    assert conn.rejected == {ErrorCode.BAD_MAC: 1}


@pytest.mark.parametrize("msg", [Ping(1, 2.0), Hello("c1", "classifier", 9)])
def test_every_flipped_bit_in_body_or_mac_is_bad_mac(msg: Any) -> None:
    """Exhaustively: each single bit of the body and of the MAC, and the type byte."""
    wire = frame(msg)
    good = frame(Pong(5, 6.0))
    conn = Connection(KEY)
    bits = [*range(3 * 8, 4 * 8), *range(HEADER.size * 8, len(wire) * 8)]
    for n, bit in enumerate(bits, 1):
        events = conn.receive_data(flip(wire, bit) + good)
        assert len(events) == 2, bit
        assert isinstance(events[0], Rejected)
        assert events[0].code is ErrorCode.BAD_MAC, bit
        assert events[1] == Pong(5, 6.0)
        assert conn.rejected == {ErrorCode.BAD_MAC: n}


@settings(max_examples=100, deadline=None)
@given(samples, st.data(), st.lists(st.integers(0, 2000), max_size=5))
def test_flipped_bit_split_stream(msg: Any, data: st.DataObject, cuts: list[int]) -> None:
    wire = frame(msg)
    bit = data.draw(st.integers(HEADER.size * 8, len(wire) * 8 - 1))
    stream = frame(Ping(1, 1.0)) + flip(wire, bit) + frame(msg)
    conn = Connection(KEY)
    events: list[Any] = []
    points = sorted({0, len(stream), *(c % len(stream) for c in cuts)})
    for a, b in itertools.pairwise(points):
        events.extend(conn.receive_data(stream[a:b]))
    assert events[0] == Ping(1, 1.0)
    assert isinstance(events[1], Rejected)
    assert events[1].code is ErrorCode.BAD_MAC
    assert events[2] == msg
    assert conn.rejected == {ErrorCode.BAD_MAC: 1}


def test_mac_is_checked_before_type() -> None:
    (event,) = Connection(KEY).receive_data(signed(250, b"\x90", OTHER_KEY))
    assert event.code is ErrorCode.BAD_MAC


# -- unknown type, bad body: dropped, counted, stream goes on ------------------------


def test_every_unknown_type_code_is_bad_type() -> None:
    unknown = [c for c in range(256) if c not in MESSAGES]
    assert 0 in unknown
    conn = Connection(KEY)
    for n, code in enumerate(unknown, 1):
        events = conn.receive_data(signed(code, encode_body(Ping(1, 2.0))) + frame(DumpRoutes(1)))
        assert events[0] == Rejected(ErrorCode.BAD_TYPE, f"unknown type {code}")
        assert events[1] == DumpRoutes(1)
        assert conn.rejected == {ErrorCode.BAD_TYPE: n}


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


FLOW_FIELDS = [6, "192.0.2.1", 40000, "198.51.100.10", 80]

GARBAGE_MSGPACK = {
    "empty": b"",
    "never-used byte": b"\xc1",
    "truncated array": b"\x92\x01",
    "truncated str": b"\xa5ab",
    "trailing bytes": _pack([1, 2.0]) + b"\x00",
    "invalid utf-8": b"\x92\x01\xa2\xff\xfe",
    "non-string map key": b"\x81\x01\x02",
    "deep nesting": b"\x91" * 100_000 + b"\xc0",
    "huge declared length": b"\xdd\xff\xff\xff\xff",
}

BAD_FIELDS: dict[str, tuple[int, Any]] = {
    "not an array": (2, {"seq": 1, "sent": 2.0}),
    "scalar": (2, 1),
    "nil": (2, None),
    "too few fields": (2, [1]),
    "too many fields": (2, [1, 2.0, 3]),
    "str for int": (2, ["1", 2.0]),
    "bool for int": (2, [True, 2.0]),
    "float for int": (2, [1.0, 2.0]),
    "str for float": (2, [1, "2.0"]),
    "nil for int": (2, [None, 2.0]),
    "bytes for str": (1, [b"fw1", "forwarder", 1]),
    "str for bytes": (32, [[[FLOW_FIELDS, 2, "head"]]]),
    "list field not a list": (34, [FLOW_FIELDS]),
    "record not an array": (34, [[{"proto": 6}]]),
    "record too short": (34, [[FLOW_FIELDS[:4]]]),
    "flow not tcp": (34, [[[17, *FLOW_FIELDS[1:]]]]),
    "flow bad address": (34, [[[6, "192.0.2.300", 1, "198.51.100.10", 80]]]),
    "flow ipv6 address": (34, [[[6, "::1", 1, "198.51.100.10", 80]]]),
    "flow port 0": (34, [[[6, "192.0.2.1", 1, "198.51.100.10", 0]]]),
    "flow port too big": (34, [[[6, "192.0.2.1", 70000, "198.51.100.10", 80]]]),
    "miss flags too big": (32, [[[FLOW_FIELDS, 256, b""]]]),
    "miss head too long": (32, [[[FLOW_FIELDS, 2, bytes(129)]]]),
    "route bad mac": (33, [[[FLOW_FIELDS, "web1", "02:00:00:00:01"]]]),
    "route mac not hex": (33, [[[FLOW_FIELDS, "web1", "zz:00:00:00:01:01"]]]),
    "drop ttl str": (35, [[[FLOW_FIELDS, "2"]]]),
    "reason not str": (36, [[FLOW_FIELDS], 3]),
    "dump with routes nil": (38, [1, None, []]),
}


@pytest.mark.parametrize("name", list(GARBAGE_MSGPACK))
def test_garbage_msgpack_is_bad_body(name: str) -> None:
    conn = Connection(KEY)
    events = conn.receive_data(signed(2, GARBAGE_MSGPACK[name]) + frame(Ping(1, 1.0)))
    assert isinstance(events[0], Rejected)
    assert events[0].code is ErrorCode.BAD_BODY
    assert events[1] == Ping(1, 1.0)
    assert conn.rejected == {ErrorCode.BAD_BODY: 1}


@pytest.mark.parametrize("name", list(BAD_FIELDS))
def test_wrong_fields_are_bad_body(name: str) -> None:
    code, fields = BAD_FIELDS[name]
    conn = Connection(KEY)
    events = conn.receive_data(signed(code, _pack(fields)) + frame(Ping(1, 1.0)))
    assert isinstance(events[0], Rejected), events[0]
    assert events[0].code is ErrorCode.BAD_BODY
    assert events[1] == Ping(1, 1.0)
    assert conn.rejected == {ErrorCode.BAD_BODY: 1}


def test_int_for_float_is_accepted() -> None:
    (msg,) = Connection(KEY).receive_data(signed(2, _pack([1, 2])))
    assert msg == Ping(1, 2.0)
    assert type(msg.sent) is float


def test_rejections_are_counted_by_code() -> None:
    conn = Connection(KEY)
    stream = (
        frame(Ping(1, 1.0), OTHER_KEY)
        + signed(255, b"\x90")
        + signed(2, b"\xc1")
        + frame(Ping(2, 1.0), OTHER_KEY)
        + frame(Ping(3, 1.0))
    )
    events = conn.receive_data(stream)
    assert [e.code for e in events[:4]] == [
        ErrorCode.BAD_MAC,
        ErrorCode.BAD_TYPE,
        ErrorCode.BAD_BODY,
        ErrorCode.BAD_MAC,
    ]
    assert events[4] == Ping(3, 1.0)
    assert conn.rejected == {ErrorCode.BAD_MAC: 2, ErrorCode.BAD_TYPE: 1, ErrorCode.BAD_BODY: 1}


# -- bad magic, version, length: the stream is refused -------------------------------


def _header(
    magic: bytes = MAGIC, version: int = VERSION, msg_type: int = 2, length: int = 0
) -> bytes:
    return HEADER.pack(magic, version, msg_type, length)


STREAM_ERRORS = {
    "bad magic": (_header(magic=b"HM"), ErrorCode.BAD_MAGIC),
    "bad magic first byte": (b"X", ErrorCode.BAD_MAGIC),
    "bad magic second byte": (b"HX", ErrorCode.BAD_MAGIC),
    "http request": (b"GET / HTTP/1.1\r\n\r\n", ErrorCode.BAD_MAGIC),
    "tls client hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", ErrorCode.BAD_MAGIC),
    "version 0": (_header(version=0), ErrorCode.BAD_VERSION),
    "version 2": (_header(version=2), ErrorCode.BAD_VERSION),
    "version 255": (_header(version=255), ErrorCode.BAD_VERSION),
    "length max + 1": (_header(length=MAX_BODY + 1), ErrorCode.TOO_LARGE),
    "length 2**32 - 1": (_header(length=2**32 - 1), ErrorCode.TOO_LARGE),
}


@pytest.mark.parametrize("name", list(STREAM_ERRORS))
def test_stream_errors_raise(name: str) -> None:
    data, code = STREAM_ERRORS[name]
    conn = Connection(KEY)
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(data)
    assert info.value.code is code
    # The stream stays refused: it cannot be trusted to be in step again.
    with pytest.raises(ProtocolError) as again:
        conn.receive_data(frame(Ping(1, 1.0)))
    assert again.value.code is code


@pytest.mark.parametrize("name", list(STREAM_ERRORS))
def test_stream_errors_after_good_frames(name: str) -> None:
    data, code = STREAM_ERRORS[name]
    conn = Connection(KEY)
    assert conn.receive_data(frame(Ping(1, 1.0))) == [Ping(1, 1.0)]
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(data)
    assert info.value.code is code


def test_stream_errors_byte_at_a_time() -> None:
    for data, code in STREAM_ERRORS.values():
        conn = Connection(KEY)
        with pytest.raises(ProtocolError) as info:
            for i in range(len(data)):
                conn.receive_data(data[i : i + 1])
        assert info.value.code is code


def test_early_magic_check_and_partial_header_waits() -> None:
    dec = FrameDecoder(KEY)
    dec.receive_data(b"H")
    assert dec.next_frame() is None
    dec.receive_data(b"L\x01")
    assert dec.next_frame() is None
    dec.receive_data(struct.pack("!BI", 2, MAX_BODY))  # a whole header, max length: waits
    assert dec.next_frame() is None


def test_protocol_error_carries_code_and_detail() -> None:
    exc = ProtocolError(ErrorCode.BAD_VERSION, "version 2")
    assert exc.code is ErrorCode.BAD_VERSION
    assert exc.detail == "version 2"
    assert str(exc) == "BAD_VERSION: version 2"
    assert str(ProtocolError(ErrorCode.BAD_MAGIC)) == "BAD_MAGIC"


# -- regressions: problems found in src by these tests, since fixed ---------------


@pytest.mark.parametrize(
    "mac", ["0x:00:00:00:00:00", "-0:00:00:00:00:00", "0_:00:00:00:00:00", ":::::000000000000"]
)
def test_route_refuses_malformed_mac(mac: str) -> None:
    with pytest.raises(ValueError):
        Route(FLOW, "web1", mac)


def test_events_before_a_stream_error_are_not_lost() -> None:
    # Wanted: the frames completed before the bad bytes are handed out, and the
    # error is raised on the next call (or carried by the exception).
    conn = Connection(KEY)
    events = conn.receive_data(frame(Ping(1, 1.0)) + frame(Ping(2, 1.0), OTHER_KEY) + b"XX")
    assert events == [Ping(1, 1.0), Rejected(ErrorCode.BAD_MAC, "type 2")]
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(b"")
    assert info.value.code is ErrorCode.BAD_MAGIC
