"""Property tests for the typed message codec and the sans-I/O ``Connection``.

Strategies are built generically from each registered message's dataclass
field types, so a new message type is covered as soon as it is registered;
only fields with invariants of their own need an override below (by class
and field, or by field name wherever it appears); what the constructors still
refuse is filtered out.

Invariants:

- every message encodes and decodes to an equal object, through the codec and
  through a ``Connection``, whole, split into chunks, or one byte at a time;
- whatever bytes a ``Connection`` is fed, it returns messages and ``Rejected``
  events or raises ``ProtocolError``, never anything else, and the outcome does
  not depend on how the bytes were split.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hanlb.flow import FlowKey
from hanlb.protocol.codec import MESSAGES, decode_body, encode_body, type_code
from hanlb.protocol.framing import (
    HEADER,
    MAGIC,
    VERSION,
    ErrorCode,
    FrameDecoder,
    ProtocolError,
    RawFrame,
    Rejected,
    encode_frame,
)
from hanlb.protocol.messages import Connection, Miss, Ping, Route
from hanlb.tracker.entry import flow_key, session_key
from hanlb.tracker.messages import ACK_ALL, ACK_NONE, ACK_ONE, BULK_BY

# Every message module, so every registered type is covered whatever ran before.
for _module in ("hanlb.tracker.messages", "hanlb.health.messages"):
    __import__(_module)

KEY = b"test cluster key 0123456789"
OTHER_KEY = b"some other cluster key 98765"

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies, built from the field types -------------------------------------

ipv4s = st.ip_addresses(v=4).map(str)
flow_keys = st.builds(
    FlowKey,
    proto=st.just(6),
    src=ipv4s,
    sport=st.integers(0, 65535),
    dst=ipv4s,
    dport=st.integers(1, 65535),
)
macs = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(
    lambda b: ":".join(f"{x:02x}" for x in b)
)

SCALARS: dict[type, st.SearchStrategy[Any]] = {
    int: st.integers(-(2**63), 2**64 - 1),  # what msgpack can carry
    float: st.floats(allow_nan=False),
    str: st.text(max_size=30),
    bytes: st.binary(max_size=40),
    bool: st.booleans(),
}
TYPES: dict[type, st.SearchStrategy[Any]] = {FlowKey: flow_keys}
FIELDS: dict[tuple[type, str], st.SearchStrategy[Any]] = {
    (Miss, "tcp_flags"): st.integers(0, 255),
    (Miss, "head"): st.binary(max_size=128),
    (Route, "mac"): macs,
}
tracker_keys = flow_keys.map(flow_key) | st.text(
    "abcdefghijklmnopqrstuvwxyz0123456789-_=", min_size=1, max_size=20
).map(lambda v: session_key("http-cookie", v))
fractions = st.floats(0.0, 1.0) | st.just(-1.0)
# Field names with invariants of their own, in whichever message they appear.
NAMED: dict[str, st.SearchStrategy[Any]] = {
    "key": tracker_keys,
    "keys": st.lists(tracker_keys, max_size=4),
    "by": st.sampled_from(sorted(BULK_BY)),
    "ack": st.sampled_from([ACK_NONE, ACK_ONE, ACK_ALL]),
    "digests": st.lists(st.integers(0, 2**64 - 1), min_size=64, max_size=64),
    "checksum": st.binary(min_size=16, max_size=16),
    "cpu": fractions,
    "app_load": fractions,
    "weight": st.integers(0, 1000),
    "tokens": st.integers(0, 1_000_000),
    "active_connections": st.integers(0, 2**32 - 1),
    "ns": st.integers(0, 2**63 - 1),
    "expires": st.floats(0.0, 1e10),
    "ttl": st.floats(0.0, 1e6),
    "app": st.text(min_size=1, max_size=20),
}


def _try_build(tp: type, kwargs: dict[str, Any]) -> Any:
    try:
        return tp(**kwargs)
    except (ValueError, TypeError):  # a combination the type's invariants refuse
        return None


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy for any field type the codec supports (see codec.py)."""
    if tp in TYPES:
        return TYPES[tp]
    if tp in SCALARS:
        return SCALARS[tp]
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return st.lists(strategy_for(inner), max_size=4)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return st.none() | strategy_for(inner)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            override = FIELDS.get((tp, f.name), NAMED.get(f.name))
            kwargs[f.name] = strategy_for(hints[f.name]) if override is None else override
        return (
            st.fixed_dictionaries(kwargs)
            .map(lambda kw, tp=tp: _try_build(tp, kw))
            .filter(lambda obj: obj is not None)
        )
    raise TypeError(f"no strategy for {tp!r}: add one to TYPES or FIELDS")


