"""``hanlb lab demo`` (what ``make demo`` runs): real traffic through a real lab.

1. builds the lab: 2 clients, the router with the LB-aware switch, 3 forwarders
   (kernel datapath), 1 classifier, 2 session-tracker nodes, 4 hosts;
2. sends 2,000 HTTP connections from both clients and shows how they spread over
   the hosts, how many times the classifier was asked (once per connection) and
   how many packets the kernel forwarded without asking anyone;
3. opens 100 long-lived streams, kills a forwarder under them, and shows the
   switch removing it, its flows re-plumbed on the survivors to the same hosts,
   and every stream finishing;
4. tears the lab down, also on failure or Ctrl-C.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import click

from .. import admin
from .topology import SOCK_DIR, Lab, down

FORWARDERS = ("fw1", "fw2", "fw3")


def _q(name: str, path: str = "/status") -> Any:
    return admin.query(str(SOCK_DIR), name, path)


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise click.ClickException(f"demo: {what} did not happen within {timeout:g} s")


def _bar(n: int, total: int, width: int = 40) -> str:
    return "#" * round(width * n / total) if total else ""


def _balancing(lab: Lab) -> bool:
    click.secho("\n== 1. Balancing: 2,000 HTTP connections from 2 clients ==", bold=True)
    results: list[dict[str, Any]] = []
    threads = [
        threading.Thread(
            target=lambda ns=ns: results.append(
                lab.load(ns, "http", connections=1000, concurrency=16, timeout=10)
            )
        )
        for ns in lab.clients
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    served: Counter[str] = Counter()
    for r in results:
        served.update(r["served_by"])
    ok = sum(r["ok"] for r in results)
    failed = sum(r["failed"] for r in results)
    total = sum(served.values())
    for host in sorted(served):
        n = served[host]
        click.echo(f"  {host}: {n:5d}  {n / total:6.1%}  {_bar(n, total)}")
    rate = sum(r["conn_per_s"] for r in results)
    click.echo(f"  {ok} connections ok, {failed} failed, {rate:.0f} connections/s")
    cl = _q("cl1")["counters"]
    stats = [_q(f)["datapath_stats"] for f in FORWARDERS]
    per_fw = ", ".join(f"{f} {_q(f)['counters'].get('classify_requests', 0)}" for f in FORWARDERS)
    click.echo(
        f"  classifier: {cl.get('classify_requests', 0)} classify requests "
        f"({cl.get('new_flows', 0)} new flows), spread by ECMP over forwarders: {per_fw}"
    )
    click.echo(
        f"  kernel fast path: {sum(s['forwarded'] for s in stats)} packets forwarded by "
        f"nftables without the forwarder process; {sum(s['misses'] for s in stats)} "
        "sent to the process (one SYN per connection)"
    )
    return failed == 0


def _failover(lab: Lab) -> bool:
    click.secho("\n== 2. Failover: a forwarder dies under 100 live streams ==", bold=True)
    # the balancing phase's routes linger 2 s after their connections closed
    _wait(lambda: sum(_q(f)["routes"] for f in FORWARDERS) == 0, 15, "route tables drained")
    click.echo("  route tables drained after the 2,000 connections closed")
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
    _wait(lambda: sum(len(_q(f, "/routes")) for f in FORWARDERS) >= 100, 15, "streams routed")
    carried = {r["client"]: r["host"] for r in _q("fw2", "/routes") if r["state"] == "plumbed"}
    click.echo(f"  fw2 carries {len(carried)} of the streams; killing fw2 (process and link)")
    lab.kill("fw2")
    _wait(lambda: "fw2" not in _q("switch")["live"], 5, "the switch removing fw2")
    fw2 = _q("switch")["forwarders"]["fw2"]
    click.echo(
        f"  switch: fw2 suspected {fw2['last_detection_time'] * 1000:.0f} ms after its last "
        f"probe reply, out of ECMP after {fw2['last_removal_time'] * 1000:.0f} ms"
    )

    def moved() -> int:
        now = {r["client"]: r["host"] for f in ("fw1", "fw3") for r in _q(f, "/routes")}
        return sum(1 for c, h in carried.items() if now.get(c) == h)

    _wait(lambda: moved() == len(carried), 10, "fw2's flows re-plumbed")
    click.echo(
        f"  {moved()}/{len(carried)} of fw2's flows re-plumbed on fw1/fw3 with the same host"
    )
    for t in threads:
        t.join()
    complete = sum(r["complete"] for r in results)
    failed = sum(r["failed"] for r in results)
    stalls = sorted(c["max_stall"] for r in results for c in r["connections"])
    click.echo(
        f"  streams: {complete} finished, {failed} lost; longest gap in any stream "
        f"{stalls[-1] * 1000:.0f} ms (p50 {stalls[len(stalls) // 2] * 1000:.0f} ms)"
    )
    return failed == 0


@click.command(name="demo")
def demo() -> None:
    """Build the lab, run real traffic, show balancing and a failover, tear down."""
    click.secho("building the lab (namespaces, veth, bridge, nftables)...", bold=True)
    ok = False
    try:
        lab = Lab.up(clients=2, forwarders=3, classifiers=1, hosts=4, trackers=2, switch=True)
        lab.wait_ready(30)
        _wait(lambda: all(_q(f).get("classifier") for f in FORWARDERS), 20, "forwarders up")
        _wait(lambda: len(_q("switch")["live"]) == 3, 10, "switch up")
        status = lab.status()
        for v in status["vips"]:
            click.echo(f"  VIP {v['address']}:{v['port']} ({v['mode']}, {v['application']})")
        click.echo(
            "  components: "
            + ", ".join(f"{c['name']}" for c in status["components"] if c["role"] != "httpd")
        )
        ok = _balancing(lab) and _failover(lab)
    finally:
        click.secho("\ntearing the lab down", bold=True)
        down()
    if not ok:
        raise click.ClickException("demo: some connections failed (see above)")
    click.secho("demo finished: no connection lost", fg="green", bold=True)
