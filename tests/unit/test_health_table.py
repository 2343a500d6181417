"""The health/load table, its checksums, and the health messages' codec."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hanlb.health.messages import (
    GetTableSnapshot,
    Heartbeat,
    PortionSum,
    RequestAllotment,
    SendTableSnapshot,
    Subscribe,
    TableRow,
    TokenAllotment,
    TokenEntry,
)
from hanlb.health.table import HealthTable, make_row, portion_checksum, table_checksum
from hanlb.protocol.codec import decode_body, encode_body, type_code
from hanlb.protocol.framing import ProtocolError
from hanlb.protocol.messages import Connection


def test_equal_tables_have_equal_checksums_whatever_their_history() -> None:
    a = HealthTable()
    a.put(make_row("web", True, 3, 0.25, -1, 2))
    a.put(make_row("api", False))
    b = HealthTable()
    b.put(make_row("api", True))
    b.put(make_row("api", False))
    b.put(make_row("web", True, 3, 0.25, -1, 2))
    assert a.version == 2 and b.version == 3
    assert a.checksum() == b.checksum()
    assert a.portion_sums() == b.portion_sums()
    assert a.checksum() == table_checksum(reversed(b.rows()))


def test_version_grows_on_every_change_and_only_then() -> None:
    t = HealthTable()
    assert t.put(make_row("web", True))
    assert not t.put(make_row("web", True))
    assert t.version == 1
    before = t.checksum()
    assert t.put(make_row("web", True, active_connections=1))
    assert t.version == 2 and t.checksum() != before
    assert t.remove("web") and not t.remove("web")
    assert t.version == 3 and t.checksum() == HealthTable().checksum()


def test_portion_checksums_change_only_for_the_changed_row() -> None:
    t = HealthTable([make_row("a", True), make_row("b", True), make_row("c", True)])
    sums = t.portion_sums()
    t.put(make_row("b", True, cpu=0.5))
    new = {s.portion: s.checksum for s in t.portion_sums()}
    assert [s.portion for s in sums if new[s.portion] != s.checksum] == ["b"]
    assert t.differing(sums) == ["b"]
    assert t.differing([*sums, PortionSum("d", bytes(16))]) == ["b", "d"]
    assert t.differing(sums[:1]) == ["b", "c"]


def test_make_row_quantizes_and_clamps() -> None:
    r = make_row("web", True, -5, 1.7, 0.12345, 3)
    assert (r.active_connections, r.cpu, r.app_load) == (0, 1.0, 0.123)
    assert make_row("web", True, app_load=-0.2).app_load == -1.0
    # an int where a float goes encodes the same as the float
    assert portion_checksum(TableRow("w", True, 0, 0, -1, 1)) == portion_checksum(
        TableRow("w", True, 0, 0.0, -1.0, 1)
    )


def test_apply_whole_drops_missing_rows_partial_keeps_them() -> None:
    t = HealthTable([make_row("a", True), make_row("b", True)])
    changed = t.apply([make_row("b", False)], version=7, whole=False)
    assert changed == {"b"} and t.version == 7 and "a" in t
    changed = t.apply([make_row("c", True)], version=9, whole=True)
    assert changed == {"a", "b", "c"} and [r.app for r in t.rows()] == ["c"]


def test_snapshot_selects_portions() -> None:
    t = HealthTable([make_row("a", True), make_row("b", False)])
    assert [r.app for r in t.snapshot([])] == ["a", "b"]
    assert [r.app for r in t.snapshot(["b", "zz"])] == ["b"]


ROW = make_row("web", True, 12, 0.5, 0.25, 3)
MESSAGES = [
    Heartbeat("h1", 4, bytes(16), [PortionSum("web", bytes(range(16)))]),
    GetTableSnapshot(7, ["web"]),
    SendTableSnapshot(7, "h1", 4, [ROW]),
    Subscribe("cl1", []),
    RequestAllotment("web", 3),
    TokenAllotment("web", 3, [TokenEntry("h1", 500), TokenEntry("h2", 500)], 5.0, "hl1"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_round_trip_with_codes_96_to_127(msg: object) -> None:
    assert 96 <= type_code(msg) <= 127
    assert decode_body(type_code(msg), encode_body(msg)) == msg
    conn = Connection(b"k" * 32)
    assert conn.receive_data(conn.send(msg)) == [msg]


def test_bad_rows_are_refused_as_protocol_errors() -> None:
    bad = encode_body(SendTableSnapshot(1, "h1", 1, [ROW])).replace(b"\xcb?\xe0", b"\xcb@\x10")
    with pytest.raises(ProtocolError):
        decode_body(98, bad)  # cpu 4.0 is out of range
    with pytest.raises(ValueError):
        TableRow("web", True, 0, 0.0, 2.0, 1)
    with pytest.raises(ValueError):
        Heartbeat("h1", 0, b"short", [])


@given(st.binary(max_size=200))
def test_decoders_never_raise_anything_but_protocol_errors(data: bytes) -> None:
    for code in range(96, 102):
        with contextlib.suppress(ProtocolError):
            decode_body(code, data)