CODES = sorted(MESSAGES)
any_message = st.sampled_from(CODES).flatmap(lambda code: strategy_for(MESSAGES[code]))

# msgpack values of any shape, for bodies that are well-formed msgpack but
# not necessarily the right message.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=20,
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed(chunks: list[bytes]) -> tuple[list[Any], ErrorCode | None, Connection]:
    """Feed chunks to a fresh Connection until it raises; the events it handed
    back (as reprs, so NaN compares equal to itself) and the error code."""
    conn = Connection(KEY)
    events: list[Any] = []
    for chunk in chunks:
        try:
            out = conn.receive_data(chunk)
        except ProtocolError as exc:
            assert isinstance(exc.code, ErrorCode)
            return events, exc.code, conn
        # any other exception fails the test
        for ev in out:
            assert isinstance(ev, Rejected) or type(ev) in MESSAGES.values(), ev
        events.extend(out)
    if conn.failed is not None:  # an error after good frames is raised on the next call
        return events, conn.failed.code, conn
    return events, None, conn


def same(a: list[Any], b: list[Any]) -> bool:
    return [repr(x) for x in a] == [repr(x) for x in b]


# -- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("code", CODES, ids=[MESSAGES[c].__name__ for c in CODES])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_message_type_round_trips(code: int, data: st.DataObject) -> None:
    msg = data.draw(strategy_for(MESSAGES[code]))
    assert type_code(msg) == code
    body = encode_body(msg)
    assert decode_body(code, body) == msg
    a, b = Connection(KEY), Connection(KEY)
    wire = a.send(msg)
    assert b.receive_data(wire) == [msg]
    assert b.rejected == {}


@settings(max_examples=100, deadline=None)
@given(any_message, st.lists(st.integers(0, 10_000), max_size=8))
def test_round_trip_split_into_chunks(msg: Any, cuts: list[int]) -> None:
    wire = Connection(KEY).send(msg)
    conn = Connection(KEY)
    got: list[Any] = []
    for chunk in split(wire, cuts):
        got.extend(conn.receive_data(chunk))
    assert got == [msg]


@settings(max_examples=40, deadline=None)
@given(any_message)
def test_round_trip_one_byte_at_a_time(msg: Any) -> None:
    wire = Connection(KEY).send(msg)
    conn = Connection(KEY)
    got: list[Any] = []
    for i in range(len(wire)):
        out = conn.receive_data(wire[i : i + 1])
        assert out == [] or i == len(wire) - 1
        got.extend(out)
    assert got == [msg]


@settings(max_examples=100, deadline=None)
@given(st.lists(any_message, max_size=8), st.lists(st.integers(0, 100_000), max_size=10))
def test_several_frames_decode_in_order(msgs: list[Any], cuts: list[int]) -> None:
    sender = Connection(KEY)
    wire = b"".join(sender.send(m) for m in msgs)
    whole = Connection(KEY)
    assert whole.receive_data(wire) == msgs
    chunked = Connection(KEY)
    got: list[Any] = []
    for chunk in split(wire, cuts):
        got.extend(chunked.receive_data(chunk))
    assert got == msgs


@settings(max_examples=100, deadline=None)
@given(any_message)
def test_reencoding_is_stable(msg: Any) -> None:
    body = encode_body(msg)
    assert encode_body(decode_body(type_code(msg), body)) == body


# -- arbitrary bodies under a valid MAC -------------------------------------------


@FUZZ
@given(st.sampled_from(CODES), msgpack_values)
def test_arbitrary_msgpack_body_is_message_or_bad_body(code: int, value: Any) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    conn = Connection(KEY)
    (event,) = conn.receive_data(encode_frame(KEY, code, body))
    if isinstance(event, Rejected):
        assert event.code is ErrorCode.BAD_BODY
        assert conn.rejected == {ErrorCode.BAD_BODY: 1}
    else:
        assert type(event) is MESSAGES[code]
        # A decoded message encodes back to something that decodes the same.
        assert repr(decode_body(code, encode_body(event))) == repr(event)


