"""TrackerNode on its own: merge rules, liveness, hand-off, digests (no network)."""

from __future__ import annotations

from hanlb.protocol.messages import Ping, Pong
from hanlb.tracker.entry import Entry, Version
from hanlb.tracker.messages import (
    ACK_ALL,
    ACK_NONE,
    Delete,
    Digests,
    Insert,
    Query,
    QueryResult,
    Read,
    ReadReply,
    Replicate,
    ReplicateAck,
    WriteResult,
)
from hanlb.tracker.node import PeerDown, PeerUp, TrackerNode
from hanlb.tracker.placement import replicas

WALL = 1.8e9
KEY = "s|tls-session|abc"


def node(name: str = "t1", members: tuple[str, ...] = ("t1",), replication: int = 2) -> TrackerNode:
    return TrackerNode(
        name, members, now=0.0, replication=replication, liveness_interval=0.05, liveness_misses=3
    )


def entry(version: int, host: str = "h1", deleted: bool = False) -> Entry:
    return Entry(KEY, host, "", WALL + 100, Version(version, "t9"), deleted)


def query(n: TrackerNode, key: str = KEY) -> list[Entry]:
    n.on_message("c#1", Query(5, [key]), 0.0, WALL)
    (dest, msg), *_ = n.messages()
    assert dest == "c#1" and isinstance(msg, QueryResult)
    return msg.entries


def test_single_node_insert_query_delete() -> None:
    n = node()
    n.on_message("c#1", Insert(1, [Entry(KEY, "h1")], ACK_ALL), 0.0, WALL)
    assert n.messages() == [("c#1", WriteResult(1, []))]
    stored = n.entries[KEY]
    assert stored.version.node == "t1" and stored.expires == WALL + n.session_ttl
    assert [e.host for e in query(n)] == ["h1"]
    n.on_message("c#1", Delete(2, [KEY], ACK_NONE), 0.0, WALL)
    assert n.messages() == []
    assert n.entries[KEY].deleted and query(n) == []


def test_last_writer_wins_and_tombstones_beat_older_writes() -> None:
    n = node(members=("t1", "t2"), replication=2)
    n.on_message("t2", Replicate(0, [entry(5, "h2")]), 0.0, WALL)
    n.on_message("t2", Replicate(0, [entry(3, "h3")]), 0.0, WALL)  # older: ignored
    assert n.entries[KEY].host == "h2"
    n.on_message("t2", Replicate(0, [entry(6, deleted=True)]), 0.0, WALL)
    n.on_message("t2", Replicate(7, [entry(5, "h2")]), 0.0, WALL)  # duplicate, late
    assert n.entries[KEY].deleted
    assert ("t2", ReplicateAck(7)) in n.messages()
    # A local tombstone is not an answer: the other replica is asked, and the
    # newest version (the tombstone again) wins over its older entry.
    n.on_message("c#1", Query(5, [KEY]), 0.0, WALL)
    [(dest, read)] = n.messages()
    assert dest == "t2" and isinstance(read, Read) and read.keys == [KEY]
    n.on_message("t2", ReadReply(read.op_id, [entry(5, "h2")]), 0.0, WALL)
    out = n.messages()
    assert out[0] == ("c#1", QueryResult(5, []))
    assert out[1] == ("t2", Replicate(0, [n.entries[KEY]]))  # read repair


def test_tombstones_outlive_what_they_delete() -> None:
    n = node()
    n.on_message("c#1", Insert(1, [Entry(KEY, "h1", "", WALL + 10_000)], ACK_NONE), 0.0, WALL)
    n.on_message("c#1", Delete(2, [KEY], ACK_NONE), 0.0, WALL)
    assert n.entries[KEY].expires == WALL + 10_000


def test_expired_entries_are_purged_and_not_merged() -> None:
    n = node(members=("t1", "t2"))
    n.on_message("t2", Replicate(0, [entry(1)]), 0.0, WALL)
    n.on_message(
        "t2", Replicate(0, [Entry("s|x|old", "h", "", WALL - 1, Version(1, "t2"))]), 0, WALL
    )
    assert list(n.entries) == [KEY]
    n.handle_timer(0.05, WALL + 101)
    assert n.entries == {} and n.counters["purged"] == 1


