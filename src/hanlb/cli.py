"""The ``hanlb`` command: run components, drive the lab, query running components."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from . import admin
from .config import ClusterConfig, ConfigError, load_config
from .lab.cli import lab
from .lab.demo import demo as lab_demo

ROLES = ("forwarder", "classifier", "switch", "tracker", "handler", "agent", "router")
LAB_CONFIG = "/run/hanlb/lab/cluster.toml"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hanlb")
def main() -> None:
    """hanlb: a highly available network load balancer."""


main.add_command(lab)
lab.add_command(lab_demo)


def _load(path: str) -> ClusterConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _local_addresses() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {a.get("IFA_ADDRESS") for a in ipr.get_addr(family=2)} - {None}


def placed_here(config: ClusterConfig) -> list[tuple[str, str]]:
    """Components whose configured address is on this machine."""
    local = _local_addresses()
    found = [("tracker", t.name) for t in config.trackers if t.endpoint[0] in local]
    found += [("handler", h.name) for h in config.handlers if h.endpoint[0] in local]
    found += [("classifier", c.name) for c in config.classifiers if c.endpoint[0] in local]
    found += [("forwarder", f.name) for f in config.forwarders if f.address in local]
    found += [("router", r.name) for r in config.routers if r.endpoint[0] in local]
    found += [("agent", h.name) for h in config.hosts if h.address in local]
    return found


def _service(config: ClusterConfig, role: str, name: str) -> Any:
    if role == "switch":
        from .switch.service import SwitchService

        if name != config.switch.name:
            raise KeyError(f"the switch is named {config.switch.name!r} in the config")
        return SwitchService(config)
    if role == "tracker":
        from .tracker.service import TrackerService

        return TrackerService(config, name)
    if role == "handler":
        from .health.handler import HandlerService

        return HandlerService(config, name)
    if role == "router":
        from .router.service import RouterService

        if name not in {r.name for r in config.routers}:
            raise KeyError(f"no router named {name!r}")
        return RouterService(config, name)
    if role == "agent":
        from .health.agent import AgentService

        config.host(name)
        return AgentService(config, name)
    if role == "forwarder":
        from .forwarder.service import ForwarderService

        config.forwarder(name)
        return ForwarderService(config, name)
    from .classifier.service import ClassifierService

    config.classifier(name)
    return ClassifierService(config, name)


def _run_forever(coro: Coroutine[Any, Any, Any], uvloop_ok: bool = True) -> None:
    """Run until SIGTERM/SIGINT. uvloop unless ``uvloop_ok`` is False: pyroute2's
    async netlink sockets (the switch) need the standard event loop."""
    runner: Any = asyncio.run
    if uvloop_ok:
        import uvloop

        runner = uvloop.run

    async def main_task() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await coro

    runner(main_task())


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--role", type=click.Choice(ROLES))
@click.option("--name")
@click.option("-v", "--verbose", is_flag=True)
def run(config_path: str, role: str | None, name: str | None, verbose: bool) -> None:
    """Run one component (--role and --name), or every component the config
    places on this machine (by address).

    Roles: forwarder, classifier, switch (the LB-aware switch, in the router),
    tracker (a session-tracker node), handler (a health and load handler) and
    agent (a host agent; --name is the host's name) and router (an L7 request
    router)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    config = _load(config_path)
    if (role is None) != (name is None):
        raise click.UsageError("--role and --name go together")
    wanted = [(role, name)] if role and name else placed_here(config)
    if not wanted:
        raise click.ClickException("the config places no component on this machine")
    try:
        services = [_service(config, r, n) for r, n in wanted]
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from None

    async def all_services() -> None:
        await asyncio.gather(*(s.run() for s in services))

    _run_forever(all_services(), uvloop_ok=all(r != "switch" for r, _ in wanted))


def _ctl_config(config_path: str | None) -> ClusterConfig:
    path = config_path or (LAB_CONFIG if Path(LAB_CONFIG).exists() else None)
    if path is None:
        raise click.UsageError("give --config (no lab is running)")
    return _load(path)


@main.group()
def ctl() -> None:
    """Query running components through their admin sockets."""


def _query(config: ClusterConfig, name: str, path: str) -> Any:
    try:
        return admin.query(config.cluster.run_dir, name, path)
    except OSError as exc:
        raise click.ClickException(f"{name}: {exc}") from None


@ctl.command()
@click.option("--forwarder", "name", required=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def routes(name: str, config_path: str | None, as_json: bool) -> None:
    """A forwarder's local route table."""
    config = _ctl_config(config_path)
    rows = _query(config, name, "/routes")
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'client':<22} {'vip':<20} {'host':<10} {'state':<8} packets")
    for r in rows:
        click.echo(
            f"{r['client']:<22} {r['vip']:<20} {r['host']:<10} {r['state']:<8} {r['packets']}"
        )
    click.echo(f"{len(rows)} routes")


@ctl.command()
@click.argument("name")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
def status(name: str, config_path: str | None) -> None:
    """A component's status and counters (JSON)."""
    config = _ctl_config(config_path)
    click.echo(json.dumps(_query(config, name, "/status"), indent=1))


