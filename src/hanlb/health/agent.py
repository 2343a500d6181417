"""The host agent: authoritative health/load table, heartbeats, snapshots (claims 7, 67-74).

``AgentCore`` is the logic without I/O. It decides when each application
endpoint is probed (``probes_due``), runs the rise/fall state machine on the
results (``on_probe``), keeps the table, and produces the messages for each
connected handler (``messages``): a ``Heartbeat`` every
``health.heartbeat_interval``, one more at once when an endpoint goes up or
down or a handler connects, and a ``SendTableSnapshot`` for each
``GetTableSnapshot``. Its clock is the ``now`` it is given.

``AgentService`` is the asyncio shell: it probes over real sockets, measures
load from ``/proc``, and keeps a framed link to every handler in
``config.handlers``. The agent opens those links itself (heartbeats go out on
them and snapshot requests come back on them), so it needs no listening
protocol socket; ``HostConfig.agent``, when set, is where it serves its admin
HTTP endpoint over TCP (``/status``, ``/table``, ``/metrics``) next to the unix
socket ``<run_dir>/<host>-agent.sock``.

Probes start every ``health_check.interval`` whether the previous one has
finished or not, so a hung application is still judged once per interval
after the first ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..admin import AdminServer, CountersCollector
from ..config import ClusterConfig, HealthCheck
from ..net import Link, LinkClosed, open_link
from ..protocol.messages import Hello, Ping, Pong
from .messages import GetTableSnapshot, Heartbeat, SendTableSnapshot, TableRow
from .table import HealthTable, make_row

__all__ = [
    "TRANSITIONS",
    "AgentCore",
    "AgentService",
    "EndpointChanged",
    "EndpointSpec",
    "HealthState",
    "LoadProbe",
    "ProbeResult",
    "probe_http",
    "probe_tcp",
]

log = logging.getLogger("hanlb.health.agent")


# -- the rise/fall state machine ---------------------------------------------------


class HealthState(enum.Enum):
    INIT = "init"
    """No probe has answered yet; the endpoint counts as down."""
    UP = "up"
    FALLING = "falling"
    """Up, with 1 .. fall-1 failures in a row."""
    DOWN = "down"
    RISING = "rising"
    """Down, with 1 .. rise-1 successes in a row."""


class Count(enum.Enum):
    RESET = "reset"
    ADD = "add"


S = HealthState
TRANSITIONS: dict[HealthState, dict[bool, tuple[HealthState, Count]]] = {
    # state:      {probe passed: (next state, streak), probe failed: (...)}
    S.INIT: {True: (S.UP, Count.RESET), False: (S.DOWN, Count.RESET)},
    S.UP: {True: (S.UP, Count.RESET), False: (S.FALLING, Count.ADD)},
    S.FALLING: {True: (S.UP, Count.RESET), False: (S.FALLING, Count.ADD)},
    S.DOWN: {True: (S.RISING, Count.ADD), False: (S.DOWN, Count.RESET)},
    S.RISING: {True: (S.RISING, Count.ADD), False: (S.DOWN, Count.RESET)},
}
"""Rise/fall hysteresis. The first probe decides at once (INIT); after that an
endpoint goes down after ``fall`` failures in a row and up after ``rise``
successes in a row."""

PROMOTIONS: dict[HealthState, tuple[str, HealthState]] = {
    S.FALLING: ("fall", S.DOWN),
    S.RISING: ("rise", S.UP),
}
"""A streak state moves on once its streak reaches the named threshold."""

UP_STATES = frozenset({S.UP, S.FALLING})


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One application endpoint on this host, and how to judge it."""

    app: str
    weight: int
    interval: float
    rise: int
    fall: int


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    """An endpoint went up or down (event)."""

    app: str
    up: bool
    at: float


@dataclass(slots=True)
class _Endpoint:
    spec: EndpointSpec
    state: HealthState = HealthState.INIT
    streak: int = 0
    next_probe: float = 0.0
    connections: int = 0
    cpu: float = 0.0
    app_load: float = -1.0


