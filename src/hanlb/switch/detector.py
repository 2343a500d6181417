"""Sans-I/O failure detector for the LB-aware switch's forwarder probes (claims 3, 5).

Driven like aioquic's connection, it never reads a clock::

    det.add_peer("fw1", now)
    det.probes_due(now)            # -> [("fw1", 1)]: send Ping(seq=1) to fw1
    det.on_reply("fw1", 1, now)    # a Pong(seq=1) came back
    det.handle_timer(now)          # at det.get_timer()
    det.next_event()               # PeerSuspected("fw1") / PeerRecovered("fw1") / None

Time is cut per peer into probe intervals of ``interval`` seconds, starting when
the peer is added. One probe goes out at the start of each interval. When an
interval ends it counts as *answered* if any reply to one of the peer's
outstanding probes arrived during it (a reply to an older probe that is merely
late counts), else as *missed*. ``misses`` missed intervals in a row make the
peer suspected, so a peer that dies is suspected between ``interval * misses``
and ``interval * (misses + 1)`` after its last reply. ``rise`` answered
intervals in a row restore a suspected peer.

A peer starts live (a configured next hop is used until it is shown dead, like a
static route; a restarted switch must not drop traffic it could carry). If the
caller stalls for more than a whole interval, the overdue intervals are judged
as one: a switch that was not scheduled did not learn that its peers died.

Replies whose sequence number is not outstanding (never sent, already answered,
or older than ``misses + 1`` probes) are ignored and ``on_reply`` returns False.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "TRANSITIONS",
    "FailureDetector",
    "PeerRecovered",
    "PeerState",
    "PeerSuspected",
    "PeerView",
    "Verdict",
]


class PeerState(enum.Enum):
    UP = "up"
    """Live; the last interval was answered."""
    FAILING = "failing"
    """Live; one or more intervals missed, fewer than ``misses``."""
    DOWN = "down"
    """Suspected; the last interval was missed."""
    RISING = "rising"
    """Suspected; one or more intervals answered, fewer than ``rise``."""

    @property
    def live(self) -> bool:
        return self in (PeerState.UP, PeerState.FAILING)


class Verdict(enum.Enum):
    """How one probe interval ended, with its streak already counted."""

    ANSWERED = "answered"
    ANSWERED_RISE = "answered, rise reached"
    MISSED = "missed"
    MISSED_LIMIT = "missed, misses reached"


S, V = PeerState, Verdict

TRANSITIONS: Final[dict[PeerState, dict[Verdict, PeerState]]] = {
    S.UP: {
        V.ANSWERED: S.UP,
        V.ANSWERED_RISE: S.UP,
        V.MISSED: S.FAILING,
        V.MISSED_LIMIT: S.DOWN,
    },
    S.FAILING: {
        V.ANSWERED: S.UP,
        V.ANSWERED_RISE: S.UP,
        V.MISSED: S.FAILING,
        V.MISSED_LIMIT: S.DOWN,
    },
    S.DOWN: {
        V.ANSWERED: S.RISING,
        V.ANSWERED_RISE: S.UP,
        V.MISSED: S.DOWN,
        V.MISSED_LIMIT: S.DOWN,
    },
    S.RISING: {
        V.ANSWERED: S.RISING,
        V.ANSWERED_RISE: S.UP,
        V.MISSED: S.DOWN,
        V.MISSED_LIMIT: S.DOWN,
    },
}
"""Per-peer state after an interval's verdict. Leaving a live state for a
suspected one emits ``PeerSuspected``; the reverse emits ``PeerRecovered``."""

del S, V


@dataclass(frozen=True, slots=True)
class PeerSuspected:
    name: str


@dataclass(frozen=True, slots=True)
class PeerRecovered:
    name: str


Event = PeerSuspected | PeerRecovered


@dataclass(slots=True)
class _Peer:
    name: str
    next_tick: float
    state: PeerState = PeerState.UP
    next_seq: int = 1
    probe_due: bool = True
    answered: bool = False
    miss_streak: int = 0
    rise_streak: int = 0
    outstanding: deque[tuple[int, float]] = field(default_factory=deque)
    added: float = 0.0
    last_reply: float | None = None
    last_rtt: float | None = None
    changed: float = 0.0
    suspicions: int = 0
    recoveries: int = 0


@dataclass(frozen=True, slots=True)
class PeerView:
    """A read-only snapshot of one peer, for status pages and logs."""

    name: str
    state: PeerState
    live: bool
    last_reply: float | None
    """When the last accepted reply arrived (None: never)."""
    last_rtt: float | None
    changed: float
    """When the peer last became live or suspected (or was added)."""
    suspicions: int
    recoveries: int


class FailureDetector:
    def __init__(self, interval: float, misses: int, rise: int, now: float) -> None:
        if interval <= 0 or misses < 1 or rise < 1:
            raise ValueError("interval must be > 0, misses and rise >= 1")
        self.interval = interval
        self.misses = misses
        self.rise = rise
        self._peers: dict[str, _Peer] = {}
        self._events: deque[Event] = deque()

    # -- peers -----------------------------------------------------------------

    def add_peer(self, name: str, now: float) -> None:
        """Start probing ``name``; it counts as live until shown otherwise."""
        if name in self._peers:
            raise ValueError(f"peer {name!r} already added")
        self._peers[name] = _Peer(name, next_tick=now + self.interval, added=now, changed=now)

    def remove_peer(self, name: str) -> None:
        del self._peers[name]

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    def is_live(self, name: str) -> bool:
        return self._peers[name].state.live

    def live_peers(self) -> list[str]:
        return [p.name for p in self._peers.values() if p.state.live]

    def view(self, name: str) -> PeerView:
        p = self._peers[name]
        return PeerView(
            p.name,
            p.state,
            p.state.live,
            p.last_reply,
            p.last_rtt,
            p.changed,
            p.suspicions,
            p.recoveries,
        )

    # -- inputs ----------------------------------------------------------------

    def on_reply(self, name: str, seq: int, now: float) -> bool:
        """A reply to probe ``seq`` arrived from ``name``. False if it was not expected."""
        p = self._peers.get(name)
        if p is None:
            return False
        for i, (sent_seq, sent_at) in enumerate(p.outstanding):
            if sent_seq == seq:
                del p.outstanding[i]
                p.answered = True
                p.last_reply = now
                p.last_rtt = now - sent_at
                return True
        return False

    def handle_timer(self, now: float) -> None:
        """Close every probe interval that has ended by ``now``."""
        for p in self._peers.values():
            if now < p.next_tick:
                continue
            self._judge(p, now)
            p.next_tick += self.interval
            if p.next_tick <= now:  # we stalled: judge the overdue stretch once
                p.next_tick = now + self.interval
            p.probe_due = True

    # -- outputs ---------------------------------------------------------------

    def probes_due(self, now: float) -> list[tuple[str, int]]:
        """Probes to send now, as ``(peer, seq)``; each is returned once."""
        out: list[tuple[str, int]] = []
        for p in self._peers.values():
            if not p.probe_due:
                continue
            p.probe_due = False
            seq = p.next_seq
            p.next_seq += 1
            p.outstanding.append((seq, now))
            while len(p.outstanding) > self.misses + 1:
                p.outstanding.popleft()
            out.append((p.name, seq))
        return out

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must be called next (None: no peers)."""
        return min((p.next_tick for p in self._peers.values()), default=None)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # -- internals -------------------------------------------------------------

    def _judge(self, p: _Peer, now: float) -> None:
        if p.answered:
            p.rise_streak += 1
            p.miss_streak = 0
            verdict = Verdict.ANSWERED_RISE if p.rise_streak >= self.rise else Verdict.ANSWERED
        else:
            p.miss_streak += 1
            p.rise_streak = 0
            verdict = Verdict.MISSED_LIMIT if p.miss_streak >= self.misses else Verdict.MISSED
        p.answered = False
        old, new = p.state, TRANSITIONS[p.state][verdict]
        p.state = new
        if old.live and not new.live:
            p.suspicions += 1
            p.changed = now
            self._events.append(PeerSuspected(p.name))
        elif new.live and not old.live:
            p.recoveries += 1
            p.changed = now
            self._events.append(PeerRecovered(p.name))
