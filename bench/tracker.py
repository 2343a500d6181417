"""Session-tracker benchmark (issue 3), over the lab's network, in one run.

1. Replicated: a lab with 3 tracker nodes, replication 2. From the classifier's
   namespace, a client inserts N flow entries (acknowledged by every replica)
   and queries them back, in batches the size of a classifier's classify batch.
2. Baseline: a lab with 1 tracker node, replication 1, the same client work.
3. Forwarder failover: in the replicated lab, 100 streams over 3 forwarders,
   one forwarder killed; the per-connection stall (longest gap between two
   reads) is reported.

The target (issue 3): the tracker never limits the new-connection rate. Each
new connection costs one insert, so replicated inserts/s must exceed the
new-connection rate through the LB that bench/forwarding.py measures; this
benchmark prints both numbers it needs (pass ``--lb-conn-per-s`` from that run).

Usage (as root)::

    python bench/tracker.py [--entries 20000] [--batch 8] [--lb-conn-per-s 3700]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from typing import Any

from hanlb import admin
from hanlb.lab import topology
from hanlb.lab.topology import Lab


async def _client_work(config_path: str, entries: int, batch: int) -> dict[str, float]:
    from hanlb.config import load_config
    from hanlb.flow import FlowKey
    from hanlb.tracker.client import AsyncTrackerClient
    from hanlb.tracker.entry import Entry, flow_key
    from hanlb.tracker.messages import ACK_ALL

    config = load_config(config_path)
    client = AsyncTrackerClient(config, name="bench")
    await client.connect()
    keys = [
        flow_key(
            FlowKey(
                6,
                f"10.97.{i // 60000 % 256}.{i // 250 % 240 + 1}",
                1024 + i % 60000,
                "10.93.0.1",
                80,
            )
        )
        for i in range(entries)
    ]
    # 32 batches in flight, as several forwarders' classify batches would be
    sem = asyncio.Semaphore(32)

    async def insert(chunk: list[str]) -> None:
        async with sem:
            failed = await client.insert([Entry(k, "h1", "fw1") for k in chunk], ACK_ALL)
            assert not failed, failed

    async def query(chunk: list[str]) -> int:
        async with sem:
            return len(await client.query(chunk))

    chunks = [keys[i : i + batch] for i in range(0, len(keys), batch)]
    t0 = time.perf_counter()
    await asyncio.gather(*(insert(c) for c in chunks))
    t1 = time.perf_counter()
    found = sum(await asyncio.gather(*(query(c) for c in chunks)))
    t2 = time.perf_counter()
    client.close()
    return {
        "inserts_per_s": entries / (t1 - t0),
        "queries_per_s": entries / (t2 - t1),
        "found": found,
        "entries": entries,
    }


def client_main(argv: list[str]) -> None:
    config_path, entries, batch = argv[0], int(argv[1]), int(argv[2])
    print(json.dumps(asyncio.run(_client_work(config_path, entries, batch))))


def run_client(lab: Lab, entries: int, batch: int) -> dict[str, Any]:
    proc = lab.netns_exec(
        "hl-cl1",
        [sys.executable, __file__, "--client", str(topology.CONFIG_FILE), str(entries), str(batch)],
    )
    if proc.returncode != 0:
        raise SystemExit(f"tracker client failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def q(name: str, path: str = "/status") -> Any:
    return admin.query(str(topology.SOCK_DIR), name, path)


def wait(cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("lab not ready")


def failover_stalls(lab: Lab) -> list[float]:
    results: list[dict[str, Any]] = []
    threads = [
        threading.Thread(
            target=lambda ns=ns: results.append(
                lab.load(ns, "stream", connections=50, seconds=8, timeout=30)
            )
        )
        for ns in lab.clients
    ]
    for t in threads:
        t.start()
    wait(lambda: sum(len(q(f, "/routes")) for f in ("fw1", "fw2", "fw3")) >= 100, 15)
    lab.kill("fw2")
    for t in threads:
        t.join()
    if any(r["failed"] for r in results):
        raise SystemExit(f"streams lost in failover: {[r['errors'] for r in results]}")
    return sorted(c["max_stall"] for r in results for c in r["connections"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lb-conn-per-s", type=float, default=None)
    args = parser.parse_args()

    sizes = dict(clients=2, forwarders=3, classifiers=1, hosts=4, switch=True)
    try:
        lab = Lab.up(trackers=1, replication=1, **sizes)  # type: ignore[arg-type]
        lab.wait_ready()
        wait(lambda: q("tr1")["entries"] >= 0, 10)
        single = run_client(lab, args.entries, args.batch)
        lab = Lab.up(trackers=3, replication=2, **sizes)  # type: ignore[arg-type]
        lab.wait_ready()
        wait(lambda: all(len(q(t)["peer_links"]) == 2 for t in ("tr1", "tr2", "tr3")), 15)
        replicated = run_client(lab, args.entries, args.batch)
        wait(lambda: all(q(f).get("classifier") for f in ("fw1", "fw2", "fw3")), 15)
        wait(lambda: len(q("switch")["live"]) == 3, 10)
        stalls = failover_stalls(lab)
    finally:
        topology.down()

    ins_ratio = replicated["inserts_per_s"] / single["inserts_per_s"]
    qry_ratio = replicated["queries_per_s"] / single["queries_per_s"]
    print(
        f"{args.entries} entries, batches of {args.batch}, 32 batches in flight, "
        "client in the classifier's namespace"
    )
    print(
        f"replication 2 (3 nodes): {replicated['inserts_per_s']:8.0f} inserts/s  "
        f"{replicated['queries_per_s']:8.0f} queries/s  (found {replicated['found']})"
    )
    print(
        f"single node (baseline):  {single['inserts_per_s']:8.0f} inserts/s  "
        f"{single['queries_per_s']:8.0f} queries/s  (found {single['found']})"
    )
    print(f"ratio replicated/single: inserts {ins_ratio:.2f}, queries {qry_ratio:.2f}")
    if args.lb_conn_per_s:
        verdict = "ok" if replicated["inserts_per_s"] > args.lb_conn_per_s else "LIMITS"
        print(
            f"new connections/s through the LB (bench/forwarding.py): "
            f"{args.lb_conn_per_s:.0f} -> replicated inserts/s is "
            f"{replicated['inserts_per_s'] / args.lb_conn_per_s:.1f}x that ({verdict})"
        )
    print(
        f"forwarder failover, 100 streams, 1 of 3 forwarders killed: stall p50 "
        f"{statistics.median(stalls) * 1000:.0f} ms, p99 "
        f"{stalls[int(len(stalls) * 0.99) - 1] * 1000:.0f} ms, max {stalls[-1] * 1000:.0f} ms"
    )
    print(json.dumps({"replicated": replicated, "single": single, "stalls": stalls}))


if __name__ == "__main__":
    main()
