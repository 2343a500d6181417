"""The namespace lab: a real topology of network namespaces on one machine.

::

    hl-c<i> eth0 10.91.<i>.2 ── c<i> 10.91.<i>.1  hl-router  lan0 10.92.0.1 ─┐
                                  (ECMP: VIP/32 -> every forwarder)           │
    hl-fw<k>  lan0 10.92.0.<10+k>   ── p-fw<k> ──┐                            │
    hl-cl<k>  lan0 10.92.0.<30+k>   ── p-cl<k> ──┼── br0 in hl-lan ── p-router┘
    hl-h<k>   lan0 10.92.0.<100+k>  ── p-h<k>  ──┘   (VIP on lo, arp_ignore=1,
                                                       arp_announce=2)

The router spreads VIP traffic over the forwarders; forwarders send it on to a host at L2
(direct server return); hosts answer the client through the router. Every address lives
inside namespaces this module creates (all named ``hl-*``), nothing touches the root
namespace's network.

Files: ``/run/hanlb/lab/cluster.toml`` (the cluster config), ``state.json`` (what ``up``
built and started), ``logs/<name>.log`` (component and httpd output), ``tls/cert.pem`` and
``tls/key.pem`` (with ``router_tls``: the routers' self-signed certificate).

With ``routers=N``, request routers ``rt<k>`` (``hl-rt<k>``, 10.92.0.<60+k>) hold a second
VIP, 10.93.0.2, on their loopback: the L4 tier spreads it (application ``web-l7``, mode
http, port 80, or 443 with ``router_tls``) over them, and they proxy to application
``web`` on the hosts. Each router listens on every address, so it can also be reached
directly at its LAN address (benchmarks).

Usage::

    lab = Lab.up(clients=2, forwarders=2, classifiers=1, hosts=4, datapath="kernel")
    lab.wait_ready(30)
    result = lab.load("hl-c1", "http", port=80, connections=1000, concurrency=50)
    lab.kill("fw1"); lab.start("fw1")
    lab.down()

``Lab.load()`` on the class reads the state file of a running lab (same as
``Lab.from_state()``); ``lab.load(client_ns, mode, **opts)`` on an instance runs the load
generator (same as ``lab.run_load(...)``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, overload

from ..config import load_config

__all__ = [
    "CONFIG_FILE",
    "LAB_DIR",
    "LAB_NS_RE",
    "LOG_DIR",
    "NS_PREFIX",
    "STATE_FILE",
    "TLS_CERT",
    "TLS_KEY",
    "VIP",
    "Lab",
    "LabError",
    "LabSpec",
    "Node",
    "down",
    "hanlb_command",
    "lab_namespaces",
    "netns_exec",
    "plan",
    "render_config",
    "status",
]

LAB_DIR = Path("/run/hanlb/lab")
STATE_FILE = LAB_DIR / "state.json"
CONFIG_FILE = LAB_DIR / "cluster.toml"
LOG_DIR = LAB_DIR / "logs"
SOCK_DIR = LAB_DIR / "sock"
TLS_DIR = LAB_DIR / "tls"
TLS_CERT = TLS_DIR / "cert.pem"
"""The lab routers' self-signed certificate (``router_tls``), made by ``up`` with openssl."""
TLS_KEY = TLS_DIR / "key.pem"
TLS_NAME = "hanlb-lab"
"""The certificate's subject CN (and DNS name); its IP names are the L7 VIP and the routers."""
NETNS_DIR = Path("/run/netns")

NS_PREFIX = "hl-"
LAB_NS_RE = re.compile(
    r"hl-(lan|router|c[0-9]+|fw[0-9]+|cl[0-9]+|h[0-9]+|tr[0-9]+|hd[0-9]+|rt[0-9]+)"
)
LAN_NS = "hl-lan"
ROUTER_NS = "hl-router"
ROUTER_ADDRESS = "10.92.0.1"
ROUTER_MAC = "02:92:00:00:00:01"
LAN_PREFIX = 24
VIP = "10.93.0.1"
L7_VIP = "10.93.0.2"
"""The request routers' VIP: the L4 tier spreads it over the routers (mode http)."""
L7_APP = "web-l7"
CLASSIFIER_PORT = 7400
TRACKER_PORT = 7500
HANDLER_PORT = 7600
HTTP_PORT = 80
HTTPS_PORT = 443
SINK_PORT = 5001
APPLICATIONS: tuple[tuple[str, int, str], ...] = (
    ("web", HTTP_PORT, "l4"),
    ("sink", SINK_PORT, "l4"),
)

MAX_CLIENTS = 250
MAX_FORWARDERS = 19
MAX_CLASSIFIERS = 69
MAX_HOSTS = 154
MAX_TRACKERS = 9
MAX_HANDLERS = 9
MAX_ROUTERS = 9

