"""An in-memory network and a fake clock for simulating sans-I/O cores.

``FakeNet`` delivers messages between named endpoints. A ``random.Random(seed)``
decides, per message, whether it is dropped, duplicated, and how long it is
delayed (a random base delay, plus sometimes a much longer one, which reorders
messages). Endpoints can be taken *down* (a crashed or frozen process: it gets
no messages and no timers, and what it sent is lost) and brought *up* again,
or *partitioned* (alive, but cut off from everyone).

Any component's core plugs in through the ``Endpoint`` protocol: ``deliver``
messages, ``get_timer`` and ``on_timer``; it sends with ``net.send``. ``run``
advances the ``FakeClock`` from event to event, so simulated seconds take
milliseconds. Put ``net.seed`` (or ``repr(net)``) in assertion messages so a
failure can be replayed.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Endpoint", "FakeClock", "FakeNet", "Link"]


class FakeClock:
    """Monotonic ``now`` plus a wall clock that is ``now + wall_offset``."""

    def __init__(self, start: float = 0.0, wall_offset: float = 1_800_000_000.0) -> None:
        self.now = start
        self.wall_offset = wall_offset

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + self.wall_offset

    def advance(self, dt: float) -> None:
        self.now += dt


class Endpoint(Protocol):
    def deliver(self, src: str, msg: object) -> None: ...

    def get_timer(self) -> float: ...

    def on_timer(self) -> None: ...


@dataclass(slots=True)
class Link:
    """Faults of the path between two endpoints (or the default for all)."""

    drop: float = 0.0
    dup: float = 0.0
    delay: tuple[float, float] = (0.0005, 0.002)
    reorder: float = 0.0
    """Probability that a message is held back by up to ``reorder_delay`` more."""
    reorder_delay: float = 0.02


@dataclass(order=True, slots=True)
class _InFlight:
    at: float
    seq: int
    src: str = field(compare=False)
    dst: str = field(compare=False)
    msg: object = field(compare=False)


class FakeNet:
    def __init__(self, clock: FakeClock, seed: int, faults: Link | None = None) -> None:
        self.clock = clock
        self.seed = seed
        self.random = random.Random(seed)
        self.faults = faults or Link()
        self.paths: dict[tuple[str, str], Link] = {}
        """Per (src, dst) faults overriding ``faults``."""
        self.endpoints: dict[str, Endpoint] = {}
        self.down: set[str] = set()
        self.partitioned: set[str] = set()
        self.stats: Counter[str] = Counter()
        self._queue: list[_InFlight] = []
        self._seq = itertools.count()
        self.trace: Callable[[float, str, str, object], None] | None = None
        """Called for every delivered message, if set."""

    def __repr__(self) -> str:
        return f"FakeNet(seed={self.seed}, t={self.clock.now:.3f}, stats={dict(self.stats)})"

    # -- topology ------------------------------------------------------------------

    def attach(self, name: str, endpoint: Endpoint) -> None:
        self.endpoints[name] = endpoint

    def set_down(self, name: str) -> None:
        self.down.add(name)

    def set_up(self, name: str) -> None:
        self.down.discard(name)

    def partition(self, name: str) -> None:
        self.partitioned.add(name)

    def heal(self, name: str | None = None) -> None:
        if name is None:
            self.partitioned.clear()
        else:
            self.partitioned.discard(name)

    def _cut(self, a: str, b: str) -> bool:
        return a in self.down or b in self.down or a in self.partitioned or b in self.partitioned

    # -- traffic -----------------------------------------------------------------------

    def send(self, src: str, dst: str, msg: object) -> None:
        self.stats["sent"] += 1
        if self._cut(src, dst) or dst not in self.endpoints:
            self.stats["lost_cut"] += 1
            return
        f = self.paths.get((src, dst), self.faults)
        rnd = self.random
        if rnd.random() < f.drop:
            self.stats["dropped"] += 1
            return
        copies = 2 if rnd.random() < f.dup else 1
        if copies == 2:
            self.stats["duplicated"] += 1
        for _ in range(copies):
            delay = rnd.uniform(*f.delay)
            if rnd.random() < f.reorder:
                delay += rnd.uniform(0, f.reorder_delay)
                self.stats["reordered"] += 1
            heapq.heappush(
                self._queue, _InFlight(self.clock.now + delay, next(self._seq), src, dst, msg)
            )

    def next_time(self) -> float:
        when = self._queue[0].at if self._queue else math.inf
        for name, ep in self.endpoints.items():
            if name not in self.down:
                when = min(when, ep.get_timer())
        return when

    def step(self, until: float) -> bool:
        """Run the next event (a delivery or timer) due by ``until``; False if none."""
        when = self.next_time()
        if when > until:
            return False
        self.clock.now = max(self.clock.now, when)
        now = self.clock.now
        if self._queue and self._queue[0].at <= now:
            item = heapq.heappop(self._queue)
            if self._cut(item.src, item.dst):
                self.stats["lost_cut"] += 1
                return True
            self.stats["delivered"] += 1
            if self.trace is not None:
                self.trace(now, item.src, item.dst, item.msg)
            self.endpoints[item.dst].deliver(item.src, item.msg)
            return True
        for name, ep in list(self.endpoints.items()):
            if name not in self.down and ep.get_timer() <= now:
                ep.on_timer()
        return True

    def run(self, duration: float) -> None:
        """Advance the clock by ``duration``, running everything due meanwhile."""
        until = self.clock.now + duration
        while self.step(until):
            pass
        self.clock.now = until

    def run_until(self, cond: Callable[[], bool], timeout: float) -> bool:
        """Run until ``cond()`` holds (checked after each event); False on timeout."""
        until = self.clock.now + timeout
        while not cond():
            if not self.step(until):
                self.clock.now = until
                return cond()
        return True
