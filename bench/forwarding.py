"""Forwarding benchmark (issue 2): the LB's data path against a straight path.

One lab (1 client, 1 forwarder, 1 classifier, 1 host), measured in one run:

- throughput of one long TCP upload (client -> sink on the host) through the VIP
  (router -> forwarder's kernel datapath -> host) against the same upload sent
  straight to the host's own address (router -> host): the baseline; and, to
  tell the datapath's cost from the topology's, the same upload routed through
  the forwarder's namespace by plain kernel IP forwarding (the same extra hop);
- new connections per second (connect, GET /, read, close) through the VIP against
  straight to the host. Through the VIP every connection's SYN misses, goes to the
  forwarder process through the TAP, is classified, plumbed, and sent on.

The machine is shared and noisy (one upload's throughput moves by +/-20% from
one second to the next), so the paths are measured back to back, many times,
in an order that rotates every round, and the headline ratio is the median of
the rounds' ratios (each round's LB upload over the direct upload next to it);
the ratio of the medians is printed too. The uploading client runs on CPU 0 and
the host's sink on CPU 1 (``--no-pin`` leaves them to the scheduler): where the
scheduler happens to put the two processes moves throughput more than the
datapath does. Every packet's kernel work (the router, the forwarder's
nftables, the bridge, the host's TCP receive) runs in softirq on the sending
CPU on every path. Usage (as root)::

    python bench/forwarding.py [--datapath kernel|userspace] [--rounds 15] [--seconds 2]
        [--conn-rounds 3] [--no-pin] [--bridge-netfilter]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from hanlb.lab import topology
from hanlb.lab.topology import Lab

HOST_ADDR = "10.92.0.101"


def wait_plumbed(lab: Lab) -> None:
    from hanlb import admin

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if admin.query(str(topology.LAB_DIR / "sock"), "fw1", "/status").get("classifier"):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("forwarder never connected to its classifier")


def pin(lab: Lab, on: bool) -> None:
    """On: this process (and so every load generator it starts) on CPU 0, the
    host's server (its sink) on CPU 1. Off: both back on every CPU."""
    every = set(range(os.cpu_count() or 1))
    os.sched_setaffinity(0, {0} if on else every)
    pid = lab.component("h1")["pid"]
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {1} if on else every)


def hop_throughput(lab: Lab, seconds: float) -> float:
    """The same upload to the host's own address, routed through the forwarder's
    namespace by plain kernel IP forwarding (no hanlb): what the lab's extra
    hop (one more veth pair and bridge pass) costs by itself."""
    fw, router = "hl-fw1", "hl-router"
    lab.netns_exec(
        fw,
        [
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.lan0.send_redirects=0",
        ],
        check=True,
    )
    lab.netns_exec(
        router,
        ["ip", "route", "add", f"{HOST_ADDR}/32", "via", "10.92.0.11", "dev", "lan0"],
        check=True,
    )
    try:
        up = lab.load("hl-c1", "upload", address=HOST_ADDR, port=5001, seconds=seconds)
        return float(up["gbit_per_s"])
    finally:
        lab.netns_exec(router, ["ip", "route", "del", f"{HOST_ADDR}/32"], check=True)
        lab.netns_exec(fw, ["sysctl", "-qw", "net.ipv4.ip_forward=0"], check=True)


