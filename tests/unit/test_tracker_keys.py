"""Tracker keys, entries and messages on the wire."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hanlb.flow import FlowKey
from hanlb.protocol.codec import decode_body, encode_body, type_code
from hanlb.protocol.framing import ErrorCode, ProtocolError
from hanlb.tracker.entry import Entry, SessionKey, Version, flow_key, parse_key, session_key
from hanlb.tracker.messages import (
    ACK_ALL,
    BulkQuery,
    Delete,
    Digests,
    Insert,
    QueryConnection,
    Replicate,
)
from hanlb.tracker.placement import BUCKETS


def test_flow_keys_round_trip() -> None:
    flow = FlowKey(6, "10.91.1.2", 40000, "10.93.0.1", 80)
    assert flow_key(flow) == "f|6|10.91.1.2|40000|10.93.0.1|80"
    assert parse_key(flow_key(flow)) == flow


@given(st.text(max_size=200))
def test_session_keys_round_trip_whatever_the_value(value: str) -> None:
    key = session_key("http-cookie", value)
    assert parse_key(key) == SessionKey("http-cookie", value)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "x|1",
        "f|6|10.91.1.2|40000|10.93.0.1",
        "f|6|10.91.1.2|040000|10.93.0.1|80",
        "f|17|10.91.1.2|40000|10.93.0.1|80",
        "f|6|10.91.1.300|1|10.93.0.1|80",
        "s|",
        "s|Bad Kind|x",
    ],
)
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(ValueError):
        parse_key(key)


def test_bad_session_kinds_are_refused() -> None:
    with pytest.raises(ValueError):
        session_key("tls|session", "x")
    with pytest.raises(ValueError):
        session_key("tls-session", "x" * 600)


def test_versions_order_by_time_then_node() -> None:
    assert Version(1, "b") < Version(2, "a") < Version(2, "b")


def test_messages_round_trip() -> None:
    e = Entry("s|tls-session|abc", "h1", "", 1.8e9, Version(5, "t1"))
    msgs = [
        Insert(7, [e], ACK_ALL),
        Replicate(3, [e, e.tombstone(Version(6, "t2"), 1.9e9)]),
        QueryConnection(1, FlowKey(6, "10.91.1.2", 1, "10.93.0.1", 80)),
        BulkQuery(2, "host", "h1"),
        Digests([i * 2**57 for i in range(BUCKETS)]),
    ]
    for msg in msgs:
        assert 64 <= type_code(msg) <= 95
        assert decode_body(type_code(msg), encode_body(msg)) == msg


@pytest.mark.parametrize(
    ("code", "fields"),
    [
        (64, [1, [["nokey", "h", "", 0.0, [0, ""], False]], 2]),
        (64, [1, [["f|x", "h", "", 0.0, [0, ""], True]], 2]),  # insert of a tombstone
        (64, [1, [], 9]),  # unknown ack level
        (65, [1, ["s|a|b"], -1]),
        (70, [1, "nobody", ""]),
        (86, [[0] * 3]),
        (86, [[-1] * BUCKETS]),
        (80, [1, [["f|x", "h", "", float("nan"), [0, ""], False]]]),
    ],
)
def test_malformed_tracker_messages_are_bad_bodies(code: int, fields: list[object]) -> None:
    import msgpack

    with pytest.raises(ProtocolError) as info:
        decode_body(code, msgpack.packb(fields))
    assert info.value.code == ErrorCode.BAD_BODY


def test_delete_validates_keys() -> None:
    with pytest.raises(ValueError):
        Delete(1, [""], ACK_ALL)
