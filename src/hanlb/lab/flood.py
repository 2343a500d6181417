"""A bounded SYN flood from spoofed sources, for the lab's miss-path test.

    python -m hanlb.lab.flood --target 10.93.0.1:80 --rate 20000 --seconds 5 \\
        --sources 10.96.0.0/16 --max-packets 200000

Runs inside a lab client namespace. It sends TCP SYNs whose source addresses
are drawn from ``--sources`` (a range no lab host owns, so the SYN-ACKs die at
the lab router, which has no route for it) to one lab VIP, at most
``--max-packets`` packets and for at most ``--seconds``, then stops by itself
and prints one JSON object: ``{"sent", "seconds", "pps", "errors"}``.

It refuses targets outside the lab's VIP range (10.93.0.0/24): it is a test
tool for namespaces the lab made, never for any other address.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import struct
import time

from ..flow import internet_checksum

__all__ = ["build_syn", "flood"]

LAB_VIPS = ipaddress.IPv4Network("10.93.0.0/24")


def build_syn(src: bytes, sport: int, dst: bytes, dport: int, seq: int) -> bytes:
    """An IPv4 packet carrying a TCP SYN, checksums filled in."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
    csum = internet_checksum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:]
    return ip + tcp


def flood(
    target: str, port: int, rate: float, seconds: float, sources: str, max_packets: int
) -> dict[str, object]:
    dst_addr = ipaddress.IPv4Address(target)
    if dst_addr not in LAB_VIPS:
        raise SystemExit(f"flood: {target} is not a lab VIP (10.93.0.0/24)")
    net = ipaddress.IPv4Network(sources)
    rng = random.Random(1)
    dst = dst_addr.packed
    # A pool of distinct packets, cycled (building each one costs more than sending).
    pool = [
        build_syn(
            (net.network_address + rng.randrange(1, net.num_addresses - 1)).packed,
            rng.randrange(1024, 65535),
            dst,
            port,
            rng.getrandbits(32),
        )
        for _ in range(min(max_packets, 50_000))
    ]
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    sent = errors = 0
    start = time.monotonic()
    deadline = start + seconds
    batch = max(1, int(rate / 1000))  # packets per millisecond tick
    next_tick = start
    dest = (target, 0)
    while sent < max_packets:
        now = time.monotonic()
        if now >= deadline:
            break
        if now < next_tick:
            time.sleep(next_tick - now)
        for _ in range(min(batch, max_packets - sent)):
            try:
                sock.sendto(pool[sent % len(pool)], dest)
            except OSError:
                errors += 1
            sent += 1
        next_tick += batch / rate
    elapsed = time.monotonic() - start
    sock.close()
    return {
        "sent": sent,
        "seconds": elapsed,
        "pps": sent / elapsed if elapsed else 0.0,
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="VIP:PORT inside the lab")
    parser.add_argument("--rate", type=float, default=10000.0, help="packets per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sources", default="10.96.0.0/16")
    parser.add_argument("--max-packets", type=int, default=200_000)
    args = parser.parse_args()
    addr, _, port = args.target.rpartition(":")
    result = flood(addr, int(port), args.rate, args.seconds, args.sources, args.max_packets)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
