"""A discrete-event simulation of agents, handlers and subscribers on a fake clock.

The sans-I/O cores (``AgentCore``, ``HandlerCore``, ``TokenSelector``) are
wired through an in-memory network with a fixed one-way ``latency``; probes
answer after ``probe_latency`` (a refused connection) or after the health
check's timeout (a hung application). Nothing reads a real clock, so tests
and ``bench/health.py`` can measure detection times exactly and fast.

Peers are named the way ``HandlerService`` names them: ``agent:<host>`` for
a host's agent and ``classifier:<node>`` for a subscriber.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..config import ClusterConfig
from .agent import AgentCore
from .handler import HandlerCore
from .messages import Subscribe, TokenAllotment
from .tokens import TokenSelector

__all__ = ["AppState", "HealthSim", "Received"]

AppState = Literal["ok", "refused", "hung"]


@dataclass(frozen=True, slots=True)
class Received:
    """An allotment a subscriber received."""

    at: float
    node: str
    handler: str
    allotment: TokenAllotment


class HealthSim:
    def __init__(
        self,
        config: ClusterConfig,
        *,
        handlers: list[str] | None = None,
        latency: float = 0.0005,
        probe_latency: float = 0.001,
        start: float = 0.0,
    ) -> None:
        self.config = config
        self.now = start
        self.latency = latency
        self.probe_latency = probe_latency
        self.timeouts = {a.name: a.health_check.timeout for a in config.applications}
        self.agents: dict[str, AgentCore] = {}
        self.handlers: dict[str, HandlerCore] = {}
        self.host_alive: dict[str, bool] = {}
        self.app_state: dict[tuple[str, str], AppState] = {}
        self.selectors: dict[str, TokenSelector] = {}
        self.received: list[Received] = []
        self.delivered: list[tuple[float, str, str, object]] = []
        """Every message delivered: (time, sender, receiver, message)."""
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        for name in handlers if handlers is not None else [h.name for h in config.handlers]:
            self.handlers[name] = HandlerCore.from_config(config, name, start)
        for host in config.hosts:
            self.start_host(host.name)

    # -- scenario controls -----------------------------------------------------------

    def start_host(self, host: str) -> None:
        """(Re)start a host's agent now, connected to every handler."""
        agent = AgentCore.from_config(self.config, host, self.now)
        self.agents[host] = agent
        self.host_alive[host] = True
        for name in self.handlers:
            agent.handler_connected(name, self.now)
        self._drain()

    def kill_host(self, host: str) -> None:
        """The host stops: no more probes, heartbeats or answers."""
        self.host_alive[host] = False

    def set_app(self, host: str, app: str, state: AppState) -> None:
        self.app_state[(host, app)] = state

    def add_handler(self, name: str) -> HandlerCore:
        """Start a handler now with an empty cache; every live agent connects to it."""
        core = HandlerCore.from_config(self.config, name, self.now)
        self.handlers[name] = core
        for host, agent in self.agents.items():
            if self.host_alive[host]:
                agent.handler_connected(name, self.now)
        self._drain()
        return core

    def kill_handler(self, name: str) -> None:
        del self.handlers[name]
        for agent in self.agents.values():
            agent.handler_lost(name)

    def subscribe(self, node: str, handler: str, selector: TokenSelector | None = None) -> None:
        if selector is not None:
            self.selectors[node] = selector
        self._send(f"classifier:{node}", handler, Subscribe(node, []))

    def send(self, sender: str, handler: str, msg: object) -> None:
        """Deliver ``msg`` from peer ``sender`` to ``handler`` after the latency."""
        self._send(sender, handler, msg)

    # -- running ---------------------------------------------------------------------

    def run_until(self, t_end: float) -> None:
        while True:
            t = self._next_time()
            if t > t_end:
                self.now = max(self.now, t_end)
                return
            self.now = max(self.now, t)
            while self._queue and self._queue[0][0] <= self.now:
                _, _, action = heapq.heappop(self._queue)
                action()
            for host, agent in self.agents.items():
                if self.host_alive[host] and agent.get_timer() <= self.now:
                    agent.handle_timer(self.now)
            for core in self.handlers.values():
                if core.get_timer() <= self.now:
                    core.handle_timer(self.now)
            self._drain()

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_while(self, cond: Callable[[], bool], limit: float) -> float:
        """Run until ``cond()`` is false (checked after each step) or ``limit``; returns now."""
        while cond():
            t = self._next_time()
            if t > limit:
                self.now = limit
                return self.now
            self.run_until(t)
        return self.now

    # -- internals -------------------------------------------------------------------

    def _next_time(self) -> float:
        times = [self._queue[0][0]] if self._queue else []
        times += [a.get_timer() for h, a in self.agents.items() if self.host_alive[h]]
        times += [c.get_timer() for c in self.handlers.values()]
        return min(times) if times else float("inf")

    def _at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), action))

    def _send(self, sender: str, handler: str, msg: object) -> None:
        def deliver() -> None:
            core = self.handlers.get(handler)
            if core is None:
                return
            self.delivered.append((self.now, sender, handler, msg))
            core.on_message(sender, msg, self.now)
            self._drain()

        self._at(self.now + self.latency, deliver)

    def _drain(self) -> None:
        for host, agent in self.agents.items():
            if not self.host_alive[host]:
                agent.messages()
                agent.probes_due()
                continue
            for app in agent.probes_due():
                self._probe(host, agent, app)
            for handler, msg in agent.messages():
                self._send(f"agent:{host}", handler, msg)
        for name, core in list(self.handlers.items()):
            for peer, msg in core.messages():
                self._from_handler(name, peer, msg)

    def _probe(self, host: str, agent: AgentCore, app: str) -> None:
        state = self.app_state.get((host, app), "ok")
        delay = self.timeouts[app] if state == "hung" else self.probe_latency

        def done() -> None:
            if self.host_alive[host] and self.agents[host] is agent:
                agent.on_probe(app, state == "ok", self.now)
                self._drain()

        self._at(self.now + delay, done)

    def _from_handler(self, handler: str, peer: str, msg: object) -> None:
        kind, _, node = peer.partition(":")

        def deliver() -> None:
            if kind == "agent":
                agent = self.agents.get(node)
                if agent is None or not self.host_alive[node]:
                    return
                self.delivered.append((self.now, handler, peer, msg))
                agent.on_message(handler, msg, self.now)
                self._drain()
                return
            self.delivered.append((self.now, handler, peer, msg))
            if isinstance(msg, TokenAllotment):
                self.received.append(Received(self.now, node, handler, msg))
                selector = self.selectors.get(node)
                if selector is not None:
                    selector.on_allotment(msg, self.now)

        self._at(self.now + self.latency, deliver)
