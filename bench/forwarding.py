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

The two paths alternate ROUNDS times and the medians are compared, since the
machine is shared and noisy. Usage (as root)::

    python bench/forwarding.py [--datapath kernel|userspace] [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datapath", choices=["kernel", "userspace"], default="kernel")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    lab = Lab.up(clients=1, forwarders=1, classifiers=1, hosts=1, datapath=args.datapath)
    try:
        lab.wait_ready()
        wait_plumbed(lab)
        tput: dict[str, list[float]] = {"lb": [], "direct": [], "hop": []}
        conns: dict[str, list[float]] = {"lb": [], "direct": []}
        failures = 0
        for _ in range(args.rounds):
            for path, addr in (("lb", topology.VIP), ("direct", HOST_ADDR)):
                up: dict[str, Any] = lab.load(
                    "hl-c1", "upload", address=addr, port=5001, seconds=args.seconds
                )
                tput[path].append(up["gbit_per_s"])
                if path == "direct":
                    tput["hop"].append(hop_throughput(lab, args.seconds))
                http = lab.load(
                    "hl-c1",
                    "http",
                    address=addr,
                    port=80,
                    connections=args.connections,
                    concurrency=args.concurrency,
                    timeout=10,
                )
                failures += http["failed"]
                conns[path].append(http["conn_per_s"])
                time.sleep(3)  # let routes drain between rounds (linger 2 s)
    finally:
        lab.down()

    t_lb, t_direct = statistics.median(tput["lb"]), statistics.median(tput["direct"])
    t_hop = statistics.median(tput["hop"])
    c_lb, c_direct = statistics.median(conns["lb"]), statistics.median(conns["direct"])
    result = {
        "datapath": args.datapath,
        "rounds": args.rounds,
        "throughput_gbit_s": {
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
    print(f"datapath: {args.datapath}, {args.rounds} rounds, medians")
    print(
        f"one TCP flow:     LB {t_lb:6.2f} Gbit/s   direct {t_direct:6.2f} Gbit/s   "
        f"ratio {t_lb / t_direct:.2f}  (target >= 0.9)"
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
