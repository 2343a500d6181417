"""``hanlb lab ...``: build, inspect, drive and tear down the namespace lab."""

from __future__ import annotations

import json
from typing import Any

import click

from .topology import Lab, LabError, down, status

__all__ = ["lab"]


def _fail(exc: LabError) -> None:
    raise click.ClickException(str(exc))


@click.group()
def lab() -> None:
    """Build and drive the namespace lab."""


@lab.command()
@click.option("--clients", default=2, show_default=True, type=click.IntRange(1, 250))
@click.option("--forwarders", default=2, show_default=True, type=click.IntRange(1, 19))
@click.option("--classifiers", default=1, show_default=True, type=click.IntRange(1, 69))
@click.option("--hosts", default=4, show_default=True, type=click.IntRange(1, 154))
@click.option(
    "--datapath", default="kernel", show_default=True, type=click.Choice(["kernel", "userspace"])
)
@click.option(
    "--trackers",
    default=0,
    show_default=True,
    type=click.IntRange(0, 9),
    help="Session-tracker nodes (own namespaces).",
)
@click.option(
    "--handlers",
    default=0,
    show_default=True,
    type=click.IntRange(0, 9),
    help="Health and load handlers; with any, every host runs a host agent.",
)
@click.option(
    "--spare-hosts",
    default=0,
    show_default=True,
    type=click.IntRange(0, 100),
    help="Hosts configured but in no pool (for `hanlb ctl pool add`).",
)
@click.option(
    "--routers",
    default=0,
    show_default=True,
    type=click.IntRange(0, 9),
    help="L7 request routers, behind a second VIP (10.93.0.2:80, mode http).",
)
@click.option(
    "--router-tls",
    is_flag=True,
    help="Routers terminate TLS with a self-signed certificate made at up "
    "(/run/hanlb/lab/tls/cert.pem); the L7 VIP is then 10.93.0.2:443.",
)
@click.option("--weights", default="", help="Pool weights, comma separated, one per host.")
@click.option(
    "--switch/--no-switch",
    default=True,
    show_default=True,
    help="Run the LB-aware switch in the router (it owns the VIP's ECMP route).",
)
@click.option(
    "--components/--no-components",
    default=True,
    show_default=True,
    help="Start forwarders and classifiers (host httpds always start).",
)
@click.option(
    "--wait",
    "wait",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds to wait for the lab to be ready (0: do not wait).",
)
def up(
    clients: int,
    forwarders: int,
    classifiers: int,
    hosts: int,
    datapath: str,
    trackers: int,
    handlers: int,
    spare_hosts: int,
    routers: int,
    router_tls: bool,
    weights: str,
    switch: bool,
    components: bool,
    wait: float,
) -> None:
    """Build the lab (tearing down any previous one) and start its processes."""
    try:
        parsed = tuple(int(w) for w in weights.split(",") if w.strip())
    except ValueError:
        raise click.BadParameter("weights are integers, comma separated") from None
    try:
        built = Lab.up(
            clients=clients,
            forwarders=forwarders,
            classifiers=classifiers,
            hosts=hosts,
            datapath="userspace" if datapath == "userspace" else "kernel",
            trackers=trackers,
            handlers=handlers,
            spare_hosts=spare_hosts,
            routers=routers,
            router_tls=router_tls,
            weights=parsed,
            switch=switch,
            start_components=components,
        )
        if wait > 0:
            built.wait_ready(wait)
    except LabError as exc:
        _fail(exc)
        return
    l7 = ""
    if routers:
        l7 = f", {routers} router(s)" + (
            f" (TLS, cert {built.state['tls']['cert']})" if router_tls else ""
        )
    click.echo(
        f"lab up: {clients} client(s), {forwarders} forwarder(s), {classifiers} "
        f"classifier(s), {hosts} host(s){l7}, datapath {datapath}; "
        f"config {built.state['config']}"
    )


@lab.command(name="down")
def down_cmd() -> None:
    """Stop every lab process and delete the lab namespaces (safe to repeat)."""
    try:
        down()
    except LabError as exc:
        _fail(exc)
    click.echo("lab down")


@lab.command(name="status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_cmd(as_json: bool) -> None:
    """Show the lab: namespaces, VIPs, components and whether they are alive."""
    st = status()
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    if not st["up"]:
        present = ", ".join(st["namespaces_present"]) or "none"
        click.echo(f"no lab is up (lab namespaces present: {present})")
        return
    sizes = st["sizes"]
    click.echo(
        f"lab up, datapath {st['datapath']}: " + ", ".join(f"{v} {k}" for k, v in sizes.items())
    )
    for vip in st["vips"]:
        click.echo(f"  vip {vip['address']}:{vip['port']} {vip['mode']} ({vip['application']})")
    click.echo(f"  clients: {' '.join(st['clients'])}")
    click.echo(f"  hosts:   {' '.join(st['hosts'])}")
    for comp in st["components"]:
        state = "alive" if comp["alive"] else ("not started" if comp["pid"] is None else "dead")
        click.echo(
            f"  {comp['role']:<10} {comp['name']:<6} {comp['netns']:<10} "
            f"pid {comp['pid']!s:<8} {state}"
        )


@lab.command()
@click.argument("name")
def kill(name: str) -> None:
    """SIGKILL a lab component (fw1, cl1, h1, ...)."""
    try:
        Lab.from_state().kill(name)
    except LabError as exc:
        _fail(exc)
    click.echo(f"killed {name}")


@lab.command()
@click.argument("name")
def start(name: str) -> None:
    """Start a lab component again with its original command."""
    try:
        pid = Lab.from_state().start(name)
    except LabError as exc:
        _fail(exc)
        return
    click.echo(f"started {name} (pid {pid})")


@lab.command()
@click.option("--client", default="hl-c1", show_default=True, help="Client namespace.")
@click.option(
    "--mode",
    default="http",
    show_default=True,
    type=click.Choice(["http", "stream", "upload", "probe"]),
)
@click.option("--address", default=None, help="Target address (default the VIP).")
@click.option("--port", default=None, type=int, help="Default 80 (5001 for upload).")
@click.option("--connections", default=None, type=int, help="http: total; stream: concurrent.")
@click.option("--concurrency", default=None, type=int)
@click.option("--seconds", default=None, type=float, help="stream/upload duration.")
@click.option("--timeout", default=None, type=float, help="Per connection, seconds.")
@click.option("--path", default=None)
@click.option("--targets", default=None, help="probe: comma-separated ADDRESS:PORT.")
def load(client: str, mode: str, **opts: Any) -> None:
    """Run the load generator inside a client namespace and print its JSON."""
    try:
        result = Lab.from_state().run_load(client, mode, **opts)
    except LabError as exc:
        _fail(exc)
        return
    click.echo(json.dumps(result))
