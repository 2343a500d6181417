"""Route plumbing rate through libnftables: single-element adds vs batches.

Run as root: ``.venv/bin/python bench/nft_batch.py [--single N] [--batched N]
[--batch-size B]``. It creates a throwaway network namespace, builds the same
``routes`` map the kernel datapath uses, and prints elements/s for both ways in
the same run (each measurement on an empty map).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid

from hanlb.forwarder.nft import Nft

TABLE = "hlbench"
MAP = f"""table netdev {TABLE} {{
  map routes {{ type ipv4_addr . inet_service . ipv4_addr . inet_service : ether_addr;
    size 1048576; counter; }}
}}"""


def element(i: int) -> str:
    src = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    mac = f"02:00:00:00:{(i >> 8) & 255:02x}:{i & 255:02x}"
    return f"{src} . {1024 + i % 60000} . 10.93.0.1 . 80 : {mac}"


def fresh(nft: Nft) -> None:
    nft.run(f"table netdev {TABLE}\ndelete table netdev {TABLE}\n{MAP}")


def measure(nft: Nft, count: int, batch: int) -> float:
    fresh(nft)
    elems = [element(i) for i in range(count)]
    start = time.perf_counter()
    for i in range(0, count, batch):
        nft.run(f"add element netdev {TABLE} routes {{ {', '.join(elems[i : i + batch])} }}")
    elapsed = time.perf_counter() - start
    listed = nft.json(f"list map netdev {TABLE} routes")
    got = sum(len(m["map"].get("elem", [])) for m in listed if "map" in m)
    if got != count:
        raise SystemExit(f"expected {count} elements, map holds {got}")
    return count / elapsed


def inside(args: argparse.Namespace) -> None:
    with Nft() as nft:
        single = measure(nft, args.single, 1)
        batched = measure(nft, args.batched, args.batch_size)
        nft.run(f"delete table netdev {TABLE}")
    print(
        f"single adds:        {args.single:7d} elements  {single:10,.0f} elements/s"
        f"  ({1e6 / single:.0f} us each)"
    )
    print(
        f"batches of {args.batch_size}: {args.batched:7d} elements"
        f"  {batched:10,.0f} elements/s"
        f"  ({1e6 * args.batch_size / batched:.0f} us per batch)"
    )
    print(f"batching speed-up:  {batched / single:.1f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--single", type=int, default=3000)
    p.add_argument("--batched", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inside:
        inside(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates a network namespace)")
    ns = f"t-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        cmd = ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--inside"]
        cmd += ["--single", str(args.single), "--batched", str(args.batched)]
        cmd += ["--batch-size", str(args.batch_size)]
        raise SystemExit(subprocess.run(cmd, check=False).returncode)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