@ctl.group()
def pool() -> None:
    """Change an application's pool at run time, on every classifier and handler.

    Hosts must be declared in the config's [[hosts]]. Established connections keep
    their host; new ones follow the new pool. Edit the config too to keep the change
    across restarts."""


def _pool_change(config: ClusterConfig, params: dict[str, str]) -> None:
    targets = [c.name for c in config.classifiers] + [h.name for h in config.handlers]
    failed = False
    for name in targets:
        try:
            pool = admin.query(config.cluster.run_dir, name, "/pool", method="POST", params=params)
        except OSError as exc:
            failed = True
            click.echo(f"{name}: FAILED: {exc}", err=True)
            continue
        members = ", ".join(f"{h}:{w}" for h, w in pool.items())
        click.echo(f"{name}: {params['app']} = [{members}]")
    if failed:
        raise click.ClickException("the pool change did not reach every component")


@pool.command(name="add")
@click.option("--app", required=True)
@click.option("--host", required=True)
@click.option("--weight", default=1, show_default=True, type=click.IntRange(0, 1000))
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
def pool_add(app: str, host: str, weight: int, config_path: str | None) -> None:
    """Add HOST to APP's pool (or change its weight)."""
    params = {"op": "add", "app": app, "host": host, "weight": str(weight)}
    _pool_change(_ctl_config(config_path), params)


@pool.command(name="remove")
@click.option("--app", required=True)
@click.option("--host", required=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
def pool_remove(app: str, host: str, config_path: str | None) -> None:
    """Take HOST out of APP's pool: no new connections go to it."""
    _pool_change(_ctl_config(config_path), {"op": "remove", "app": app, "host": host})


@ctl.command()
@click.option("--handler", "name", help="Which handler (default: the first that answers).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def hosts(name: str | None, config_path: str | None, as_json: bool) -> None:
    """Each host's health, load and tokens, as a health and load handler sees them."""
    config = _ctl_config(config_path)
    names = [name] if name else [h.name for h in config.handlers]
    if not names:
        raise click.ClickException("the config has no health and load handlers")
    view: Any = None
    source = ""
    for n in names:
        try:
            view, source = admin.query(config.cluster.run_dir, n, "/hosts"), n
            break
        except OSError as exc:
            click.echo(f"{n}: {exc}", err=True)
    if view is None:
        raise click.ClickException("no handler answered")
    if as_json:
        click.echo(json.dumps({"handler": source, "hosts": view}, indent=1))
        return
    click.echo(f"from handler {source}")
    click.echo(
        f"{'host':<8} {'alive':<6} {'app':<8} {'up':<5} {'conns':>6} {'cpu':>5} "
        f"{'load':>5} {'weight':>6} {'tokens':>6}"
    )
    for host, h in sorted(view.items()):
        for app, e in sorted(h.get("endpoints", {}).items()):
            click.echo(
                f"{host:<8} {h.get('alive')!s:<6} {app:<8} {e['up']!s:<5} "
                f"{e['active_connections']:>6} {e['cpu']:>5.2f} {e['app_load']:>5.2f} "
                f"{e['weight']:>6} {e['tokens']:>6}"
            )


@ctl.command()
@click.option("--host", "host", help="Only entries placed on this host.")
@click.option("--forwarder", "forwarder", help="Only flows carried by this forwarder.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def sessions(
    host: str | None, forwarder: str | None, config_path: str | None, as_json: bool
) -> None:
    """Entries of the session-tracking table (a bulk query to the tracker nodes).

    Runs where the tracker nodes are reachable (in the lab: `ip netns exec hl-cl1`)."""
    config = _ctl_config(config_path)
    if not config.trackers:
        raise click.ClickException("the config has no session trackers")
    by, value = ("host", host) if host else ("forwarder", forwarder) if forwarder else ("all", "")

    async def bulk() -> tuple[list[Any], bool]:
        from .tracker.client import AsyncTrackerClient

        client = AsyncTrackerClient(config, name="ctl")
        try:
            done = await client.bulk(by, value or "")
            return done.entries, done.complete
        finally:
            client.close()

    entries, complete = asyncio.run(bulk())
    rows = [e.to_json() for e in entries]
    if as_json:
        click.echo(json.dumps({"complete": complete, "entries": rows}, indent=1))
        return
    for r in rows:
        click.echo(f"{r['key']:<48} {r['host']:<8} {r['forwarder']:<8} {r['version']}")
    click.echo(
        f"{len(rows)} entries" + ("" if complete else " (INCOMPLETE: a node did not answer)")
    )


@ctl.command()
@click.argument("config_path", type=click.Path(dir_okay=False))
def check(config_path: str) -> None:
    """Validate a config file; every error names its field."""
    config = _load(config_path)
    click.echo(
        f"{config_path}: ok ({len(config.applications)} applications, {len(config.hosts)} hosts, "
        f"{len(config.forwarders)} forwarders, {len(config.classifiers)} classifiers)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
