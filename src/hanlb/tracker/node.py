"""A tracker node's logic, without I/O: the distributed, replicated session table.

Driven by three inputs and read through three outputs (aioquic style)::

    node.on_message(src, msg, now, wall)   # a message from a peer node or a client
    node.on_peer_hello(peer, incarnation, now, wall)
    node.handle_timer(now, wall)           # when now >= node.get_timer()
    node.messages()                        # [(destination, message)] to send
    node.next_event()                      # PeerUp, PeerDown, EntriesPurged, ...

``now`` is monotonic (timers); ``wall`` is epoch seconds (expiry and versions).
``src`` and destinations are member names for peers and any other string (the
shell's connection name) for clients.

Placement: the ``replication`` best members of a key by rendezvous hashing over
the members this node believes *live* (``placement.py``).

Writes (``Insert``, ``Delete``): the node that receives the request
coordinates. It stamps every entry with a new version ``(wall ns, its name)``,
applies it if it is a replica, and sends ``Replicate`` to the other live
replicas, resending once at half the operation timeout. The client chooses when
it is answered (``ack``): ACK_ONE once one replica applied each key (at once
when the coordinator is a replica, which it is when the client sent the request
to the primary), ACK_ALL once every live replica did; a replica declared dead
meanwhile no longer counts. ACK_NONE gets no answer.

Reads (``Query``, ``QueryConnection``): a coordinator that is a replica and
holds a live entry answers from it. Otherwise it asks the other live replicas;
a key is answered by the first live entry any replica returns, or, when every
replica answered without one, as a miss. Replicas seen holding an older
version (or nothing) get the newest one afterwards (read repair).

Membership: every peer is pinged every ``liveness_interval``; any message from
it counts as a sign of life; ``liveness_misses`` intervals without one and it
is declared dead (``PeerDown``), the first message after that and it is alive
again (``PeerUp``). A node whose own timers stalled (a paused process) gives its
peers a fresh grace period instead of declaring them all dead.

Repair: on every membership change, each node pushes the entries it is a
replica of to the members that have just become their replicas; entries it is
no longer a replica of are handed off (pushed with acknowledgement, then
dropped once every replica acknowledged). Anti-entropy: every
``anti_entropy_interval`` each node sends every live peer per-bucket digests of
the entries both should hold; the peer answers each differing bucket with its
entries. Merging is last writer wins by version, so lost, duplicated and
reordered messages converge. Tombstones live until the later of their own
expiry (``tombstone_ttl``) and that of the entry they replaced. Expired entries
are purged and never merged.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

from ..config import ClusterConfig
from ..protocol.messages import Ping, Pong
from .entry import Entry, Version, flow_key, is_flow_key
from .messages import (
    ACK_ALL,
    ACK_NONE,
    BulkQuery,
    BulkResult,
    BulkScan,
    BulkScanReply,
    Delete,
    Digests,
    Insert,
    Query,
    QueryConnection,
    QueryResult,
    Read,
    ReadReply,
    Replicate,
    ReplicateAck,
    WriteResult,
)
from .placement import BUCKETS, bucket_of, replicas

__all__ = [
    "CHUNK",
    "EntriesPurged",
    "HandedOff",
    "PeerDown",
    "PeerUp",
    "TrackerEvent",
    "TrackerNode",
    "matches",
]

CHUNK = 1000
"""Entries per Replicate, BulkResult or BulkScanReply message."""


# -- events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerUp:
    name: str


@dataclass(frozen=True, slots=True)
class PeerDown:
    name: str


@dataclass(frozen=True, slots=True)
class EntriesPurged:
    count: int


@dataclass(frozen=True, slots=True)
class HandedOff:
    """Entries this node is no longer a replica of were taken over and dropped."""

    count: int


TrackerEvent = PeerUp | PeerDown | EntriesPurged | HandedOff


def matches(entry: Entry, by: str, value: str) -> bool:
    if by == "host":
        return entry.host == value
    if by == "forwarder":
        return entry.forwarder == value
    return True


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _vhash(key: str, version: Version) -> int:
    data = f"{key}\0{version.ns}\0{version.node}".encode()
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


# -- pending operations ---------------------------------------------------------


@dataclass(slots=True)
class _Write:
    client: str
    req_id: int
    ack: int
    need: dict[str, int]
    """Key -> acknowledgements still needed for the ack level."""
    sent: dict[str, list[Entry]]
    """Replica -> entries it has not acknowledged yet."""
    replied: bool = False


@dataclass(slots=True)
class _Read:
    client: str
    req_id: int
    found: dict[str, Entry]
    best: dict[str, Entry] = field(default_factory=dict)
    waiting: dict[str, set[str]] = field(default_factory=dict)
    """Unresolved key -> replicas that have not answered."""
    sent: dict[str, list[str]] = field(default_factory=dict)
    """Replica -> keys asked and not answered yet."""
    held: dict[str, dict[str, Version | None]] = field(default_factory=dict)
    """Key -> replica -> the version it answered with (None: not held), for read repair."""
    replied: bool = False


@dataclass(slots=True)
class _Bulk:
    client: str
    req_id: int
    by: str
    value: str
    merged: dict[str, Entry]
    waiting: set[str]


@dataclass(slots=True)
class _Handoff:
    dest: str
    versions: list[tuple[str, Version]]


# -- the node ------------------------------------------------------------------------


class TrackerNode:
    def __init__(
        self,
        name: str,
        members: Iterable[str],
        *,
        now: float,
        replication: int = 2,
        liveness_interval: float = 0.05,
        liveness_misses: int = 3,
        anti_entropy_interval: float = 1.0,
        flow_ttl: float = 3600.0,
        session_ttl: float = 3600.0,
        op_timeout: float | None = None,
        tombstone_ttl: float | None = None,
    ) -> None:
        self.name = name
        self.members = sorted(set(members) | {name})
        self.peers = [m for m in self.members if m != name]
        self.replication = replication
        self.liveness_interval = liveness_interval
        self.dead_after = liveness_interval * liveness_misses
        self.anti_entropy_interval = anti_entropy_interval
        self.flow_ttl = flow_ttl
        self.session_ttl = session_ttl
        self.op_timeout = op_timeout if op_timeout is not None else 2 * self.dead_after + 0.1
        self.tombstone_ttl = (
            tombstone_ttl if tombstone_ttl is not None else max(60.0, 10 * anti_entropy_interval)
        )

        self.entries: dict[str, Entry] = {}
        self.counters: Counter[str] = Counter()
        # Every member is assumed alive at start, so a cluster that starts together
        # places keys alike at once; a member that never answers is declared dead.
        self.live: set[str] = set(self.members)
        self._live_sorted = list(self.members)
        self.last_heard: dict[str, float] = {p: now for p in self.peers}
        self.incarnations: dict[str, int] = {}

        self._meta: dict[str, tuple[int, int]] = {}
        """Key -> (bucket, hash of key and version), for digests."""
        self._expiry: list[tuple[float, str]] = []
        self._placement: dict[str, tuple[str, ...]] = {}
        self._out: list[tuple[str, object]] = []
        self._events: deque[TrackerEvent] = deque()
        self._ids = itertools.count(1)
        self._ping_seq = 0
        self._last_ns = 0
        self._next_ping = now
        self._next_ae = now + anti_entropy_interval
        self._last_tick = now

        self._writes: dict[int, _Write] = {}
        self._reads: dict[int, _Read] = {}
        self._bulks: dict[int, _Bulk] = {}
        self._handoffs: dict[int, _Handoff] = {}
        self._handoff_due: dict[str, float] = {}
        self._handoff_acks: dict[str, set[str]] = {}
        self._timers: list[tuple[float, int, bool]] = []
        """(when, op id, is the deadline): resends at half the timeout, then the end."""

        self._dispatch: dict[type, Callable[[str, Any, float, float], None]] = {
            Ping: self._on_ping,
            Pong: self._on_pong,
            Insert: self._on_insert,
            Delete: self._on_delete,
            Query: self._on_query,
            QueryConnection: self._on_query_connection,
            BulkQuery: self._on_bulk_query,
        }
        self._peer_dispatch: dict[type, Callable[[str, Any, float, float], None]] = {
            Replicate: self._on_replicate,
            ReplicateAck: self._on_replicate_ack,
            Read: self._on_read,
            ReadReply: self._on_read_reply,
            BulkScan: self._on_bulk_scan,
            BulkScanReply: self._on_bulk_scan_reply,
            Digests: self._on_digests,
        }

    @classmethod
    def from_config(cls, config: ClusterConfig, name: str, now: float) -> TrackerNode:
        t, tr = config.timers, config.tracker
        members = [n.name for n in config.trackers]
        if name not in members:
            raise KeyError(f"no tracker named {name!r}")
        return cls(
            name,
            members,
            now=now,
            replication=tr.replication,
            liveness_interval=t.liveness_interval,
            liveness_misses=t.liveness_misses,
            anti_entropy_interval=tr.anti_entropy_interval,
            flow_ttl=tr.flow_ttl,
            session_ttl=tr.session_ttl,
        )

    # -- outputs ---------------------------------------------------------------------

    def messages(self) -> list[tuple[str, object]]:
        """Everything to send since the last call, in order: ``(destination, message)``."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> TrackerEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float:
        when = min(self._next_ping, self._next_ae)
        if self._timers:
            when = min(when, self._timers[0][0])
        return when

    # -- queries on the local state ----------------------------------------------------

    def replicas_of(self, key: str) -> tuple[str, ...]:
        """The key's replicas among the members this node believes live."""
        reps = self._placement.get(key)
        if reps is None:
            if len(self._placement) > 4 * len(self.entries) + 100_000:
                self._placement.clear()
            reps = tuple(replicas(key, self._live_sorted, self.replication))
            self._placement[key] = reps
        return reps

    def live_entries(self, wall: float) -> list[Entry]:
        return [e for e in self.entries.values() if e.live(wall)]

    def status(self, now: float) -> dict[str, object]:
        tombstones = sum(1 for e in self.entries.values() if e.deleted)
        return {
            "name": self.name,
            "replication": self.replication,
            "members": {
                m: {
                    "alive": m in self.live,
                    "last_heard_ago": None
                    if m == self.name
                    else round(now - self.last_heard[m], 3),
                }
                for m in self.members
            },
            "entries": len(self.entries) - tombstones,
            "tombstones": tombstones,
            "pending_ops": len(self._writes) + len(self._reads) + len(self._bulks),
            "counters": dict(self.counters),
        }

    # -- inputs ------------------------------------------------------------------------

    def on_message(self, src: str, msg: object, now: float, wall: float) -> None:
        is_peer = src in self.last_heard
        if is_peer:
            self._heard(src, now, wall)
        handler = self._dispatch.get(type(msg))
        if handler is None and is_peer:
            handler = self._peer_dispatch.get(type(msg))
        if handler is None:
            self.counters["messages_unexpected"] += 1
            return
        handler(src, msg, now, wall)

    def on_peer_hello(self, peer: str, incarnation: int, now: float, wall: float) -> None:
        """A peer (re)connected. A new incarnation means it restarted, maybe empty:
        it gets every entry it should share with this node at once."""
        if peer not in self.last_heard:
            self.counters["hello_from_stranger"] += 1
            return
        known = self.incarnations.get(peer)
        self.incarnations[peer] = incarnation
        self._heard(peer, now, wall)
        if known is not None and known != incarnation:
            self.counters["peer_restarts"] += 1
            self._push_shared(peer, wall)

    def handle_timer(self, now: float, wall: float) -> None:
        if now - self._last_tick > 2 * self.dead_after:
            # Our own timers stalled (paused, overloaded): silence was ours.
            for p in self.peers:
                self.last_heard[p] = max(self.last_heard[p], now)
            self.counters["stalls"] += 1
        self._last_tick = now
        if now >= self._next_ping:
            self._next_ping = now + self.liveness_interval
            self._ping_peers(now, wall)
        self._purge(wall)
        while self._timers and self._timers[0][0] <= now:
            _, op_id, final = heapq.heappop(self._timers)
            self._op_timer(op_id, final, now, wall)
        if now >= self._next_ae:
            self._next_ae = now + self.anti_entropy_interval
            self._send_digests()
            self._handoff(now)

    # -- liveness and membership ------------------------------------------------------------

    def _on_ping(self, src: str, msg: Ping, now: float, wall: float) -> None:
        self._out.append((src, Pong(msg.seq, msg.sent)))

    def _on_pong(self, src: str, msg: Pong, now: float, wall: float) -> None:
        pass

    def _heard(self, peer: str, now: float, wall: float) -> None:
        self.last_heard[peer] = now
        if peer not in self.live:
            self._events.append(PeerUp(peer))
            self.counters["peers_up"] += 1
            self._set_live(self.live | {peer}, now, wall)

    def _ping_peers(self, now: float, wall: float) -> None:
        self._ping_seq += 1
        dead = set()
        for p in self.peers:
            self._out.append((p, Ping(self._ping_seq, now)))
            if p in self.live and now - self.last_heard[p] > self.dead_after:
                dead.add(p)
        if dead:
            for p in sorted(dead):
                self._events.append(PeerDown(p))
                self.counters["peers_down"] += 1
            self._set_live(self.live - dead, now, wall)

    def _set_live(self, live: set[str], now: float, wall: float) -> None:
        old = self._live_sorted
        self.live = live
        self._live_sorted = sorted(live)
        self._placement.clear()
        self._handoff_due.clear()
        self._handoff_acks.clear()
        self.counters["membership_changes"] += 1
        self._forget_dead_in_ops(now, wall)
        # Repair: entries this node is a replica of go to their new replicas.
        pushes: dict[str, list[Entry]] = {}
        for key, e in self.entries.items():
            if e.expires <= wall:
                continue
            new = self.replicas_of(key)
            if self.name not in new:
                continue
            before = replicas(key, old, self.replication)
            for d in new:
                if d != self.name and d not in before:
                    pushes.setdefault(d, []).append(e)
        for dest, es in pushes.items():
            self.counters["repair_pushed"] += len(es)
            self._push(dest, es)
        self._handoff(now)

    def _forget_dead_in_ops(self, now: float, wall: float) -> None:
        for op_id, w in list(self._writes.items()):
            for dest in [d for d in w.sent if d not in self.live]:
                for e in w.sent.pop(dest):
                    w.need[e.key] -= 1
            self._check_write(op_id, w)
        for op_id, r in list(self._reads.items()):
            for dest in [d for d in r.sent if d not in self.live]:
                del r.sent[dest]
            for key in list(r.waiting):
                r.waiting[key] &= self.live
                if not r.waiting[key]:
                    # Every replica asked is gone: ask the new ones not asked yet.
                    # (A replica already asked other keys is skipped: its answer
                    # could not tell this key's absence from not being asked.)
                    fresh = [
                        d
                        for d in self.replicas_of(key)
                        if d != self.name and d not in r.held.get(key, {}) and d not in r.sent
                    ]
                    for d in fresh:
                        r.waiting[key].add(d)
                        r.sent[d] = [key]
                        self._out.append((d, Read(op_id, [key])))
                    if not r.waiting[key]:
                        self._resolve(r, key, wall)
            self._check_read(op_id, r, wall)

    # -- storage ------------------------------------------------------------------------

    def _merge(self, e: Entry, wall: float) -> bool:
        """Last writer wins. True if ``e`` is now the stored entry."""
        if e.expires <= wall:
            return False
        cur = self.entries.get(e.key)
        if cur is not None:
            if cur.version >= e.version:
                return False
            if e.deleted and cur.expires > e.expires:
                # A tombstone must outlive what it deletes, or a stale copy could return.
                e = e.stamped(e.version, cur.expires)
        key = e.key
        self.entries[key] = e
        meta = self._meta.get(key)
        self._meta[key] = (meta[0] if meta else bucket_of(key), _vhash(key, e.version))
        heapq.heappush(self._expiry, (e.expires, key))
        return True

    def _drop(self, key: str) -> None:
        del self.entries[key]
        self._meta.pop(key, None)
        self._handoff_due.pop(key, None)
        self._handoff_acks.pop(key, None)

    def _purge(self, wall: float) -> None:
        n = 0
        while self._expiry and self._expiry[0][0] <= wall:
            _, key = heapq.heappop(self._expiry)
            e = self.entries.get(key)
            if e is not None and e.expires <= wall:
                self._drop(key)
                n += 1
        if n:
            self.counters["purged"] += n
            self._events.append(EntriesPurged(n))

    def _stamp(self, wall: float) -> Version:
        ns = max(int(wall * 1e9), self._last_ns + 1)
        self._last_ns = ns
        return Version(ns, self.name)

    def _push(self, dest: str, entries: Sequence[Entry], op_id: int = 0) -> None:
        for chunk in _chunks(entries):
            self._out.append((dest, Replicate(op_id, list(chunk))))

    def _arm(self, op_id: int, now: float) -> None:
        heapq.heappush(self._timers, (now + self.op_timeout / 2, op_id, False))
        heapq.heappush(self._timers, (now + self.op_timeout, op_id, True))

    def _op_timer(self, op_id: int, final: bool, now: float, wall: float) -> None:
        w = self._writes.get(op_id)
        if w is not None:
            if not final:
                for dest, es in w.sent.items():
                    self.counters["replicate_resent"] += 1
                    self._push(dest, es, op_id)
                return
            del self._writes[op_id]
            self.counters["write_timeouts"] += 1
            self._reply_write(w)
            return
        r = self._reads.get(op_id)
        if r is not None:
            if not final:
                for dest, keys in r.sent.items():
                    self.counters["read_resent"] += 1
                    self._out.append((dest, Read(op_id, list(keys))))
                return
            self.counters["read_timeouts"] += 1
            for key in list(r.waiting):
                self._resolve(r, key, wall)
            self._finish_read(op_id, r, wall)
            return
        b = self._bulks.get(op_id)
        if b is not None:
            if not final:
                for dest in b.waiting:
                    self._out.append((dest, BulkScan(op_id, b.by, b.value)))
                return
            self.counters["bulk_timeouts"] += 1
            self._finish_bulk(op_id, b, wall)
            return
        if final:
            self._handoffs.pop(op_id, None)

    # -- writes ---------------------------------------------------------------------------

    def _ttl(self, key: str) -> float:
        return self.flow_ttl if is_flow_key(key) else self.session_ttl

    def _on_insert(self, src: str, msg: Insert, now: float, wall: float) -> None:
        self.counters["client_inserts"] += len(msg.entries)
        stamped = [
            e.stamped(self._stamp(wall), e.expires or wall + self._ttl(e.key)) for e in msg.entries
        ]
        self._coordinate_write(src, msg.req_id, msg.ack, stamped, now, wall)

    def _on_delete(self, src: str, msg: Delete, now: float, wall: float) -> None:
        self.counters["client_deletes"] += len(msg.keys)
        tombs = []
        for key in msg.keys:
            cur = self.entries.get(key) or Entry(key, "")
            expires = max(wall + self.tombstone_ttl, cur.expires)
            tombs.append(cur.tombstone(self._stamp(wall), expires))
        self._coordinate_write(src, msg.req_id, msg.ack, tombs, now, wall)

    def _coordinate_write(
        self, client: str, req_id: int, ack: int, entries: list[Entry], now: float, wall: float
    ) -> None:
        need: dict[str, int] = {}
        sent: dict[str, list[Entry]] = {}
        for e in entries:
            reps = self.replicas_of(e.key)
            needed = len(reps) if ack == ACK_ALL else 1
            if self.name in reps:
                self._merge(e, wall)
                needed -= 1
            need[e.key] = needed
            for d in reps:
                if d != self.name:
                    sent.setdefault(d, []).append(e)
        w = _Write(client, req_id, ack, need, sent)
        if not sent:
            self._reply_write(w)
            return
        op_id = next(self._ids)
        self._writes[op_id] = w
        self._arm(op_id, now)
        for dest, es in sent.items():
            self._push(dest, es, op_id)
        self._check_write(op_id, w)

    def _check_write(self, op_id: int, w: _Write) -> None:
        if not w.replied and all(n <= 0 for n in w.need.values()):
            self._reply_write(w)
        if not w.sent:
            self._writes.pop(op_id, None)

    def _reply_write(self, w: _Write) -> None:
        if w.replied:
            return
        w.replied = True
        if w.ack != ACK_NONE:
            failed = [k for k, n in w.need.items() if n > 0]
            self.counters["write_failed_keys"] += len(failed)
            self._out.append((w.client, WriteResult(w.req_id, failed)))

    def _on_replicate(self, src: str, msg: Replicate, now: float, wall: float) -> None:
        applied = sum(self._merge(e, wall) for e in msg.entries)
        self.counters["replicated_in"] += len(msg.entries)
        self.counters["replicated_applied"] += applied
        if msg.op_id:
            self._out.append((src, ReplicateAck(msg.op_id)))

    def _on_replicate_ack(self, src: str, msg: ReplicateAck, now: float, wall: float) -> None:
        w = self._writes.get(msg.op_id)
        if w is not None:
            for e in w.sent.pop(src, ()):
                w.need[e.key] -= 1
            self._check_write(msg.op_id, w)
            return
        h = self._handoffs.get(msg.op_id)
        if h is None or h.dest != src:
            return
        del self._handoffs[msg.op_id]
        dropped = 0
        for key, version in h.versions:
            held = self.entries.get(key)
            if held is None or held.version != version:
                continue
            reps = self.replicas_of(key)
            if self.name in reps:
                continue
            acks = self._handoff_acks.setdefault(key, set())
            acks.add(src)
            if acks.issuperset(reps):
                self._drop(key)
                dropped += 1
        if dropped:
            self.counters["handed_off"] += dropped
            self._events.append(HandedOff(dropped))

    def _handoff(self, now: float) -> None:
        """Push entries this node is not a replica of to their replicas, with acks."""
        batches: dict[str, list[Entry]] = {}
        for key, e in self.entries.items():
            reps = self.replicas_of(key)
            if self.name in reps or self._handoff_due.get(key, -math.inf) > now:
                continue
            self._handoff_due[key] = now + self.op_timeout
            done = self._handoff_acks.get(key, set())
            for d in reps:
                if d not in done:
                    batches.setdefault(d, []).append(e)
        for dest, es in batches.items():
            for chunk in _chunks(es):
                op_id = next(self._ids)
                self._handoffs[op_id] = _Handoff(dest, [(e.key, e.version) for e in chunk])
                heapq.heappush(self._timers, (now + self.op_timeout, op_id, True))
                self._out.append((dest, Replicate(op_id, list(chunk))))

    # -- reads ---------------------------------------------------------------------------------

    def _on_query(self, src: str, msg: Query, now: float, wall: float) -> None:
        self._coordinate_read(src, msg.req_id, msg.keys, now, wall)

    def _on_query_connection(self, src: str, msg: QueryConnection, now: float, wall: float) -> None:
        self._coordinate_read(src, msg.req_id, [flow_key(msg.flow)], now, wall)

    def _coordinate_read(
        self, client: str, req_id: int, keys: list[str], now: float, wall: float
    ) -> None:
        self.counters["client_queries"] += len(keys)
        r = _Read(client, req_id, {})
        for key in dict.fromkeys(keys):
            reps = self.replicas_of(key)
            local = self.entries.get(key)
            if self.name in reps and local is not None and local.live(wall):
                r.found[key] = local
                continue
            others = [d for d in reps if d != self.name]
            if not others:
                continue
            if local is not None:
                r.best[key] = local
            r.waiting[key] = set(others)
            held: dict[str, Version | None] = {}
            if self.name in reps:
                held[self.name] = local.version if local is not None else None
            r.held[key] = held
            for d in others:
                r.sent.setdefault(d, []).append(key)
        if not r.sent:
            self._out.append((client, QueryResult(req_id, list(r.found.values()))))
            return
        op_id = next(self._ids)
        self._reads[op_id] = r
        self._arm(op_id, now)
        for dest, ks in r.sent.items():
            self._out.append((dest, Read(op_id, list(ks))))

    def _on_read(self, src: str, msg: Read, now: float, wall: float) -> None:
        held = [e for k in msg.keys if (e := self.entries.get(k)) is not None and e.expires > wall]
        self._out.append((src, ReadReply(msg.op_id, held)))

    def _on_read_reply(self, src: str, msg: ReadReply, now: float, wall: float) -> None:
        r = self._reads.get(msg.op_id)
        if r is None:
            return
        asked = r.sent.pop(src, None)
        if asked is None:
            return
        got = {e.key: e for e in msg.entries}
        for key in asked:
            e = got.get(key)
            r.held.setdefault(key, {})[src] = e.version if e is not None else None
            if e is not None:
                best = r.best.get(key)
                if best is None or e.version > best.version:
                    r.best[key] = e
            waiting = r.waiting.get(key)
            if waiting is None:
                continue
            waiting.discard(src)
            best = r.best.get(key)
            if not waiting or (best is not None and best.live(wall)):
                self._resolve(r, key, wall)
        self._check_read(msg.op_id, r, wall)

    def _resolve(self, r: _Read, key: str, wall: float) -> None:
        r.waiting.pop(key, None)
        best = r.best.get(key)
        if best is not None and best.live(wall):
            r.found[key] = best

    def _check_read(self, op_id: int, r: _Read, wall: float) -> None:
        if not r.replied and not r.waiting:
            r.replied = True
            self._out.append((r.client, QueryResult(r.req_id, list(r.found.values()))))
        if not r.sent:
            self._finish_read(op_id, r, wall)

    def _finish_read(self, op_id: int, r: _Read, wall: float) -> None:
        self._reads.pop(op_id, None)
        if not r.replied:
            r.replied = True
            self._out.append((r.client, QueryResult(r.req_id, list(r.found.values()))))
        # Read repair: replicas that answered with less than the newest get it.
        pushes: dict[str, list[Entry]] = {}
        for key, held in r.held.items():
            best = r.best.get(key)
            if best is None or best.expires <= wall:
                continue
            for node, version in held.items():
                if version is not None and version >= best.version:
                    continue
                if node == self.name:
                    self._merge(best, wall)
                else:
                    pushes.setdefault(node, []).append(best)
        for dest, es in pushes.items():
            self.counters["read_repaired"] += len(es)
            self._push(dest, es)

    # -- bulk queries -------------------------------------------------------------------------

    def _scan(self, by: str, value: str, wall: float) -> list[Entry]:
        # Tombstones that match (or do not know what they deleted) go along, so that
        # the coordinator's merge hides a deleted entry still held elsewhere.
        return [
            e
            for e in self.entries.values()
            if e.expires > wall and (matches(e, by, value) or (e.deleted and not e.host))
        ]

    def _on_bulk_query(self, src: str, msg: BulkQuery, now: float, wall: float) -> None:
        self.counters["client_bulk_queries"] += 1
        merged = {e.key: e for e in self._scan(msg.by, msg.value, wall)}
        peers = {p for p in self.peers if p in self.live}
        b = _Bulk(src, msg.req_id, msg.by, msg.value, merged, peers)
        op_id = next(self._ids)
        if not peers:
            self._finish_bulk(op_id, b, wall)
            return
        self._bulks[op_id] = b
        self._arm(op_id, now)
        for p in sorted(peers):
            self._out.append((p, BulkScan(op_id, msg.by, msg.value)))

    def _on_bulk_scan(self, src: str, msg: BulkScan, now: float, wall: float) -> None:
        found = self._scan(msg.by, msg.value, wall)
        chunks = list(_chunks(found)) or [[]]
        for i, chunk in enumerate(chunks):
            self._out.append((src, BulkScanReply(msg.op_id, list(chunk), i == len(chunks) - 1)))

    def _on_bulk_scan_reply(self, src: str, msg: BulkScanReply, now: float, wall: float) -> None:
        b = self._bulks.get(msg.op_id)
        if b is None or src not in b.waiting:
            return
        for e in msg.entries:
            cur = b.merged.get(e.key)
            if cur is None or e.version > cur.version:
                b.merged[e.key] = e
        if msg.last:
            b.waiting.discard(src)
            if not b.waiting:
                self._finish_bulk(msg.op_id, b, wall)

    def _finish_bulk(self, op_id: int, b: _Bulk, wall: float) -> None:
        self._bulks.pop(op_id, None)
        found = [e for e in b.merged.values() if e.live(wall) and matches(e, b.by, b.value)]
        chunks = list(_chunks(found)) or [[]]
        for i, chunk in enumerate(chunks):
            self._out.append((b.client, BulkResult(b.req_id, list(chunk), i == len(chunks) - 1)))

    # -- anti-entropy --------------------------------------------------------------------------

    def digests(self) -> dict[str, list[int]]:
        """Per live peer: the digest of every bucket over the entries both should hold."""
        out = {p: [0] * BUCKETS for p in self.peers if p in self.live}
        for key in self.entries:
            reps = self.replicas_of(key)
            if self.name not in reps:
                continue
            bucket, h = self._meta[key]
            for p in reps:
                if p != self.name:
                    out[p][bucket] ^= h
        return out

    def _send_digests(self) -> None:
        for peer, d in self.digests().items():
            self._out.append((peer, Digests(d)))

    def _on_digests(self, src: str, msg: Digests, now: float, wall: float) -> None:
        self.counters["digests_in"] += 1
        mine = [0] * BUCKETS
        by_bucket: dict[int, list[Entry]] = {}
        for key, e in self.entries.items():
            reps = self.replicas_of(key)
            if self.name not in reps or src not in reps:
                continue
            bucket, h = self._meta[key]
            mine[bucket] ^= h
            by_bucket.setdefault(bucket, []).append(e)
        push = [
            e
            for b in range(BUCKETS)
            if mine[b] != msg.digests[b]
            for e in by_bucket.get(b, ())
            if e.expires > wall
        ]
        if push:
            self.counters["anti_entropy_pushed"] += len(push)
            self._push(src, push)

    def _push_shared(self, peer: str, wall: float) -> None:
        es = [
            e
            for k, e in self.entries.items()
            if e.expires > wall and peer in (reps := self.replicas_of(k)) and self.name in reps
        ]
        if es:
            self.counters["repair_pushed"] += len(es)
            self._push(peer, es)
