"""Talking to the session tracker: a sans-I/O client core and an asyncio client.

``TrackerClientCore`` sends each operation, split by key, to a live replica of
the key (the primary first, so the coordinating node is normally a replica and
answers reads from its own table). A request that is not answered within
``timeout``, or whose node's link goes down, is retried on the key's next
member in rendezvous order (going round the members up to ``max_attempts``
requests per key); a node that timed out is avoided for ``suspect_for``
seconds. Results come out as events (``WriteDone``, ``QueryDone``,
``BulkDone``).

``AsyncTrackerClient`` keeps one framed ``Link`` per tracker node, reconnects
every ``timers.reconnect_interval``, and turns the events into awaited results.
It never raises because a node is down while another member answers; when no
member answers, a query returns what it found, a write lists its failed keys.

Write semantics (see ``node.py``): ``insert``/``delete`` default to ACK_ALL
(every live replica applied it). ``insert_nowait`` is fire and forget
(ACK_NONE): it is lost if the chosen node dies before its replicas applied it,
or the request is lost on its way (connection reset): a window of one client ->
node hop plus one node -> replica hop, well under a millisecond on a LAN, and
never retried. With ACK_ONE the window is the node -> replica hop after the
answer: only the death of the coordinating replica before it reaches the
other replica loses the entry.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..config import ClusterConfig
from ..flow import FlowKey
from ..net import Link, LinkClosed, open_link
from ..protocol.messages import Hello, Ping, Pong
from .entry import Entry, flow_key
from .messages import (
    ACK_ALL,
    ACK_NONE,
    BULK_BY,
    BulkQuery,
    BulkResult,
    Delete,
    Insert,
    Query,
    QueryResult,
    WriteResult,
)
from .placement import rank

__all__ = [
    "AsyncTrackerClient",
    "BulkDone",
    "ClientEvent",
    "QueryDone",
    "TrackerClientCore",
    "WriteDone",
]


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteDone:
    """An insert or delete finished; ``failed`` keys did not reach the ack level."""

    op_id: int
    failed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QueryDone:
    """A query finished: the live entries found, by key; ``unanswered`` keys got
    no answer from any member (they may exist)."""

    op_id: int
    entries: dict[str, Entry]
    unanswered: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BulkDone:
    """A bulk query finished; ``complete`` is False when no member answered."""

    op_id: int
    entries: list[Entry]
    complete: bool


ClientEvent = WriteDone | QueryDone | BulkDone


@dataclass(slots=True)
class _Op:
    kind: str
    """"write", "query" or "bulk"."""
    ack: int = ACK_ALL
    pending: set[int] = field(default_factory=set)
    tried: dict[str, set[str]] = field(default_factory=dict)
    attempts: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    found: dict[str, Entry] = field(default_factory=dict)
    by: str = ""
    value: str = ""


@dataclass(slots=True)
class _Req:
    op_id: int
    node: str
    keys: list[str]
    entries: list[Entry] | None
    """The entries of an insert (None for deletes and queries)."""
    chunks: list[Entry] = field(default_factory=list)


class TrackerClientCore:
    def __init__(
        self,
        members: Iterable[str],
        *,
        timeout: float = 1.0,
        suspect_for: float = 1.0,
        max_attempts: int | None = None,
    ) -> None:
        self.members = sorted(set(members))
        if not self.members:
            raise ValueError("no tracker members")
        self.timeout = timeout
        self.suspect_for = suspect_for
        self.max_attempts = max_attempts if max_attempts is not None else 2 * len(self.members)
        """Requests sent for one key before it is given up (failed or unanswered)."""
        self.up: set[str] = set()
        self.suspect_until: dict[str, float] = {}
        self.counters: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._ops: dict[int, _Op] = {}
        self._reqs: dict[int, _Req] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._out: list[tuple[str, object]] = []
        self._events: deque[ClientEvent] = deque()

    # -- outputs ---------------------------------------------------------------------

    def messages(self) -> list[tuple[str, object]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> ClientEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float:
        while self._deadlines and self._deadlines[0][1] not in self._reqs:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else math.inf

    @property
    def pending(self) -> int:
        return len(self._ops)

    # -- node state ----------------------------------------------------------------------

    def node_up(self, node: str, now: float) -> None:
        self.up.add(node)
        self.suspect_until.pop(node, None)

    def node_down(self, node: str, now: float) -> None:
        """The link to ``node`` is gone: its outstanding requests go elsewhere now."""
        self.up.discard(node)
        for req_id in [r for r, q in self._reqs.items() if q.node == node]:
            self._retry(req_id, now)

    def _available(self, node: str, now: float) -> bool:
        return node in self.up and self.suspect_until.get(node, -math.inf) <= now

    def _candidate(self, order: Sequence[str], tried: set[str], now: float) -> str | None:
        rest = [m for m in order if m not in tried]
        for m in rest:
            if self._available(m, now):
                return m
        return rest[0] if rest else None

    # -- operations ------------------------------------------------------------------------

    def insert(self, entries: Sequence[Entry], ack: int = ACK_ALL, *, now: float) -> int:
        """Insert or refresh ``entries`` (their ``version`` is set by the tracker)."""
        op_id = next(self._ids)
        op = _Op("write", ack)
        by_key = {e.key: e for e in entries}
        if ack == ACK_NONE:
            self.counters["inserts_unacknowledged"] += len(by_key)
            for node, keys in self._group(list(by_key), op, now).items():
                self._out.append((node, Insert(0, [by_key[k] for k in keys], ACK_NONE)))
            return op_id
        self._ops[op_id] = op
        self._send(op_id, op, list(by_key), now, by_key)
        return op_id

    def delete(self, keys: Sequence[str], ack: int = ACK_ALL, *, now: float) -> int:
        op_id = next(self._ids)
        op = _Op("write", ack)
        if ack == ACK_NONE:
            unique = list(dict.fromkeys(keys))
            self.counters["deletes_unacknowledged"] += len(unique)
            for node, group in self._group(unique, op, now).items():
                self._out.append((node, Delete(0, group, ACK_NONE)))
            return op_id
        self._ops[op_id] = op
        self._send(op_id, op, list(dict.fromkeys(keys)), now, None)
        return op_id

    def query(self, keys: Sequence[str], *, now: float) -> int:
        op_id = next(self._ids)
        op = _Op("query")
        self._ops[op_id] = op
        self._send(op_id, op, list(dict.fromkeys(keys)), now, None)
        return op_id

    def query_connection(self, flow: FlowKey, *, now: float) -> int:
        """Claim 66's query connection: ``query`` of the flow's key."""
        return self.query([flow_key(flow)], now=now)

    def bulk_query(self, by: str, value: str = "", *, now: float) -> int:
        if by not in BULK_BY:
            raise ValueError(f"bulk query by {by!r}: use one of {', '.join(BULK_BY)}")
        op_id = next(self._ids)
        op = _Op("bulk", by=by, value=value)
        self._ops[op_id] = op
        self._send(op_id, op, ["*"], now, None)
        return op_id

    def _group(self, keys: list[str], op: _Op, now: float) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for key in keys:
            order = self.members if op.kind == "bulk" else rank(key, self.members)
            tried = op.tried.get(key, set())
            if len(tried) >= len(order) and op.attempts[key] < self.max_attempts:
                tried.clear()  # every member failed once: go round again
            node = self._candidate(order, tried, now)
            if node is None:
                op.failed.append(key)
                continue
            groups.setdefault(node, []).append(key)
        return groups

    def _send(
        self, op_id: int, op: _Op, keys: list[str], now: float, by_key: dict[str, Entry] | None
    ) -> None:
        for node, ks in self._group(keys, op, now).items():
            req_id = next(self._ids)
            entries = [by_key[k] for k in ks] if by_key is not None else None
            msg: object
            if op.kind == "bulk":
                msg = BulkQuery(req_id, op.by, op.value)
            elif op.kind == "query":
                msg = Query(req_id, ks)
            elif entries is not None:
                msg = Insert(req_id, entries, op.ack)
            else:
                msg = Delete(req_id, ks, op.ack)
            self._reqs[req_id] = _Req(op_id, node, ks, entries)
            op.pending.add(req_id)
            heapq.heappush(self._deadlines, (now + self.timeout, req_id))
            self._out.append((node, msg))
        self._maybe_done(op_id, op)

    def _retry(self, req_id: int, now: float) -> None:
        req = self._reqs.pop(req_id)
        op = self._ops[req.op_id]
        op.pending.discard(req_id)
        self.counters["retries"] += 1
        for key in req.keys:
            op.tried.setdefault(key, set()).add(req.node)
            op.attempts[key] += 1
        by_key = {e.key: e for e in req.entries} if req.entries is not None else None
        self._send(req.op_id, op, req.keys, now, by_key)

    def _maybe_done(self, op_id: int, op: _Op) -> None:
        if op.pending:
            return
        del self._ops[op_id]
        if op.kind == "write":
            self._events.append(WriteDone(op_id, tuple(op.failed)))
        elif op.kind == "query":
            self._events.append(QueryDone(op_id, op.found, tuple(op.failed)))
        else:
            self._events.append(BulkDone(op_id, list(op.found.values()), not op.failed))

    # -- inputs -------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, req_id = heapq.heappop(self._deadlines)
            req = self._reqs.get(req_id)
            if req is None:
                continue
            self.counters["timeouts"] += 1
            self.suspect_until[req.node] = now + self.suspect_for
            self._retry(req_id, now)

    def on_message(self, node: str, msg: object, now: float) -> None:
        if isinstance(msg, Ping):
            self._out.append((node, Pong(msg.seq, msg.sent)))
            return
        if isinstance(msg, Pong):
            return
        req_id = getattr(msg, "req_id", None)
        req = self._reqs.get(req_id) if isinstance(req_id, int) else None
        if req is None or req.node != node or not isinstance(req_id, int):
            self.counters["replies_unexpected"] += 1
            return
        op = self._ops[req.op_id]
        if isinstance(msg, WriteResult):
            op.failed.extend(k for k in msg.failed if k in req.keys)
        elif isinstance(msg, QueryResult):
            asked = set(req.keys)
            op.found.update((e.key, e) for e in msg.entries if e.key in asked)
        elif isinstance(msg, BulkResult):
            req.chunks.extend(msg.entries)
            if not msg.last:
                return
            op.found = {e.key: e for e in req.chunks}
        else:
            self.counters["replies_unexpected"] += 1
            return
        del self._reqs[req_id]
        op.pending.discard(req_id)
        self._maybe_done(req.op_id, op)


# -- asyncio ------------------------------------------------------------------------------


class AsyncTrackerClient:
    """The session tracker for asyncio code (classifiers, request routers, ctl).

    ::

        client = AsyncTrackerClient(config, counters)
        await client.insert([Entry(flow_key(flow), "h1", "fw1")])
        found = await client.query([flow_key(flow)])
        client.close()
    """

    def __init__(
        self,
        config: ClusterConfig,
        counters: Counter[str] | None = None,
        *,
        name: str = "tracker-client",
        timeout: float | None = None,
    ) -> None:
        if not config.trackers:
            raise ValueError("the configuration names no trackers")
        self.config = config
        self.name = name
        self.counters: Counter[str] = counters if counters is not None else Counter()
        t = config.timers
        self.timeout = timeout if timeout is not None else max(1.0, 8 * t.liveness_interval)
        self.core = TrackerClientCore(
            [n.name for n in config.trackers], timeout=self.timeout, suspect_for=1.0
        )
        self.links: dict[str, Link] = {}
        self.incarnation = int.from_bytes(os.urandom(4), "big")
        self._endpoints = {n.name: n.endpoint for n in config.trackers}
        self._tasks: list[asyncio.Task[None]] = []
        self._connected: dict[str, asyncio.Event] = {}
        self._futures: dict[int, asyncio.Future[ClientEvent]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # -- public API ----------------------------------------------------------------------

    async def insert(self, entries: Sequence[Entry], ack: int = ACK_ALL) -> list[str]:
        """Insert or refresh entries; returns the keys that did not reach ``ack``."""
        await self._start()
        ev = await self._run(self.core.insert(entries, ack, now=self._now()))
        assert isinstance(ev, WriteDone)
        return list(ev.failed)

    def insert_nowait(self, entries: Sequence[Entry]) -> None:
        """Fire and forget (ACK_NONE); see the module docstring for the window of loss."""
        self._start_tasks()
        self.core.insert(entries, ACK_NONE, now=self._now())
        self._flush()

    def delete_nowait(self, keys: Sequence[str]) -> None:
        """Fire and forget (ACK_NONE). Sent at once, so it keeps its order with
        ``insert_nowait`` calls made before and after it."""
        self._start_tasks()
        self.core.delete(keys, ACK_NONE, now=self._now())
        self._flush()

    async def delete(self, keys: Sequence[str], ack: int = ACK_ALL) -> list[str]:
        await self._start()
        ev = await self._run(self.core.delete(keys, ack, now=self._now()))
        assert isinstance(ev, WriteDone)
        return list(ev.failed)

    async def query(self, keys: Sequence[str]) -> dict[str, Entry]:
        """The live entries for ``keys``; a missing key is unknown (or unanswered)."""
        await self._start()
        ev = await self._run(self.core.query(keys, now=self._now()))
        assert isinstance(ev, QueryDone)
        if ev.unanswered:
            self.counters["tracker_unanswered_keys"] += len(ev.unanswered)
        return ev.entries

    async def query_connection(self, flow: FlowKey) -> Entry | None:
        """Claim 66: the entry of a transport flow, or None."""
        return (await self.query([flow_key(flow)])).get(flow_key(flow))

    async def bulk_query(self, by: str, value: str = "") -> list[Entry]:
        return (await self.bulk(by, value)).entries

    async def bulk(self, by: str, value: str = "") -> BulkDone:
        """Like ``bulk_query``, with whether every node answered (``complete``)."""
        await self._start()
        ev = await self._run(self.core.bulk_query(by, value, now=self._now()))
        assert isinstance(ev, BulkDone)
        return ev

    def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for link in self.links.values():
            link.close()
        self.links.clear()
        if self._timer is not None:
            self._timer.cancel()
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()

    async def connect(self) -> None:
        """Open links to the tracker nodes now; returns once one is up (or after the
        timeout). Operations do this themselves; a caller that wants its first
        fire-and-forget inserts to find a link calls it first."""
        await self._start()

    # -- machinery --------------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _start_tasks(self) -> None:
        if self._tasks or self._closed:
            return
        for node, (host, port) in sorted(self._endpoints.items()):
            self._connected[node] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._connect_loop(node, host, port)))

    async def _start(self) -> None:
        if self._closed:
            raise RuntimeError("tracker client is closed")
        self._start_tasks()
        if self.links:
            return
        # Before the first connection: wait for one link, at most ``timeout``.
        waits = [asyncio.ensure_future(e.wait()) for e in self._connected.values()]
        try:
            await asyncio.wait(waits, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _run(self, op_id: int) -> ClientEvent:
        fut: asyncio.Future[ClientEvent] = asyncio.get_running_loop().create_future()
        self._futures[op_id] = fut
        self._flush()
        return await fut

    async def _connect_loop(self, node: str, host: str, port: int) -> None:
        t = self.config.timers
        while not self._closed:
            try:
                link = await open_link(host, port, self.config.key_bytes, self.counters, 1.0)
            except (OSError, TimeoutError):
                self.counters["tracker_connect_failures"] += 1
                await asyncio.sleep(t.reconnect_interval)
                continue
            link.send(Hello(self.name, "tracker-client", self.incarnation))
            self.links[node] = link
            self.counters["tracker_connects"] += 1
            self.core.node_up(node, self._now())
            self._connected[node].set()
            try:
                while True:
                    msgs = await link.recv()
                    now = self._now()
                    for msg in msgs:
                        self.core.on_message(node, msg, now)
                    self._flush()
            except LinkClosed:
                self.counters["tracker_link_losses"] += 1
            finally:
                link.close()
                if self.links.get(node) is link:
                    del self.links[node]
                if not self._closed:
                    self.core.node_down(node, self._now())
                    self._flush()
            await asyncio.sleep(t.reconnect_interval)

    def _flush(self) -> None:
        if self._closed:
            return
        now = self._now()
        for _ in range(len(self._endpoints) + 2):
            msgs = self.core.messages()
            if not msgs:
                break
            failed: set[str] = set()
            for node, msg in msgs:
                link = self.links.get(node)
                if link is None or node in failed:
                    failed.add(node)
                    continue
                try:
                    link.send(msg)
                except LinkClosed:
                    failed.add(node)
            for node in failed:
                self.counters["tracker_send_failures"] += 1
                self.core.node_down(node, now)
        while (ev := self.core.next_event()) is not None:
            fut = self._futures.pop(ev.op_id, None)
            if fut is not None and not fut.done():
                fut.set_result(ev)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.core.get_timer()
        if when != math.inf:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(self._now())
        self._flush()
