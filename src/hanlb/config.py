"""Cluster configuration: one TOML file describes the whole cluster.

It names the applications (VIP, port, protocol, pool of hosts with weights), the
components and their addresses, the timers and the cluster key. `load_config`
validates it; every error names the field (a dotted path such as
``applications[0].pool[1].weight``) and the reason, and nothing half-loaded is
returned.  See ``examples/cluster.toml`` for a commented example.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .router.config import RouterSettings

__all__ = [
    "Application",
    "ClassifierConfig",
    "ClusterConfig",
    "ConfigError",
    "ForwarderConfig",
    "HostConfig",
    "PoolMember",
    "Timers",
    "load_config",
    "parse_config",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"
_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")

Name = Annotated[str, Field(pattern=_NAME)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=86400)]


class ConfigError(ValueError):
    """The configuration is invalid. ``problems`` lists ``(field, reason)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  {field}: {reason}" for field, reason in problems)
        super().__init__(f"{source} is invalid:\n{lines}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IPv4 address") from exc


def _endpoint(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not ADDRESS:PORT")
    return _ipv4(host), int(port)


class Timers(_Model):
    """Every timer of the data path and control plane, in seconds."""

    route_linger: Seconds = 2.0
    """After a FIN or RST from the client, how long the route stays before deletion."""
    route_idle_timeout: Seconds = 120.0
    """A route that carries no packet for this long is deleted."""
    sweep_interval: Seconds = 0.5
    """How often a forwarder looks for routes to delete."""
    liveness_interval: Seconds = 0.05
    """Liveness probe interval between components."""
    liveness_misses: Annotated[int, Field(ge=1, le=100)] = 3
    """Missed probes after which a peer is declared dead."""
    classify_timeout: Seconds = 1.0
    """A held first packet whose route has not come by then is dropped (the client retries)."""
    reconnect_interval: Seconds = 0.2
    """Delay between attempts to reach a peer."""


class HealthCheck(_Model):
    """How a host agent probes one application endpoint."""

    kind: Literal["http", "https", "tcp"] = "http"
    """``http``/``https``: GET ``path``, expect ``expect_status`` (https does not
    verify the certificate); ``tcp``: the port accepts a connection."""
    path: str = "/health"
    expect_status: Annotated[int, Field(ge=100, le=599)] = 200
    interval: Seconds = 0.2
    timeout: Seconds = 0.5
    rise: Annotated[int, Field(ge=1, le=100)] = 2
    """Consecutive passing probes before an endpoint counts as up."""
    fall: Annotated[int, Field(ge=1, le=100)] = 2
    """Consecutive failing probes before an endpoint counts as down."""


class HealthSettings(_Model):
    """Health and load handling (claims 6-7, 14, 27, 35-42, 67-74)."""

    heartbeat_interval: Seconds = 0.2
    heartbeat_misses: Annotated[int, Field(ge=1, le=100)] = 3
    """Heartbeats missed before a handler marks all of a host's endpoints down."""
    allotment_tokens: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """Tokens per application in one allotment, spread over its endpoints."""
    allotment_refresh: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """A classifier asks for a new allotment when this fraction is used."""
    allotment_ttl: Seconds = 5.0
    """An allotment not refreshed within this time is no longer used."""


class TrackerSettings(_Model):
    """The distributed session-tracking table (claims 30-32, 46, 49, 65-66)."""

    replication: Annotated[int, Field(ge=1, le=5)] = 2
    flow_ttl: Seconds = 3600.0
    """Expiry of a transport-flow entry that is not deleted or refreshed."""
    session_ttl: Seconds = 3600.0
    """Expiry of a higher-level session entry (TLS session, HTTP cookie)."""
    anti_entropy_interval: Seconds = 1.0


class SwitchSettings(_Model):
    """The LB-aware switch: ECMP over forwarders with liveness probes (claims 3, 5)."""

    name: Name = "switch"
    interface: str = "lan0"
    """The router's interface towards the forwarders."""
    probe_interval: Seconds = 0.05
    probe_misses: Annotated[int, Field(ge=1, le=100)] = 3
    """Missed probes after which a forwarder's next hop is removed."""
    rise: Annotated[int, Field(ge=1, le=100)] = 3
    """Answered probes in a row before a removed forwarder is restored."""
    resilient_buckets: Annotated[int, Field(ge=0, le=65535)] = 128
    """Buckets of the resilient next-hop group; 0 uses a plain multipath route."""


class NodeConfig(_Model):
    """A component that listens on ADDRESS:PORT (classifier, tracker node, HL
    handler, request router)."""

    name: Name
    listen: str
    admin: str | None = None

    @field_validator("listen", "admin")
    @classmethod
    def _ep(cls, v: str | None) -> str | None:
        if v is not None:
            _endpoint(v)
        return v

    @property
    def endpoint(self) -> tuple[str, int]:
        return _endpoint(self.listen)


class FirewallRule(_Model):
    """One allow/deny rule; the first rule that matches a new connection decides."""

    action: Literal["allow", "deny"]
    source: str = "0.0.0.0/0"
    """Client address prefix (IPv4 CIDR)."""
    ports: list[Port] = Field(default_factory=list)
    """Destination ports it applies to; empty means any."""

    @field_validator("source")
    @classmethod
    def _prefix(cls, v: str) -> str:
        try:
            return str(ipaddress.IPv4Network(v, strict=False))
        except ValueError as exc:
            raise ValueError(f"{v!r} is not an IPv4 prefix like 10.0.0.0/8") from exc


class FirewallPolicy(_Model):
    """What new connections an application admits (claims 33-34, 60).

    A refused connection gets a *drop route*: its later packets are dropped in
    the forwarder's datapath and never reach a classifier again."""

    default: Literal["allow", "deny"] = "allow"
    rules: list[FirewallRule] = Field(default_factory=list)
    new_per_source_per_second: Annotated[float, Field(gt=0)] | None = None
    """New connections a client address may open per second (token bucket)."""
    new_burst: Annotated[int, Field(ge=1)] = 20
    """Bucket size for ``new_per_source_per_second``."""
    concurrent_per_source: Annotated[int, Field(ge=1)] | None = None
    """Connections one client address may hold open at once (per classifier)."""
    drop_ttl: Seconds = 10.0
    """How long a drop route stays in the forwarder."""


class HostConfig(_Model):
    name: Name
    address: str
    """The host's own address on the server LAN."""
    mac: str
    """The MAC the forwarders write as the destination (L2 direct server return)."""
    agent: str | None = None
    """ADDRESS:PORT where the host agent serves its admin endpoint; optional."""
    applications: list[Name] | None = None
    """Applications this host runs, which its agent probes. Default: those whose
    pool names the host. Name them for a host that may join a pool at run time."""

    _addr = field_validator("address")(classmethod(lambda cls, v: _ipv4(v)))

    @field_validator("agent")
    @classmethod
    def _agent(cls, v: str | None) -> str | None:
        if v is not None:
            _endpoint(v)
        return v

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        if not _MAC.match(v):
            raise ValueError(f"{v!r} is not a MAC address like 02:00:00:00:00:01")
        return v.lower()


class PoolMember(_Model):
    host: Name
    weight: Annotated[int, Field(ge=0, le=1000)] = 1


class Application(_Model):
    name: Name
    vip: str
    port: Port
    protocol: Literal["tcp"] = "tcp"
    mode: Literal["l4", "http"] = "l4"
    selection: Literal["swrr"] = "swrr"
    """How a new flow's host is chosen: smooth weighted round robin."""
    mid_flow_miss: Literal["drop"] = "drop"
    """Answer to a packet of an unknown flow that is not a new connection (no SYN)."""
    pool: list[PoolMember] = Field(min_length=1)
    health_check: HealthCheck = HealthCheck()
    strategy: Literal["round-robin", "linear", "greatest"] = "round-robin"
    """How a classifier spends health/load tokens (claims 35-42)."""
    firewall: FirewallPolicy = FirewallPolicy()

    _vip = field_validator("vip")(classmethod(lambda cls, v: _ipv4(v)))

    @field_validator("pool")
    @classmethod
    def _unique_hosts(cls, v: list[PoolMember]) -> list[PoolMember]:
        names = [m.host for m in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"host listed twice: {', '.join(sorted(dup))}")
        if not any(m.weight for m in v):
            raise ValueError("every weight is 0: nothing could be chosen")
        return v


class ForwarderConfig(_Model):
    name: Name
    address: str
    """This forwarder's address on the server LAN (the router's next hop)."""
    interface: str = "lan0"
    """The LAN interface: packets arrive on it and leave on it (L2 DSR)."""
    datapath: Literal["kernel", "userspace", "memory"] = "kernel"
    miss_device: str = "hlmiss0"
    """TAP device the kernel datapath sends table misses to."""
    classifiers: list[Name] = Field(default_factory=list)
    """Preferred classifiers in order; empty means every classifier, spread by name."""
    admin: str | None = None
    """Optional ADDRESS:PORT for the admin HTTP endpoint (a unix socket is always served)."""
    probe_port: Port = 7401
    """UDP port where the forwarder answers the LB-aware switch's liveness probes."""
    miss_limit: Annotated[int, Field(ge=0)] = 500
    """Packets per second the kernel datapath lets through to the miss path from
    all client addresses that have not completed a handshake through this
    forwarder recently (0: no limit). Over it, such packets are dropped in the
    kernel and counted; TCP retransmits a legitimate SYN."""
    miss_limit_per_source: Annotated[int, Field(ge=0)] = 50
    """Packets per second one such untrusted client address may send to the
    miss path (0: no limit)."""
    trusted_ttl: Seconds = 300.0
    """A client address that completed a handshake through this forwarder is
    exempt from ``miss_limit`` for this long after its last routed packet."""

    _addr = field_validator("address")(classmethod(lambda cls, v: _ipv4(v)))

    @field_validator("admin")
    @classmethod
    def _admin(cls, v: str | None) -> str | None:
        if v is not None:
            _endpoint(v)
        return v


class ClassifierConfig(NodeConfig):
    """A classifier: ``listen`` is where forwarders connect for route plumbing."""


class ClusterSection(_Model):
    name: Name = "hanlb"
    key: str = Field(min_length=16)
    """Shared cluster key for HMAC-SHA256 on every control message (>= 16 characters)."""
    run_dir: str = "/run/hanlb"
    """Unix admin sockets live here: <run_dir>/<component>.sock."""


class ClusterConfig(_Model):
    cluster: ClusterSection
    timers: Timers = Timers()
    health: HealthSettings = HealthSettings()
    tracker: TrackerSettings = TrackerSettings()
    switch: SwitchSettings = SwitchSettings()
    hosts: list[HostConfig] = Field(min_length=1)
    applications: list[Application] = Field(min_length=1)
    forwarders: list[ForwarderConfig] = Field(default_factory=list)
    classifiers: list[ClassifierConfig] = Field(default_factory=list)
    trackers: list[NodeConfig] = Field(default_factory=list)
    handlers: list[NodeConfig] = Field(default_factory=list)
    """Health and load handlers."""
    router: RouterSettings = RouterSettings()
    """The L7 request routers' behaviour (claims 50-55)."""
    routers: list[NodeConfig] = Field(default_factory=list)
    """Request routers: where each listens for client connections."""

    @model_validator(mode="after")
    def _cross_check(self) -> ClusterConfig:
        problems: list[tuple[str, str]] = []
        kinds = ("hosts", "applications", "forwarders", "classifiers", "trackers", "handlers")
        for kind in (*kinds, "routers"):
            seen: set[str] = set()
            for i, item in enumerate(getattr(self, kind)):
                if item.name in seen:
                    problems.append((f"{kind}[{i}].name", f"duplicate name {item.name!r}"))
                seen.add(item.name)
        hosts = {h.name for h in self.hosts}
        listeners: set[tuple[str, int]] = set()
        for i, app in enumerate(self.applications):
            if (app.vip, app.port) in listeners:
                problems.append((f"applications[{i}].port", f"{app.vip}:{app.port} used twice"))
            listeners.add((app.vip, app.port))
            for j, member in enumerate(app.pool):
                if member.host not in hosts:
                    problems.append(
                        (f"applications[{i}].pool[{j}].host", f"no host named {member.host!r}")
                    )
        apps = {a.name for a in self.applications}
        for i, h in enumerate(self.hosts):
            for j, name in enumerate(h.applications or ()):
                if name not in apps:
                    problems.append(
                        (f"hosts[{i}].applications[{j}]", f"no application named {name!r}")
                    )
        classifiers = {c.name for c in self.classifiers}
        for i, fw in enumerate(self.forwarders):
            for j, name in enumerate(fw.classifiers):
                if name not in classifiers:
                    problems.append(
                        (f"forwarders[{i}].classifiers[{j}]", f"no classifier named {name!r}")
                    )
        if self.forwarders and not self.classifiers:
            problems.append(("classifiers", "forwarders need at least one classifier"))
        problems.extend(self.router.problems(self))
        if problems:
            raise ValueError("; ".join(f"{f}: {r}" for f, r in problems))
        return self

    # -- lookups ---------------------------------------------------------------

    def host_applications(self, name: str) -> list[Application]:
        """The applications host ``name`` runs (see ``HostConfig.applications``)."""
        host = self.host(name)
        if host.applications is not None:
            return [a for a in self.applications if a.name in host.applications]
        return [a for a in self.applications if any(m.host == name for m in a.pool)]

    def host(self, name: str) -> HostConfig:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host named {name!r}")

    def forwarder(self, name: str) -> ForwarderConfig:
        for f in self.forwarders:
            if f.name == name:
                return f
        raise KeyError(f"no forwarder named {name!r}")

    def classifier(self, name: str) -> ClassifierConfig:
        for c in self.classifiers:
            if c.name == name:
                return c
        raise KeyError(f"no classifier named {name!r}")

    def classifiers_for(self, forwarder: str) -> list[ClassifierConfig]:
        """The classifiers a forwarder uses, preferred first.

        Without an explicit list, forwarders are spread evenly: forwarder number i
        starts at classifier i mod n and falls back to the others in order.
        """
        fw = self.forwarder(forwarder)
        if fw.classifiers:
            return [self.classifier(n) for n in fw.classifiers]
        names = sorted(c.name for c in self.classifiers)
        index = sorted(f.name for f in self.forwarders).index(forwarder)
        start = index % len(names)
        return [self.classifier(n) for n in names[start:] + names[:start]]

    @property
    def key_bytes(self) -> bytes:
        return self.cluster.key.encode()


def pool_change(
    pools: dict[str, dict[str, int]], params: dict[str, str], hosts: set[str]
) -> tuple[str, dict[str, int]]:
    """Apply a run-time pool change (``hanlb ctl pool``) to ``pools`` and return the
    application and its new pool. ``params``: ``app``, ``host``, ``op`` (``add`` or
    ``remove``) and, for ``add``, an optional ``weight`` (default 1). Raises
    ``KeyError``/``ValueError`` naming what is wrong; ``pools`` is unchanged then."""
    app, host, op = params.get("app", ""), params.get("host", ""), params.get("op", "")
    if app not in pools:
        raise KeyError(f"no application named {app!r}")
    if host not in hosts:
        raise KeyError(f"no host named {host!r} in the configuration")
    pool = dict(pools[app])
    if op == "add":
        weight = int(params.get("weight", "1"))
        if not 0 <= weight <= 1000:
            raise ValueError(f"weight {weight} is not between 0 and 1000")
        pool[host] = weight
    elif op == "remove":
        if host not in pool:
            raise KeyError(f"{host!r} is not in the pool of {app!r}")
        del pool[host]
    else:
        raise ValueError(f"op must be add or remove, not {op!r}")
    if not any(pool.values()):
        raise ValueError(f"the pool of {app!r} would have no host with a weight above 0")
    pools[app] = pool
    return app, pool


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def parse_config(data: dict[str, object], source: str = "config") -> ClusterConfig:
    """Validate an already parsed TOML document."""
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as exc:
        problems: list[tuple[str, str]] = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "value_error" and ": " in msg and not err["loc"]:
                # cross-field problems carry their own field paths
                for part in msg.split("; "):
                    field, _, reason = part.partition(": ")
                    problems.append((field, reason))
                continue
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            problems.append((_loc(tuple(err["loc"])), msg))
        raise ConfigError(problems, source) from None


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate a TOML configuration file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError([("(file)", f"cannot read {p}: {exc.strerror}")], str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("(syntax)", str(exc))], str(p)) from None
    return parse_config(data, str(p))
