"""Inserts/s and queries/s through the sans-I/O tracker core, replication 2 vs 1.

Three ``TrackerNode``s in one process; messages between them are handed over
directly (no sockets, no codec), so this measures the core's own cost per
operation: placement, stamping, merging, replication and acknowledgements.
Each client request carries ``--batch`` keys and goes to the key's primary,
as ``TrackerClientCore`` sends it.

    .venv/bin/python bench/tracker_core.py [--entries 20000] [--batch 1]
"""

from __future__ import annotations

import argparse
import time
from collections import deque

from hanlb.flow import FlowKey
from hanlb.tracker.entry import Entry, flow_key
from hanlb.tracker.messages import ACK_ALL, Insert, Query, QueryResult, WriteResult
from hanlb.tracker.node import TrackerNode
from hanlb.tracker.placement import replicas

MEMBERS = ["t1", "t2", "t3"]
WALL = 1.8e9


def run(replication: int, n: int, batch: int) -> tuple[float, float]:
    nodes = {m: TrackerNode(m, MEMBERS, now=0.0, replication=replication) for m in MEMBERS}
    entries = [
        Entry(
            flow_key(FlowKey(6, f"10.91.{i // 60000}.{i % 250}", i % 60000, "10.93.0.1", 80)), "h1"
        )
        for i in range(n)
    ]
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(replicas(e.key, MEMBERS, 1)[0], []).append(e)
    replies = 0
    found = 0

    def pump(first: str) -> None:
        nonlocal replies, found
        queue: deque[tuple[str, str, object]] = deque(
            (first, d, m) for d, m in nodes[first].messages()
        )
        while queue:
            src, dst, msg = queue.popleft()
            if dst == "client":
                replies += 1
                if isinstance(msg, QueryResult):
                    found += len(msg.entries)
                else:
                    assert isinstance(msg, WriteResult) and not msg.failed
                continue
            nodes[dst].on_message(src, msg, 0.0, WALL)
            queue.extend((dst, d, m) for d, m in nodes[dst].messages())

    req = 0
    t0 = time.perf_counter()
    for primary, es in groups.items():
        for i in range(0, len(es), batch):
            req += 1
            nodes[primary].on_message("client", Insert(req, es[i : i + batch], ACK_ALL), 0.0, WALL)
            pump(primary)
    t_insert = time.perf_counter() - t0
    assert replies == req, (replies, req)
    assert sum(len(x.entries) for x in nodes.values()) == replication * n

    t0 = time.perf_counter()
    for primary, es in groups.items():
        for i in range(0, len(es), batch):
            req += 1
            keys = [e.key for e in es[i : i + batch]]
            nodes[primary].on_message("client", Query(req, keys), 0.0, WALL)
            pump(primary)
    t_query = time.perf_counter() - t0
    assert found == n, found
    return n / t_insert, n / t_query


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    results = {r: run(r, args.entries, args.batch) for r in (1, 2)}
    print(f"tracker core, 3 nodes, {args.entries} entries, {args.batch} per request")
    for r, (ins, qry) in results.items():
        print(f"  replication {r}: {ins:10,.0f} inserts/s  {qry:10,.0f} queries/s")
    (i1, q1), (i2, q2) = results[1], results[2]
    print(f"  ratio r2/r1: inserts {i2 / i1:.2f}  queries {q2 / q1:.2f}")


if __name__ == "__main__":
    main()