class AgentCore:
    def __init__(
        self, host: str, endpoints: list[EndpointSpec], heartbeat_interval: float, now: float
    ) -> None:
        self.host = host
        self.heartbeat_interval = heartbeat_interval
        self.endpoints = {e.app: _Endpoint(e, next_probe=now) for e in endpoints}
        self.table = HealthTable()
        for ep in self.endpoints.values():
            self.table.put(self._row(ep))
        self.table.version = 0
        self.handlers: set[str] = set()
        self.counters: Counter[str] = Counter()
        self._next_heartbeat = now + heartbeat_interval
        self._probes: list[str] = []
        self._out: list[tuple[str, object]] = []
        self._events: list[EndpointChanged] = []

    @classmethod
    def from_config(cls, config: ClusterConfig, host: str, now: float) -> AgentCore:
        """An agent probing every application ``host`` runs
        (``ClusterConfig.host_applications``): hosts are authoritative for their
        endpoints' health whether or not a pool names them now, so a host added to
        a pool at run time is judged at once. The weight is the configured one (0
        where no pool names the host); handlers weigh tokens by the pools they
        hold, which ``hanlb ctl pool`` changes."""
        specs = []
        for app in config.host_applications(host):
            weight = next((m.weight for m in app.pool if m.host == host), 0)
            hc = app.health_check
            specs.append(EndpointSpec(app.name, weight, hc.interval, hc.rise, hc.fall))
        return cls(host, specs, config.health.heartbeat_interval, now)

    # -- inputs ----------------------------------------------------------------------

    def on_probe(self, app: str, ok: bool, now: float) -> None:
        """The result of one probe of ``app``'s endpoint."""
        ep = self.endpoints.get(app)
        if ep is None:
            self.counters["probe_results_unknown_app"] += 1
            return
        self.counters["probes_ok" if ok else "probes_failed"] += 1
        was_up = ep.state in UP_STATES
        state, count = TRANSITIONS[ep.state][ok]
        ep.streak = ep.streak + 1 if count is Count.ADD else 0
        promotion = PROMOTIONS.get(state)
        if promotion is not None and ep.streak >= getattr(ep.spec, promotion[0]):
            state, ep.streak = promotion[1], 0
        ep.state = state
        is_up = state in UP_STATES
        self.table.put(self._row(ep))
        if is_up != was_up:
            self.counters["endpoints_up" if is_up else "endpoints_down"] += 1
            self._events.append(EndpointChanged(app, is_up, now))
            self._heartbeat_all()

    def on_load(self, app: str, active_connections: int, cpu: float, app_load: float) -> None:
        """The latest load measures of ``app``'s endpoint (app_load < 0: unknown)."""
        ep = self.endpoints.get(app)
        if ep is None:
            self.counters["load_unknown_app"] += 1
            return
        ep.connections, ep.cpu, ep.app_load = active_connections, cpu, app_load
        self.table.put(self._row(ep))

    def set_weight(self, app: str, weight: int) -> None:
        """Publish a new weight for ``app`` (0 drains the endpoint)."""
        ep = self.endpoints[app]
        ep.spec = EndpointSpec(app, weight, ep.spec.interval, ep.spec.rise, ep.spec.fall)
        self.table.put(self._row(ep))

    def handler_connected(self, handler: str, now: float) -> None:
        """A link to ``handler`` is up: it gets a heartbeat at once."""
        self.handlers.add(handler)
        self._out.append((handler, self._heartbeat()))
        self.counters["heartbeats_sent"] += 1

    def handler_lost(self, handler: str) -> None:
        self.handlers.discard(handler)

    def on_message(self, handler: str, msg: object, now: float) -> None:
        if isinstance(msg, GetTableSnapshot):
            rows = self.table.snapshot(msg.portions)
            self._out.append(
                (handler, SendTableSnapshot(msg.req_id, self.host, self.table.version, rows))
            )
            self.counters["snapshots_whole" if not msg.portions else "snapshots_partial"] += 1
        else:
            self.counters["messages_unexpected"] += 1

    def handle_timer(self, now: float) -> None:
        for ep in self.endpoints.values():
            if now >= ep.next_probe:
                self._probes.append(ep.spec.app)
                ep.next_probe += ep.spec.interval
                if ep.next_probe <= now:  # we were late by more than an interval
                    ep.next_probe = now + ep.spec.interval
        if now >= self._next_heartbeat:
            self._heartbeat_all()
            self._next_heartbeat += self.heartbeat_interval
            if self._next_heartbeat <= now:
                self._next_heartbeat = now + self.heartbeat_interval

    # -- outputs ---------------------------------------------------------------------

    def get_timer(self) -> float:
        probes = (ep.next_probe for ep in self.endpoints.values())
        return min(self._next_heartbeat, *probes) if self.endpoints else self._next_heartbeat

    def probes_due(self) -> list[str]:
        """Applications whose endpoint should be probed now."""
        out, self._probes = self._probes, []
        return out

    def messages(self) -> list[tuple[str, object]]:
        """(handler, message) pairs to send."""
        out, self._out = self._out, []
        return out

    def events(self) -> list[EndpointChanged]:
        out, self._events = self._events, []
        return out

    def is_up(self, app: str) -> bool:
        return self.endpoints[app].state in UP_STATES

    # -- internals ---------------------------------------------------------------------

    def _row(self, ep: _Endpoint) -> TableRow:
        return make_row(
            ep.spec.app,
            ep.state in UP_STATES,
            ep.connections,
            ep.cpu,
            ep.app_load,
            ep.spec.weight,
        )

    def _heartbeat(self) -> Heartbeat:
        t = self.table
        return Heartbeat(self.host, t.version, t.checksum(), t.portion_sums())

    def _heartbeat_all(self) -> None:
        if not self.handlers:
            return
        hb = self._heartbeat()
        for handler in sorted(self.handlers):
            self._out.append((handler, hb))
        self.counters["heartbeats_sent"] += len(self.handlers)