Datapath = Literal["kernel", "userspace"]
Role = Literal["router", "forwarder", "classifier", "host", "tracker", "handler", "l7"]


class LabError(RuntimeError):
    """The lab could not be built, driven or queried."""


@dataclass(frozen=True, slots=True)
class Node:
    """A namespace attached to the server LAN."""

    name: str
    netns: str
    role: Role
    address: str
    mac: str


@dataclass(frozen=True, slots=True)
class LabSpec:
    """What a lab is made of.

    ``hosts`` are in every application's pool (with ``weights``, default 1 each);
    ``spare_hosts`` more are configured but in no pool, for run-time pool changes.
    ``trackers`` session-tracker nodes and ``handlers`` health-and-load handlers get
    their own namespaces; with handlers, every host also runs a host agent. With
    ``switch``, the LB-aware switch runs in the router and owns the VIP's ECMP route.
    """

    clients: int = 2
    forwarders: int = 2
    classifiers: int = 1
    hosts: int = 4
    datapath: Datapath = "kernel"
    trackers: int = 0
    handlers: int = 0
    spare_hosts: int = 0
    weights: tuple[int, ...] = ()
    switch: bool = False
    replication: int = 2
    routers: int = 0
    """L7 request routers (``hl-rt<k>``): hosts of a second VIP, mode http."""
    firewall: str = ""
    """The ``web`` application's firewall policy as an inline TOML table, e.g.
    ``{ rules = [{ action = "deny", source = "10.91.2.0/24" }] }``."""
    router_tls: bool = False
    """The routers terminate TLS with a self-signed lab certificate (``TLS_CERT``); the L7
    application and the routers listen on port 443 instead of 80."""

    @property
    def l7_port(self) -> int:
        """The port of the L7 application (and the routers' listeners)."""
        return HTTPS_PORT if self.router_tls else HTTP_PORT

    def check(self) -> None:
        for what, n, low, top in (
            ("clients", self.clients, 1, MAX_CLIENTS),
            ("forwarders", self.forwarders, 1, MAX_FORWARDERS),
            ("classifiers", self.classifiers, 1, MAX_CLASSIFIERS),
            ("hosts", self.hosts, 1, MAX_HOSTS - self.spare_hosts),
            ("trackers", self.trackers, 0, MAX_TRACKERS),
            ("handlers", self.handlers, 0, MAX_HANDLERS),
            ("routers", self.routers, 0, MAX_ROUTERS),
            ("spare_hosts", self.spare_hosts, 0, MAX_HOSTS - 1),
        ):
            if not low <= n <= top:
                raise LabError(f"{what} must be between {low} and {top}, not {n}")
        if self.datapath not in ("kernel", "userspace"):
            raise LabError(f"datapath must be kernel or userspace, not {self.datapath!r}")
        if self.weights and len(self.weights) != self.hosts:
            raise LabError(f"{len(self.weights)} weights for {self.hosts} hosts")
        if self.trackers and not 1 <= self.replication <= self.trackers:
            raise LabError(f"replication {self.replication} with {self.trackers} trackers")
        if self.router_tls and not self.routers:
            raise LabError("router_tls needs routers")


def plan(
    clients: int,
    forwarders: int,
    classifiers: int,
    hosts: int,
    trackers: int = 0,
    handlers: int = 0,
    routers: int = 0,
) -> list[Node]:
    """The LAN nodes of a lab of these sizes (router first, then fw, cl, h, tr, hd, rt)."""
    LabSpec(
        clients,
        forwarders,
        classifiers,
        hosts,
        trackers=trackers,
        handlers=handlers,
        routers=routers,
        replication=1,  # sizes only; Lab.up checks the replication factor
    ).check()
    nodes = [Node("router", ROUTER_NS, "router", ROUTER_ADDRESS, ROUTER_MAC)]
    for k in range(1, forwarders + 1):
        nodes.append(Node(f"fw{k}", f"hl-fw{k}", "forwarder", f"10.92.0.{10 + k}", _mac(0, 10 + k)))
    for k in range(1, classifiers + 1):
        nodes.append(
            Node(f"cl{k}", f"hl-cl{k}", "classifier", f"10.92.0.{30 + k}", _mac(0, 30 + k))
        )
    for k in range(1, hosts + 1):
        nodes.append(Node(f"h{k}", f"hl-h{k}", "host", f"10.92.0.{100 + k}", _mac(1, k)))
    for k in range(1, trackers + 1):
        nodes.append(Node(f"tr{k}", f"hl-tr{k}", "tracker", f"10.92.0.{40 + k}", _mac(0, 40 + k)))
    for k in range(1, handlers + 1):
        nodes.append(Node(f"hd{k}", f"hl-hd{k}", "handler", f"10.92.0.{50 + k}", _mac(0, 50 + k)))
    for k in range(1, routers + 1):
        nodes.append(Node(f"rt{k}", f"hl-rt{k}", "l7", f"10.92.0.{60 + k}", _mac(0, 60 + k)))
    return nodes