@FUZZ
@given(any_message, st.data())
def test_one_field_replaced_is_message_or_bad_body(msg: Any, data: st.DataObject) -> None:
    fields = msgpack.unpackb(encode_body(msg))
    if fields:
        i = data.draw(st.integers(0, len(fields) - 1))
        fields[i] = data.draw(msgpack_values)
    body = msgpack.packb(fields, use_bin_type=True)
    (event,) = Connection(KEY).receive_data(encode_frame(KEY, type_code(msg), body))
    if isinstance(event, Rejected):
        assert event.code is ErrorCode.BAD_BODY
    else:
        assert type(event) is type(msg)


@FUZZ
@given(st.integers(0, 255), st.binary(max_size=64))
def test_arbitrary_body_bytes_under_valid_mac(code: int, body: bytes) -> None:
    conn = Connection(KEY)
    (event,) = conn.receive_data(encode_frame(KEY, code, body))
    if code not in MESSAGES:
        assert event.code is ErrorCode.BAD_TYPE
    elif isinstance(event, Rejected):
        assert event.code is ErrorCode.BAD_BODY
    else:
        assert type(event) is MESSAGES[code]


# -- arbitrary bytes on the wire ----------------------------------------------------


def _frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["good", "other key", "any type", "header", "noise"]))
    if kind == "good":
        return Connection(KEY).send(draw(any_message))
    if kind == "other key":
        return Connection(OTHER_KEY).send(draw(any_message))
    if kind == "any type":
        return encode_frame(KEY, draw(st.integers(0, 255)), draw(st.binary(max_size=40)))
    if kind == "header":
        return HEADER.pack(
            draw(st.sampled_from([MAGIC, b"HM", b"\x00\x00"])),
            draw(st.sampled_from([VERSION, 0, 2, 255])),
            draw(st.integers(0, 255)),
            draw(st.sampled_from([0, 1, 40, 2**23, 2**23 + 1, 2**32 - 1])),
        ) + draw(st.binary(max_size=40))
    return draw(st.binary(max_size=40))


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Mostly plausible streams: frames, forged frames, odd headers, noise,
    then a few bytes changed."""
    data = bytearray(b"".join(_frames(draw) for _ in range(draw(st.integers(1, 4)))))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= draw(st.integers(1, 255))
    return bytes(data)


def _check_any_bytes(data: bytes, cuts: list[int]) -> None:
    whole, whole_err, conn = feed([data])
    event(f"outcome: {whole_err.name if whole_err else 'clean'}")
    event(f"messages: {sum(not isinstance(e, Rejected) for e in whole) > 0}")
    if whole_err is None:
        assert sum(conn.rejected.values()) == sum(isinstance(e, Rejected) for e in whole)

    chunked, chunked_err, _ = feed(split(data, cuts))
    bytewise, bytewise_err, _ = feed([data[i : i + 1] for i in range(len(data))])
    assert chunked_err == whole_err
    assert bytewise_err == whole_err
    if whole_err is None:
        assert same(chunked, whole)
        assert same(bytewise, whole)
    else:
        # Events completed before the error may come out of earlier chunks;
        # they are always a prefix of what a byte-wise reader sees.
        assert same(chunked, bytewise[: len(chunked)])


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    _check_any_bytes(data, cuts)


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_arbitrary_bytes_after_valid_header_prefix(data: bytes, cuts: list[int]) -> None:
    _check_any_bytes(MAGIC + bytes([VERSION]) + data, cuts)


@FUZZ
@given(streams(), st.lists(st.integers(0, 2000), max_size=6))
def test_plausible_streams(data: bytes, cuts: list[int]) -> None:
    _check_any_bytes(data, cuts)


@FUZZ
@given(streams())
def test_frame_decoder_alone(data: bytes) -> None:
    dec = FrameDecoder(KEY)
    for i in range(len(data)):
        dec.receive_data(data[i : i + 1])
        try:
            while (frame := dec.next_frame()) is not None:
                assert isinstance(frame, RawFrame | Rejected)
                if isinstance(frame, Rejected):
                    assert frame.code is ErrorCode.BAD_MAC
        except ProtocolError as exc:
            assert exc.code in (ErrorCode.BAD_MAGIC, ErrorCode.BAD_VERSION, ErrorCode.TOO_LARGE)
            return


def test_nan_survives_the_round_trip() -> None:
    (got,) = Connection(KEY).receive_data(Connection(KEY).send(Ping(1, math.nan)))
    assert isinstance(got, Ping)
    assert math.isnan(got.sent)