# -- probes and load measures (I/O) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    app_load: float = -1.0
    """The ``X-Load`` header's value, or -1."""
    detail: str = ""


_XLOAD = re.compile(rb"^x-load:\s*([0-9.]+)\s*$", re.IGNORECASE | re.MULTILINE)


async def probe_http(address: str, port: int, check: HealthCheck) -> ProbeResult:
    """GET ``check.path``; passes if the status is ``check.expect_status`` within the timeout."""

    tls = None
    if check.kind == "https":
        # The check proves the application answers over TLS; it does not judge
        # the certificate (a host's own certificate may name only the VIP).
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE

    async def run() -> ProbeResult:
        reader, writer = await asyncio.open_connection(address, port, ssl=tls)
        try:
            writer.write(
                f"GET {check.path} HTTP/1.0\r\nHost: {address}\r\n"
                "User-Agent: hanlb-agent\r\nConnection: close\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        parts = head.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return ProbeResult(False, detail="not an HTTP response")
        status = int(parts[1])
        load = -1.0
        m = _XLOAD.search(head)
        if m:
            with contextlib.suppress(ValueError):
                load = min(1.0, max(0.0, float(m.group(1))))
        return ProbeResult(status == check.expect_status, load, f"status {status}")

    try:
        return await asyncio.wait_for(run(), check.timeout)
    except TimeoutError:
        return ProbeResult(False, detail="timeout")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        return ProbeResult(False, detail=type(exc).__name__)  # ssl.SSLError is an OSError


async def probe_tcp(address: str, port: int, check: HealthCheck) -> ProbeResult:
    """Passes if a TCP connection opens within the timeout."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), check.timeout)
    except TimeoutError:
        return ProbeResult(False, detail="timeout")
    except OSError as exc:
        return ProbeResult(False, detail=type(exc).__name__)
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return ProbeResult(True)


def load_file_env(app: str) -> str:
    """The environment variable naming ``app``'s load file: HANLB_LOAD_FILE_<APP>."""
    return "HANLB_LOAD_FILE_" + re.sub(r"[^A-Za-z0-9]", "_", app).upper()


LOAD_SAMPLE_INTERVAL = 1.0
"""Seconds between two load samples of one endpoint."""


class LoadProbe:
    """Load measures of one endpoint from ``/proc`` (of this network namespace).

    - active connections: ESTABLISHED sockets whose local port is the
      endpoint's, in ``/proc/net/tcp`` and ``/proc/net/tcp6``;
    - cpu: the process holding the listening socket (found through its inode
      in ``/proc/*/fd``), CPU seconds (utime + stime) per wall second since the
      last sample, divided by the CPUs it may run on, clamped to 0..1;
    - application load: the number in the file named by
      ``HANLB_LOAD_FILE_<APP>`` if that variable is set (else the caller's
      ``X-Load`` header value, else -1).
    """

    def __init__(self, app: str, port: int, proc: str = "/proc") -> None:
        self.app = app
        self.port = port
        self.proc = Path(proc)
        self.load_file = os.environ.get(load_file_env(app))
        self._owner: tuple[int, str] | None = None  # (pid, fd link target)
        self._last: tuple[float, float] | None = None  # (wall, cpu seconds)
        self._ticks = os.sysconf("SC_CLK_TCK")

    def sample(self, header_load: float) -> tuple[int, float, float]:
        """(active_connections, cpu, app_load) now."""
        established, listen_inode = self._sockets()
        return established, self._cpu(listen_inode), self._app_load(header_load)

    def _sockets(self) -> tuple[int, str | None]:
        established = 0
        inode: str | None = None
        for name in ("tcp", "tcp6"):
            try:
                lines = (self.proc / "net" / name).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                if len(f) < 10 or int(f[1].rsplit(":", 1)[1], 16) != self.port:
                    continue
                if f[3] == "01":
                    established += 1
                elif f[3] == "0A" and inode is None:
                    inode = f[9]
        return established, inode

    def _find_pid(self, inode: str) -> tuple[int, str] | None:
        target = f"socket:[{inode}]"
        if self._owner is not None and self._owner[1] == target:
            pid = self._owner[0]
            with contextlib.suppress(OSError):
                for fd in os.listdir(self.proc / str(pid) / "fd"):
                    if os.readlink(self.proc / str(pid) / "fd" / fd) == target:
                        return self._owner
        for entry in os.listdir(self.proc):
            if not entry.isdigit():
                continue
            fd_dir = self.proc / entry / "fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(fd_dir / fd) == target:
                        return int(entry), target
                except OSError:
                    continue
        return None

    def _cpu(self, inode: str | None) -> float:
        owner = self._find_pid(inode) if inode is not None else None
        if owner is None:
            self._owner, self._last = None, None
            return 0.0
        if owner != self._owner:
            self._owner, self._last = owner, None
        pid = owner[0]
        try:
            stat = (self.proc / str(pid) / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            cpu_seconds = (int(fields[11]) + int(fields[12])) / self._ticks
            cpus = len(os.sched_getaffinity(pid)) or 1
        except (OSError, ValueError, IndexError):
            self._owner, self._last = None, None
            return 0.0
        wall = time.monotonic()
        last, self._last = self._last, (wall, cpu_seconds)
        if last is None or wall <= last[0]:
            return 0.0
        return min(1.0, max(0.0, (cpu_seconds - last[1]) / (wall - last[0]) / cpus))

    def _app_load(self, header_load: float) -> float:
        if self.load_file:
            try:
                return min(1.0, max(0.0, float(Path(self.load_file).read_text().strip())))
            except (OSError, ValueError):
                return -1.0
        return header_load


# -- the asyncio shell -------------------------------------------------------------


class AgentService:
    """The host agent process for host ``host_name``.

    ``probe_address`` overrides the address probes go to. By default each
    application is probed at its VIP: with direct server return the host holds
    the VIP on its loopback and that is where the application answers clients.
    """

    def __init__(
        self, config: ClusterConfig, host_name: str, probe_address: str | None = None
    ) -> None:
        self.config = config
        self.host = config.host(host_name)
        self.name = host_name
        self.probe_address = probe_address
        self.apps = {a.name: a for a in config.host_applications(host_name)}
        self.loads = {name: LoadProbe(name, a.port) for name, a in self.apps.items()}
        self._next_load: dict[str, float] = {}
        self.links: dict[str, Link] = {}
        self.net_counters: Counter[str] = Counter()
        self.incarnation = int.from_bytes(os.urandom(4), "big")
        self.last_probe: dict[str, ProbeResult] = {}
        self.core: AgentCore
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.core = AgentCore.from_config(self.config, self.name, loop.time())
        admin = AdminServer(self.config.cluster.run_dir, f"{self.name}-agent", self.host.agent)
        admin.routes["/status"] = self.status
        admin.routes["/table"] = lambda: [_row_dict(r) for r in self.core.table.rows()]
        admin.registry.register(
            CountersCollector(
                "hanlb_agent",
                self.name,
                lambda: {**self.core.counters, **self.net_counters},
                lambda: {
                    "table_version": float(self.core.table.version),
                    "handlers_connected": float(len(self.links)),
                },
            )
        )
        await admin.start()
        self._on_timer()
        loops = [asyncio.create_task(self._handler_loop(h.name)) for h in self.config.handlers]
        log.info("agent %s up: %d endpoints", self.name, len(self.apps))
        try:
            await asyncio.gather(*loops)
        finally:
            for t in loops:
                t.cancel()
            for t in list(self._tasks):
                t.cancel()
            if self._timer:
                self._timer.cancel()
            for link in self.links.values():
                link.close()
            admin.close()

    def status(self) -> dict[str, object]:
        return {
            "role": "agent",
            "name": self.name,
            "version": self.core.table.version,
            "checksum": self.core.table.checksum().hex(),
            "handlers": sorted(self.links),
            "endpoints": {
                app: {
                    **_row_dict(self.core.table.row(app)),
                    "state": ep.state.value,
                    "last_probe": self.last_probe[app].detail if app in self.last_probe else None,
                }
                for app, ep in self.core.endpoints.items()
            },
            "counters": {**self.core.counters, **self.net_counters},
        }

    # -- timers and probes -------------------------------------------------------------

    def _on_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self.core.handle_timer(loop.time())
        for app in self.core.probes_due():
            task = asyncio.create_task(self._probe(app))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._flush()
        self._timer = loop.call_at(max(self.core.get_timer(), loop.time()), self._on_timer)

    async def _probe(self, app: str) -> None:
        spec = self.apps[app]
        check = spec.health_check
        if check.kind in ("http", "https"):
            result = await probe_http(self.probe_address or spec.vip, spec.port, check)
        else:
            result = await probe_tcp(self.probe_address or spec.vip, spec.port, check)
        self.last_probe[app] = result
        now = asyncio.get_running_loop().time()
        if now >= self._next_load.get(app, 0.0):
            # Load moves slowly and reading /proc costs: sample it at most every
            # LOAD_SAMPLE_INTERVAL, not on every probe.
            self._next_load[app] = now + LOAD_SAMPLE_INTERVAL
            try:
                conns, cpu, app_load = await asyncio.to_thread(
                    self.loads[app].sample, result.app_load
                )
            except (OSError, ValueError) as exc:
                self.net_counters["load_errors"] += 1
                log.debug("agent %s: load of %s: %s", self.name, app, exc)
                conns, cpu, app_load = 0, 0.0, result.app_load
            now = asyncio.get_running_loop().time()
            self.core.on_load(app, conns, cpu, app_load)
        self.core.on_probe(app, result.ok, now)
        for ev in self.core.events():
            log.info(
                "agent %s: %s %s (%s)", self.name, ev.app, "up" if ev.up else "down", result.detail
            )
        self._flush()

    def _flush(self) -> None:
        for handler, msg in self.core.messages():
            link = self.links.get(handler)
            if link is None:
                self.net_counters["messages_lost_link_down"] += 1
                continue
            try:
                link.send(msg)
            except LinkClosed:
                self.net_counters["messages_lost_link_down"] += 1

    # -- handler links -----------------------------------------------------------------

    async def _handler_loop(self, handler: str) -> None:
        node = next(h for h in self.config.handlers if h.name == handler)
        host, port = node.endpoint
        t = self.config.timers
        loop = asyncio.get_running_loop()
        while True:
            try:
                link = await open_link(host, port, self.config.key_bytes, self.net_counters, 1.0)
            except (OSError, TimeoutError):
                self.net_counters["handler_connect_failures"] += 1
                await asyncio.sleep(t.reconnect_interval)
                continue
            link.send(Hello(self.name, "agent", self.incarnation))
            self.links[handler] = link
            self.net_counters["handler_connects"] += 1
            self.core.handler_connected(handler, loop.time())
            self._flush()
            try:
                while True:
                    for msg in await link.recv():
                        if isinstance(msg, Ping):
                            link.send(Pong(msg.seq, msg.sent))
                        elif not isinstance(msg, Pong):
                            self.core.on_message(handler, msg, loop.time())
                    self._flush()
            except (LinkClosed, OSError) as exc:
                log.info("agent %s: handler %s lost: %s", self.name, handler, exc)
            finally:
                link.close()
                if self.links.get(handler) is link:
                    del self.links[handler]
                self.core.handler_lost(handler)
                self.net_counters["handler_losses"] += 1
            await asyncio.sleep(t.reconnect_interval)


def _row_dict(row: TableRow | None) -> dict[str, object]:
    if row is None:
        return {}
    return {
        "app": row.app,
        "up": row.up,
        "active_connections": row.active_connections,
        "cpu": row.cpu,
        "app_load": row.app_load,
        "weight": row.weight,
    }