def upload(lab: Lab, path: str, seconds: float) -> float:
    if path == "hop":
        return hop_throughput(lab, seconds)
    addr = topology.VIP if path == "lb" else HOST_ADDR
    up: dict[str, Any] = lab.load("hl-c1", "upload", address=addr, port=5001, seconds=seconds)
    return float(up["gbit_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datapath", choices=["kernel", "userspace"], default="kernel")
    parser.add_argument("--rounds", type=int, default=15, help="throughput rounds")
    parser.add_argument("--seconds", type=float, default=2.0, help="per upload")
    parser.add_argument("--conn-rounds", type=int, default=3, help="new-connection rounds")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="leave CPU placement to the scheduler"
    )
    parser.add_argument(
        "--bridge-netfilter",
        action="store_true",
        help="let the lab's bridge run the IP netfilter hooks again (br_netfilter, where "
        "loaded), as the lab did before it turned them off: for comparison",
    )
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    lab = Lab.up(clients=1, forwarders=1, classifiers=1, hosts=1, datapath=args.datapath)
    try:
        lab.wait_ready()
        wait_plumbed(lab)
        if args.bridge_netfilter:
            keys = [f"net.bridge.bridge-nf-call-{k}=1" for k in ("iptables", "ip6tables")]
            lab.netns_exec("hl-lan", ["sysctl", "-q", "-w", *keys], check=True)
        tput: dict[str, list[float]] = {"lb": [], "direct": [], "hop": []}
        conns: dict[str, list[float]] = {"lb": [], "direct": []}
        failures = 0
        pin(lab, args.pin)
        for i in range(args.rounds):
            order = ["lb", "direct", "hop"]
            order = order[i % 3 :] + order[: i % 3]
            for path in order if i % 2 == 0 else reversed(order):
                tput[path].append(upload(lab, path, args.seconds))
        pin(lab, False)  # new connections: the classifier path uses both CPUs
        for i in range(args.conn_rounds):
            for path in ("lb", "direct") if i % 2 == 0 else ("direct", "lb"):
                http = lab.load(
                    "hl-c1",
                    "http",
                    address=topology.VIP if path == "lb" else HOST_ADDR,
                    port=80,
                    connections=args.connections,
                    concurrency=args.concurrency,
                    timeout=10,
                )
                failures += http["failed"]
                conns[path].append(http["conn_per_s"])
                time.sleep(3)  # let routes drain between runs (linger 2 s)
    finally:
        lab.down()

    t_lb, t_direct = statistics.median(tput["lb"]), statistics.median(tput["direct"])
    t_hop = statistics.median(tput["hop"])
    pair = statistics.median(a / b for a, b in zip(tput["lb"], tput["direct"], strict=True))
    c_lb, c_direct = statistics.median(conns["lb"]), statistics.median(conns["direct"])
    result = {
        "datapath": args.datapath,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "conn_rounds": args.conn_rounds,
        "pinned": args.pin,
        "bridge_netfilter": args.bridge_netfilter,
        "throughput_gbit_s": {
            "median_pair_ratio": pair,
            "lb": t_lb,
            "direct": t_direct,
            "ratio": t_lb / t_direct,
            "plain_hop": t_hop,
            "ratio_to_plain_hop": t_lb / t_hop,
        },
        "new_conn_per_s": {"lb": c_lb, "direct": c_direct, "ratio": c_lb / c_direct},
        "failed_connections": failures,
        "samples": {"throughput": tput, "conn_per_s": conns},
    }
    placement = "client on CPU 0, sink on CPU 1" if args.pin else "unpinned"
    print(
        f"datapath: {args.datapath}; {args.rounds} rounds of {args.seconds:g} s uploads "
        f"({placement}), {args.conn_rounds} of new connections; medians"
    )
    print(
        f"one TCP flow:     LB {t_lb:6.2f} Gbit/s   direct {t_direct:6.2f} Gbit/s   "
        f"ratio {pair:.2f} (median of the rounds' ratios; of the medians {t_lb / t_direct:.2f})"
        "  (target >= 0.9)"
    )
    print(
        f"  same hop, plain kernel routing through the forwarder's namespace: "
        f"{t_hop:6.2f} Gbit/s; LB / plain hop {t_lb / t_hop:.2f}"
    )
    print(
        f"new connections:  LB {c_lb:6.0f} /s       direct {c_direct:6.0f} /s       "
        f"ratio {c_lb / c_direct:.2f}  (target >= 0.5)"
    )
    print(f"failed connections: {failures}")
    print(json.dumps(result))
    sys.exit(0 if failures == 0 else 1)


if __name__ == "__main__":
    main()