def _mac(hi: int, lo: int) -> str:
    return f"02:92:00:00:{hi:02x}:{lo:02x}"


# -- subprocess helpers ---------------------------------------------------------------


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _ip_batch(netns: str | None, lines: Sequence[str]) -> None:
    """Run ``ip`` commands (one per line, without the leading ``ip``) in one process."""
    if not lines:
        return
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    _run(argv, input="\n".join(lines) + "\n")


def _sysctl(netns: str, settings: Mapping[str, str | int]) -> None:
    args = [f"{k}={v}" for k, v in settings.items()]
    _run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", *args])


def _switch_only(netns: str) -> None:
    """Make the bridge in ``netns`` a plain L2 switch.

    Where ``br_netfilter`` is loaded (something on the machine loaded it on
    this one), every bridged IPv4 frame also runs the namespace's IP netfilter
    hooks (``net.bridge.bridge-nf-call-iptables`` = 1 is the default in a new
    namespace): a switch in a real network does nothing of the kind, and it
    costs each pass through the bridge (profiled: 7% of the CPU samples of one
    TCP upload). ``-e``: where the module is not loaded the keys do not exist
    and there is nothing to turn off.
    """
    keys = ("iptables", "ip6tables", "arptables")
    args = [f"net.bridge.bridge-nf-call-{k}=0" for k in keys]
    _run(["ip", "netns", "exec", netns, "sysctl", "-e", "-q", "-w", *args])