def test_liveness_down_after_misses_and_up_on_any_message() -> None:
    n = node(members=("t1", "t2"))
    t = 0.0
    events = []
    while t < 0.3:
        n.handle_timer(t, WALL)
        assert ("t2", Ping(n._ping_seq, t)) in n.messages()
        while (ev := n.next_event()) is not None:
            events.append((round(t, 2), ev))
        t = n.get_timer()
    assert events == [(0.2, PeerDown("t2"))]
    n.on_message("t2", Pong(1, 0.0), 0.31, WALL)
    assert n.next_event() == PeerUp("t2") and n.live == {"t1", "t2"}


def test_a_stalled_node_does_not_declare_everyone_dead() -> None:
    n = node(members=("t1", "t2", "t3"))
    n.handle_timer(0.0, WALL)
    n.handle_timer(10.0, WALL)  # nothing ran for 10 s: our fault, not theirs
    assert n.live == {"t1", "t2", "t3"} and n.next_event() is None


def test_handoff_drops_an_entry_once_every_replica_acknowledged() -> None:
    members = ("t1", "t2", "t3")
    key = next(f"s|x|{i}" for i in range(100) if "t1" not in replicas(f"s|x|{i}", members, 2))
    n = node(members=members, replication=2)
    e = Entry(key, "h1", "", WALL + 100, Version(1, "t2"))
    n.on_message("t2", Replicate(0, [e]), 0.0, WALL)
    n.messages()
    n.handle_timer(n.anti_entropy_interval, WALL)
    handoffs = [(d, m) for d, m in n.messages() if isinstance(m, Replicate) and m.op_id]
    assert sorted(d for d, _ in handoffs) == sorted(replicas(key, members, 2))
    for dest, msg in handoffs:
        assert key in n.entries
        assert isinstance(msg, Replicate)
        n.on_message(dest, ReplicateAck(msg.op_id), 1.0, WALL)
    assert key not in n.entries and n.counters["handed_off"] == 1


def test_equal_tables_have_equal_digests_and_differences_are_pushed() -> None:
    members = ("t1", "t2")
    a = node("t1", members, replication=2)
    b = node("t2", members, replication=2)
    es = [Entry(f"s|x|{i}", "h", "", WALL + 100, Version(i + 1, "t1")) for i in range(50)]
    for n in (a, b):
        n.on_message("t1" if n is b else "t2", Replicate(0, es), 0.0, WALL)
    assert a.digests()["t2"] == b.digests()["t1"]
    b.on_message(
        "t1", Replicate(0, [Entry("s|x|new", "h", "", WALL + 100, Version(99, "t1"))]), 0, WALL
    )
    b.messages()
    a.on_message("t2", Digests(b.digests()["t1"]), 0.0, WALL)
    assert a.messages() == []  # a has nothing b lacks in that bucket... b pushes to a:
    b.on_message("t1", Digests(a.digests()["t2"]), 0.0, WALL)
    pushed = [m for _, m in b.messages() if isinstance(m, Replicate)]
    assert any(e.key == "s|x|new" for m in pushed for e in m.entries)
    for m in pushed:
        a.on_message("t2", m, 0.0, WALL)
    assert a.digests()["t2"] == b.digests()["t1"]


def test_peer_messages_from_clients_are_refused() -> None:
    n = node(members=("t1", "t2"))
    n.on_message("c#1", Replicate(0, [entry(1)]), 0.0, WALL)
    assert n.entries == {} and n.counters["messages_unexpected"] == 1


def test_unacknowledged_deletes_keep_no_state_in_the_client() -> None:
    from hanlb.tracker.client import TrackerClientCore
    from hanlb.tracker.messages import ACK_NONE, Delete

    client = TrackerClientCore(["tr1", "tr2"], timeout=1.0, suspect_for=1.0)
    client.node_up("tr1", 0.0)
    client.node_up("tr2", 0.0)
    client.delete(["f|6|10.0.0.1|1000|10.93.0.1|80"], ACK_NONE, now=0.0)
    out = client.messages()
    assert len(out) == 1 and isinstance(out[0][1], Delete) and out[0][1].ack == ACK_NONE
    assert not client._ops  # nothing waits for an answer that never comes