def netns_exec(netns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` of ``argv`` inside ``netns``; output captured as text by default."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("check", False)
    result: subprocess.CompletedProcess[str] = subprocess.run(
        ["ip", "netns", "exec", netns, *argv], **kwargs
    )
    return result


def lab_namespaces() -> list[str]:
    """Every lab namespace that exists now.

    Only names the lab itself makes (``hl-lan``, ``hl-router``, ``hl-c<i>``, ``hl-fw<k>``,
    ``hl-cl<k>``, ``hl-h<k>``): other ``hl-*`` namespaces (a test's private ones, say) are
    not the lab's to delete.
    """
    if shutil.which("ip") is None:
        return []
    out = _run(["ip", "netns", "list"], check=False)
    names = (line.split()[0] for line in out.splitlines() if line.strip())
    return sorted(n for n in names if LAB_NS_RE.fullmatch(n))


def hanlb_command() -> list[str]:
    """How to run the ``hanlb`` command: the executable next to this Python, one on PATH,
    or ``python -m hanlb.cli``."""
    sibling = Path(sys.executable).parent / "hanlb"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return [str(sibling)]
    found = shutil.which("hanlb")
    if found:
        return [found]
    return [sys.executable, "-m", "hanlb.cli"]


# -- processes ------------------------------------------------------------------------

# Popen objects of the processes this Python started, so they are reaped (no zombies)
# and never garbage-collected while running.
_children: dict[int, subprocess.Popen[bytes]] = {}
_exited: dict[int, int] = {}


def _spawn(netns: str, argv: Sequence[str], log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:
        out.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    _children[proc.pid] = proc
    return proc.pid


def _pid_alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        code = child.poll()
        if code is None:
            return True
        del _children[pid]
        _exited[pid] = code
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    return bool(fields) and fields[0] not in ("Z", "X")


def _pid_in_netns(pid: int, netns: str) -> bool:
    """Whether ``pid`` is the lab's process for ``netns`` (guards against recycled pids).

    True for a process this Python started and has not reaped (its pid cannot have been
    recycled), or one that lives in that namespace, or one that is still the
    ``ip netns exec <netns>`` about to enter it.
    """
    if pid in _children:
        return True
    for _ in range(50):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(NETNS_DIR / netns).st_ino:
                return True
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        if raw:
            return raw.split(b"\0")[1:4] == [b"netns", b"exec", netns.encode()]
        time.sleep(0.002)  # empty while an execve is in progress: look again
    return False


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
                return
        except ProcessLookupError:
            return
        os.kill(pid, sig)


def _wait_dead(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until every pid has exited; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if _pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if _pid_alive(p)]
    return alive


def _netns_pids(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns], check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


# -- config ---------------------------------------------------------------------------


def _toml_str(value: str) -> str:
    return json.dumps(value)


def render_config(
    nodes: Sequence[Node], datapath: Datapath, key: str, spec: LabSpec | None = None
) -> str:
    """The cluster TOML of a lab (see ``hanlb.config``)."""
    spec = spec or LabSpec(datapath=datapath)
    hosts = [n for n in nodes if n.role == "host"]
    in_pool = hosts[: len(hosts) - spec.spare_hosts]
    weights = spec.weights or (1,) * len(in_pool)
    lines = [
        "# Generated by `hanlb lab up`; rewritten by every `up`.",
        "[cluster]",
        'name = "hanlb-lab"',
        f"key = {_toml_str(key)}",
        f"run_dir = {_toml_str(str(SOCK_DIR))}",
        "",
    ]
    if spec.trackers:
        lines += ["[tracker]", f"replication = {spec.replication}", ""]
    if spec.switch:
        lines += ["[switch]", 'name = "switch"', 'interface = "lan0"', ""]
    l7 = [n for n in nodes if n.role == "l7"]
    if l7:
        lines += ["[router]", f"default_app = {_toml_str(APPLICATIONS[0][0])}"]
        if spec.router_tls:
            lines += [f"tls_cert = {_toml_str(str(TLS_CERT))}"]
            lines += [f"tls_key = {_toml_str(str(TLS_KEY))}"]
        lines += [""]
    host_apps = ", ".join(_toml_str(name) for name, _, _ in APPLICATIONS)
    for h in [*hosts, *l7]:
        lines += [
            "[[hosts]]",
            f"name = {_toml_str(h.name)}",
            f"address = {_toml_str(h.address)}",
            f"mac = {_toml_str(h.mac)}",
        ]
        if h not in in_pool and h.role == "host":  # a spare: runs the apps, in no pool
            lines += [f"applications = [{host_apps}]"]
        lines += [""]
    pool = ", ".join(
        f"{{ host = {_toml_str(h.name)}, weight = {w} }}"
        for h, w in zip(in_pool, weights, strict=True)
    )
    for name, port, mode in APPLICATIONS:
        lines += [
            "[[applications]]",
            f"name = {_toml_str(name)}",
            f"vip = {_toml_str(VIP)}",
            f"port = {port}",
            f"mode = {_toml_str(mode)}",
            f"pool = [{pool}]",
        ]
        if port == SINK_PORT:  # the sink speaks no HTTP: check that it accepts
            lines += ['health_check = { kind = "tcp" }']
        if spec.firewall and name == APPLICATIONS[0][0]:
            lines += [f"firewall = {spec.firewall}"]
        lines += [""]
    if l7:
        routers_pool = ", ".join(f"{{ host = {_toml_str(r.name)}, weight = 1 }}" for r in l7)
        lines += [
            "[[applications]]",
            f"name = {_toml_str(L7_APP)}",
            f"vip = {_toml_str(L7_VIP)}",
            f"port = {spec.l7_port}",
            'mode = "http"',
            f"pool = [{routers_pool}]",
        ]
        if spec.router_tls:
            lines += ['health_check = { kind = "https" }']
        lines += [""]
        for r in l7:
            # Every address: VIP traffic arrives on the VIP (on lo), and a benchmark can
            # reach one router at its own LAN address.
            lines += [
                "[[routers]]",
                f"name = {_toml_str(r.name)}",
                f"listen = {_toml_str(f'0.0.0.0:{spec.l7_port}')}",
                "",
            ]
    for n in nodes:
        if n.role == "forwarder":
            lines += [
                "[[forwarders]]",
                f"name = {_toml_str(n.name)}",
                f"address = {_toml_str(n.address)}",
                'interface = "lan0"',
                f"datapath = {_toml_str(datapath)}",
                "",
            ]
    for role, section, port in (
        ("classifier", "classifiers", CLASSIFIER_PORT),
        ("tracker", "trackers", TRACKER_PORT),
        ("handler", "handlers", HANDLER_PORT),
    ):
        for n in nodes:
            if n.role == role:
                lines += [
                    f"[[{section}]]",
                    f"name = {_toml_str(n.name)}",
                    f"listen = {_toml_str(f'{n.address}:{port}')}",
                    "",
                ]
    return "\n".join(lines)


def _make_certificate(nodes: Sequence[Node]) -> None:
    """A self-signed certificate and key for the routers (``TLS_CERT``, ``TLS_KEY``), valid
    for ``TLS_NAME``, the L7 VIP and every router's LAN address; made with ``openssl``."""
    if shutil.which("openssl") is None:
        raise LabError("router_tls needs 'openssl' on PATH")
    TLS_DIR.mkdir(parents=True, exist_ok=True)
    names = [f"DNS:{TLS_NAME}", f"IP:{L7_VIP}"]
    names += [f"IP:{n.address}" for n in nodes if n.role == "l7"]
    _run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "30",
            "-subj",
            f"/CN={TLS_NAME}",
            "-addext",
            f"subjectAltName={','.join(names)}",
            "-keyout",
            str(TLS_KEY),
            "-out",
            str(TLS_CERT),
        ]
    )
    TLS_KEY.chmod(0o600)


def _write_config(text: str) -> None:
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    tmp = CONFIG_FILE.with_suffix(".toml.tmp")
    tmp.write_text(text)
    try:
        load_config(tmp)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(CONFIG_FILE)


def _write_state(state: Mapping[str, Any]) -> None:
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(STATE_FILE)


# -- build ----------------------------------------------------------------------------


def _build_network(spec: LabSpec, nodes: Sequence[Node]) -> None:
    clients, datapath = spec.clients, spec.datapath
    client_ns = [f"hl-c{i}" for i in range(1, clients + 1)]
    all_ns = [LAN_NS, *(n.netns for n in nodes), *client_ns]
    for ns in all_ns:
        _run(["ip", "netns", "add", ns])
    base_sysctls = {
        "net.ipv6.conf.all.disable_ipv6": 1,
        "net.ipv6.conf.default.disable_ipv6": 1,
        "net.ipv4.conf.all.rp_filter": 0,
        "net.ipv4.conf.default.rp_filter": 0,
    }
    for ns in all_ns:
        _sysctl(ns, base_sysctls)
        _ip_batch(ns, ["link set lo up"])
    # ECMP hashes the 5-tuple from the headers (policy 3, fields: addresses,
    # protocol, ports), as a router receiving from a real wire does. Policy 1
    # would reuse the hash a local sender left on the skb (the client's socket
    # txhash, random per connection and changed on retransmission), so one flow
    # could change forwarder: no real router behaves like that.
    _sysctl(
        ROUTER_NS,
        {
            "net.ipv4.ip_forward": 1,
            "net.ipv4.fib_multipath_hash_policy": 3,
            "net.ipv4.fib_multipath_hash_fields": "0x0037",
        },
    )

    # The server LAN: a bridge in hl-lan, one veth per node.
    lan = ["link add name br0 type bridge", "link set br0 up"]
    for n in nodes:
        lan.append(f"link add name p-{n.name} type veth peer name lan0 netns {n.netns}")
        lan.append(f"link set p-{n.name} master br0")
        lan.append(f"link set p-{n.name} up")
    _ip_batch(LAN_NS, lan)
    _switch_only(LAN_NS)
    for n in nodes:
        cmds = [
            f"link set lan0 address {n.mac}",
            f"addr add {n.address}/{LAN_PREFIX} dev lan0",
            "link set lan0 up",
        ]
        if n.role != "router":
            cmds.append(f"route replace default via {ROUTER_ADDRESS} dev lan0")
        if n.role == "host":
            cmds.append(f"addr add {VIP}/32 dev lo")
        if n.role == "l7":
            cmds.append(f"addr add {L7_VIP}/32 dev lo")
        _ip_batch(n.netns, cmds)
        if_sysctls: dict[str, str | int] = {"net.ipv4.conf.lan0.rp_filter": 0}
        if n.role in ("host", "l7"):
            if_sysctls |= {
                "net.ipv4.conf.all.arp_ignore": 1,
                "net.ipv4.conf.lan0.arp_ignore": 1,
                "net.ipv4.conf.all.arp_announce": 2,
                "net.ipv4.conf.lan0.arp_announce": 2,
            }
        _sysctl(n.netns, if_sysctls)

    # Clients hang off the router, one point-to-point /24 each.
    router = []
    for i, ns in enumerate(client_ns, start=1):
        router += [
            f"link add name c{i} type veth peer name eth0 netns {ns}",
            f"addr add 10.91.{i}.1/24 dev c{i}",
            f"link set c{i} up",
        ]
    _ip_batch(ROUTER_NS, router)
    _sysctl(ROUTER_NS, {f"net.ipv4.conf.c{i}.rp_filter": 0 for i in range(1, clients + 1)})
    for i, ns in enumerate(client_ns, start=1):
        _ip_batch(
            ns,
            [
                f"addr add 10.91.{i}.2/24 dev eth0",
                "link set eth0 up",
                f"route replace default via 10.91.{i}.1 dev eth0",
            ],
        )
        _sysctl(ns, {"net.ipv4.conf.eth0.rp_filter": 0})
        if datapath == "userspace":
            # A userspace forwarder reads frames with AF_PACKET and sends them as they
            # are, so they must carry complete TCP checksums: no tx offload on either
            # end. The kernel datapath forwards offloaded (and TSO) frames as they are.
            _run(["ip", "netns", "exec", ns, "ethtool", "-K", "eth0", "tx", "off"])
            _run(["ip", "netns", "exec", ROUTER_NS, "ethtool", "-K", f"c{i}", "tx", "off"])

    # ECMP over the forwarders for the VIP; with the switch, the switch owns the route.
    if not spec.switch:
        hops = " ".join(f"nexthop via {n.address} dev lan0" for n in nodes if n.role == "forwarder")
        vips = [VIP, L7_VIP] if any(n.role == "l7" for n in nodes) else [VIP]
        _ip_batch(ROUTER_NS, [f"route replace {v}/32 {hops}" for v in vips])


def _component(role: str, name: str, netns: str, argv: Sequence[str]) -> dict[str, Any]:
    return {
        "role": role,
        "name": name,
        "netns": netns,
        "pid": None,
        "log": str(LOG_DIR / f"{name}.log"),
        "argv": list(argv),
    }


# -- the lab --------------------------------------------------------------------------


class _LoadAccessor:
    """``Lab.load()`` -> the running lab from its state file;
    ``lab.load(client_ns, mode, **opts)`` -> run the load generator in a client namespace."""

    @overload
    def __get__(self, obj: None, objtype: type[Lab]) -> Callable[[], Lab]: ...

    @overload
    def __get__(
        self, obj: Lab, objtype: type[Lab] | None = None
    ) -> Callable[..., dict[str, Any]]: ...

    def __get__(
        self, obj: Lab | None, objtype: type[Lab] | None = None
    ) -> Callable[[], Lab] | Callable[..., dict[str, Any]]:
        if obj is None:
            assert objtype is not None
            return objtype.from_state
        return obj.run_load


class Lab:
    """A built lab, described by its state (the content of ``state.json``)."""

    load = _LoadAccessor()

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    # -- life cycle ---------------------------------------------------------------

    @classmethod
    def up(cls, start_components: bool = True, **sizes: Any) -> Lab:
        """Tear down any previous lab, build a new one, start httpds (and components).

        Keywords are the fields of :class:`LabSpec` (clients, forwarders, classifiers,
        hosts, datapath, trackers, handlers, spare_hosts, weights, switch, replication,
        routers, router_tls).
        """
        if "weights" in sizes:
            sizes["weights"] = tuple(sizes["weights"] or ())
        spec = LabSpec(**sizes)
        spec.check()
        nodes = plan(
            spec.clients,
            spec.forwarders,
            spec.classifiers,
            spec.hosts + spec.spare_hosts,
            spec.trackers,
            spec.handlers,
            spec.routers,
        )
        if os.geteuid() != 0:
            raise LabError("the lab needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
        for tool in ("ip", "ethtool", "sysctl"):
            if shutil.which(tool) is None:
                raise LabError(f"the lab needs {tool!r} on PATH")
        down()
        try:
            LAB_DIR.mkdir(parents=True, exist_ok=True)
            LOG_DIR.mkdir(parents=True, exist_ok=True)
            SOCK_DIR.mkdir(parents=True, exist_ok=True)
            if spec.router_tls:
                _make_certificate(nodes)
            _write_config(render_config(nodes, spec.datapath, secrets.token_hex(16), spec))
            _build_network(spec, nodes)
            lab = cls(cls._initial_state(spec, nodes))
            _write_state(lab.state)
            for comp in lab.state["components"]:
                if comp["role"] == "httpd" or start_components:
                    lab._spawn(comp)
            _write_state(lab.state)
        except BaseException:
            down()
            raise
        return lab

    @staticmethod
    def _initial_state(spec: LabSpec, nodes: Sequence[Node]) -> dict[str, Any]:
        clients, datapath = spec.clients, spec.datapath
        hanlb = hanlb_command()
        py = sys.executable
        components: list[dict[str, Any]] = []
        # Order matters: hosts' servers, then classifiers, then forwarders.
        for n in nodes:
            if n.role == "host":
                argv = [
                    py,
                    "-m",
                    "hanlb.lab.httpd",
                    "--name",
                    n.name,
                    "--port",
                    str(HTTP_PORT),
                    "--sink-port",
                    str(SINK_PORT),
                ]
                components.append(_component("httpd", n.name, n.netns, argv))

        def run(role: str, name: str) -> list[str]:
            return [*hanlb, "run", "--config", str(CONFIG_FILE), "--role", role, "--name", name]

        # Order matters: what others connect to starts first.
        for role in ("tracker", "handler", "classifier", "forwarder"):
            for n in nodes:
                if n.role == role:
                    components.append(_component(role, n.name, n.netns, run(role, n.name)))
        for n in nodes:
            if n.role == "l7":
                components.append(_component("router", n.name, n.netns, run("router", n.name)))
        if spec.handlers:
            for n in nodes:
                if n.role in ("host", "l7"):
                    components.append(
                        _component("agent", f"{n.name}-agent", n.netns, run("agent", n.name))
                    )
        if spec.switch:
            components.append(_component("switch", "switch", ROUTER_NS, run("switch", "switch")))
        client_ns = [f"hl-c{i}" for i in range(1, clients + 1)]
        by_role = {
            r: [n.netns for n in nodes if n.role == r]
            for r in ("forwarder", "classifier", "host", "tracker", "handler", "l7")
        }
        return {
            "version": 1,
            "created": time.time(),
            "sizes": {
                "clients": clients,
                "forwarders": len(by_role["forwarder"]),
                "classifiers": len(by_role["classifier"]),
                "hosts": len(by_role["host"]),
                "spare_hosts": spec.spare_hosts,
                "trackers": len(by_role["tracker"]),
                "handlers": len(by_role["handler"]),
                "routers": len(by_role["l7"]),
                "switch": spec.switch,
            },
            "tls": (
                {"cert": str(TLS_CERT), "key": str(TLS_KEY), "name": TLS_NAME}
                if spec.router_tls
                else None
            ),
            "datapath": datapath,
            "config": str(CONFIG_FILE),
            "lan": LAN_NS,
            "router": ROUTER_NS,
            "clients": client_ns,
            "forwarders": by_role["forwarder"],
            "classifiers": by_role["classifier"],
            "hosts": by_role["host"],
            "trackers": by_role["tracker"],
            "handlers": by_role["handler"],
            "routers": by_role["l7"],
            "namespaces": [LAN_NS, *(n.netns for n in nodes), *client_ns],
            "nodes": [asdict(n) for n in nodes],
            "client_addresses": {ns: f"10.91.{i}.2" for i, ns in enumerate(client_ns, 1)},
            "vips": [
                {"address": VIP, "port": port, "mode": mode, "application": name}
                for name, port, mode in APPLICATIONS
            ]
            + (
                [{"address": L7_VIP, "port": spec.l7_port, "mode": "http", "application": L7_APP}]
                if by_role["l7"]
                else []
            ),
            "components": components,
        }

    @classmethod
    def from_state(cls) -> Lab:
        """The running lab, from ``/run/hanlb/lab/state.json``."""
        try:
            state = json.loads(STATE_FILE.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab is up ({STATE_FILE} does not exist)") from None
        except (OSError, ValueError) as exc:
            raise LabError(f"cannot read {STATE_FILE}: {exc}") from None
        return cls(state)

    def down(self) -> None:
        """Stop everything and delete the lab namespaces (see :func:`down`)."""
        down()

    # -- queries ------------------------------------------------------------------

    @property
    def components(self) -> list[dict[str, Any]]:
        comps: list[dict[str, Any]] = self.state["components"]
        return comps

    @property
    def clients(self) -> list[str]:
        return list(self.state["clients"])

    @property
    def hosts(self) -> list[str]:
        return list(self.state["hosts"])

    @property
    def nodes(self) -> list[Node]:
        return [Node(**n) for n in self.state["nodes"]]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise LabError(f"no node named {name!r}")

    def component(self, name: str) -> dict[str, Any]:
        for comp in self.components:
            if comp["name"] == name:
                return comp
        known = ", ".join(c["name"] for c in self.components)
        raise LabError(f"no component named {name!r} (known: {known})")

    def alive(self, name: str) -> bool:
        comp = self.component(name)
        pid = comp["pid"]
        return pid is not None and _pid_alive(pid) and _pid_in_netns(pid, comp["netns"])

    def status(self) -> dict[str, Any]:
        """The state plus, per component, whether it is alive, and the namespaces present."""
        out = json.loads(json.dumps(self.state))
        out["up"] = True
        for comp in out["components"]:
            comp["alive"] = self.alive(comp["name"])
        out["namespaces_present"] = lab_namespaces()
        return dict(out)

    # -- actions ------------------------------------------------------------------

    def netns_exec(
        self, ns: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside namespace ``ns`` (``subprocess.run`` keywords accepted)."""
        return netns_exec(ns, argv, **kwargs)

    def _spawn(self, comp: dict[str, Any]) -> None:
        comp["pid"] = _spawn(comp["netns"], comp["argv"], Path(comp["log"]))

    def kill(self, name: str) -> None:
        """SIGKILL a component (its whole process group) and wait until it is gone.

        A forwarder's kernel datapath outlives its process, so for a forwarder the
        node is taken down too (its nftables table deleted, its LAN link down), the
        way a machine that dies stops forwarding; ``start`` brings the link back."""
        comp = self.component(name)
        pid = comp["pid"]
        if pid is not None and _pid_alive(pid) and _pid_in_netns(pid, comp["netns"]):
            _signal(pid, signal.SIGKILL)
            if _wait_dead([pid], 5.0):
                raise LabError(f"{name} (pid {pid}) survived SIGKILL")
        if comp["role"] == "forwarder":
            netns_exec(comp["netns"], ["nft", "delete", "table", "netdev", "hanlb"])
            _ip_batch(comp["netns"], ["link set lan0 down"])

    def start(self, name: str) -> int:
        """Start a component again with the same command; returns and records the new pid."""
        comp = self.component(name)
        if self.alive(name):
            raise LabError(f"{name} is already running (pid {comp['pid']})")
        if comp["role"] == "forwarder":
            _ip_batch(comp["netns"], ["link set lan0 up"])
        self._spawn(comp)
        _write_state(self.state)
        pid: int = comp["pid"]
        return pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every host's httpd answers ``GET /health`` from hl-c1 at the host's own
        address, and every started component (pid recorded) is alive. Raises
        :class:`LabError` on timeout or as soon as a started component has exited."""
        deadline = time.monotonic() + timeout
        targets = [f"{n.address}:{HTTP_PORT}" for n in self.nodes if n.role == "host"]
        client = self.clients[0]
        last: dict[str, Any] = {}
        while True:
            dead = [
                c for c in self.components if c["pid"] is not None and not self.alive(c["name"])
            ]
            if dead:
                raise LabError(
                    "component(s) not running: "
                    + "; ".join(
                        f"{c['name']} ({_exit_note(c['pid'])}; log: {_log_tail(c['log'])})"
                        for c in dead
                    )
                )
            try:
                last = self.run_load(
                    client, "probe", targets=",".join(targets), path="/health", timeout=1.0
                )
                results = last["results"]
                if all(r["status"] == 200 for r in results.values()):
                    return
            except LabError as exc:
                last = {"error": str(exc)}
            if time.monotonic() >= deadline:
                raise LabError(f"lab not ready after {timeout:g}s: {json.dumps(last)}")
            time.sleep(0.2)

    def run_load(self, client_ns: str, mode: str, **opts: Any) -> dict[str, Any]:
        """Run ``python -m hanlb.lab.load --mode MODE --opt value...`` inside ``client_ns``
        and return its JSON. Keyword ``foo_bar=1`` becomes ``--foo-bar 1``."""
        argv = [sys.executable, "-m", "hanlb.lab.load", "--mode", mode]
        for key, value in opts.items():
            if value is None or value is False:
                continue
            if value is True:
                argv.append(f"--{key.replace('_', '-')}")
                continue
            if isinstance(value, list | tuple):
                value = ",".join(str(v) for v in value)
            argv += [f"--{key.replace('_', '-')}", str(value)]
        proc = netns_exec(client_ns, argv)
        try:
            result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            result = {}
        if proc.returncode != 0 or not result:
            raise LabError(
                f"load generator failed ({proc.returncode}) in {client_ns}: "
                f"{proc.stdout.strip()} {proc.stderr.strip()[-2000:]}"
            )
        return result


def _exit_note(pid: int) -> str:
    """How a process of ours ended ("exit 1", "signal 9"), or "exited" if not our child."""
    child = _exited.get(pid)
    if child is None:
        return "exited"
    return f"signal {-child}" if child < 0 else f"exit {child}"


def _log_tail(path: str, lines: int = 3) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "no log"
    tail = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail) or "empty log"


def down() -> None:
    """Stop the lab's processes, delete the lab's ``hl-*`` namespaces and ``/run/hanlb/lab``.

    Works without a state file (after a crash) and when nothing exists; never raises for
    things that are already gone.
    """
    # 1. The processes the state knows: SIGTERM, 2 s grace, then SIGKILL.
    pids: list[int] = []
    try:
        state = json.loads(STATE_FILE.read_text())
        comps = state.get("components", [])
    except (OSError, ValueError, AttributeError):
        comps = []
    for comp in comps:
        pid = comp.get("pid") if isinstance(comp, dict) else None
        netns = comp.get("netns", "") if isinstance(comp, dict) else ""
        if isinstance(pid, int) and _pid_alive(pid) and _pid_in_netns(pid, netns):
            pids.append(pid)
            _signal(pid, signal.SIGTERM)
    for pid in _wait_dead(pids, 2.0):
        _signal(pid, signal.SIGKILL)
    _wait_dead(pids, 2.0)

    # 2. Anything else still inside a lab namespace.
    namespaces = lab_namespaces()
    stragglers: list[int] = []
    for ns in namespaces:
        for pid in _netns_pids(ns):
            if pid != os.getpid():
                stragglers.append(pid)
                _signal(pid, signal.SIGKILL)
    _wait_dead(stragglers, 2.0)

    # 3. The namespaces (their veths and the bridge go with them), then the files.
    for ns in namespaces:
        _run(["ip", "netns", "del", ns], check=False)
    for pid in list(_children):
        _pid_alive(pid)  # reaps finished children
    shutil.rmtree(LAB_DIR, ignore_errors=True)
    left = lab_namespaces()
    if left:
        raise LabError(f"could not delete namespaces: {', '.join(left)}")


def status() -> dict[str, Any]:
    """The running lab's status, or ``{"up": False, ...}`` when there is none."""
    try:
        return Lab.from_state().status()
    except LabError:
        return {
            "up": False,
            "vips": [],
            "clients": [],
            "hosts": [],
            "components": [],
            "namespaces_present": lab_namespaces(),
        }
