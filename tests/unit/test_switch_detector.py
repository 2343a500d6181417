"""FailureDetector on a fake clock: detection bounds, late replies, rise, independence."""

from __future__ import annotations

import pytest

from hanlb.switch.detector import (
    TRANSITIONS,
    FailureDetector,
    PeerRecovered,
    PeerState,
    PeerSuspected,
    Verdict,
)

INTERVAL = 0.05


class Clock:
    """Drives a detector through time; the peers in ``answering`` reply after ``delay``."""

    def __init__(self, det: FailureDetector, delay: float = 0.001) -> None:
        self.det = det
        self.now = 0.0
        self.delay = delay
        self.answering: set[str] = set()
        self.inflight: list[tuple[float, str, int]] = []
        self.events: list[tuple[float, object]] = []

    def run_until(self, end: float) -> None:
        self._send()
        while True:
            timer = self.det.get_timer()
            due = [t for t, _, _ in self.inflight]
            nxt = min([*due, timer if timer is not None else end + 1])
            if nxt > end:
                self.now = end
                return
            self.now = nxt
            for item in [i for i in self.inflight if i[0] <= self.now]:
                self.inflight.remove(item)
                self.det.on_reply(item[1], item[2], self.now)
            if timer is not None and timer <= self.now:
                self.det.handle_timer(self.now)
            while (ev := self.det.next_event()) is not None:
                self.events.append((self.now, ev))
            self._send()

    def _send(self) -> None:
        for name, seq in self.det.probes_due(self.now):
            if name in self.answering:
                self.inflight.append((self.now + self.delay, name, seq))


def make(misses: int = 3, rise: int = 3, peers: tuple[str, ...] = ("fw1",)) -> Clock:
    det = FailureDetector(interval=INTERVAL, misses=misses, rise=rise, now=0.0)
    for p in peers:
        det.add_peer(p, now=0.0)
    clock = Clock(det)
    clock.answering = set(peers)
    return clock


def test_style_example() -> None:
    det = FailureDetector(interval=0.05, misses=3, rise=2, now=0.0)
    det.add_peer("fw1", now=0.0)
    assert det.probes_due(0.0) == [("fw1", 1)]
    for _ in range(3):
        timer = det.get_timer()
        assert timer is not None
        det.handle_timer(now=timer)
        det.probes_due(timer)
    assert det.next_event() == PeerSuspected("fw1")
    assert det.next_event() is None


def test_table_is_complete() -> None:
    assert set(TRANSITIONS) == set(PeerState)
    for row in TRANSITIONS.values():
        assert set(row) == set(Verdict)


@pytest.mark.parametrize("misses", [1, 2, 3, 5])
@pytest.mark.parametrize("offset", [0.0005, 0.01, 0.025, 0.049])
def test_detection_within_misses_plus_one_interval(misses: int, offset: float) -> None:
    clock = make(misses=misses)
    clock.run_until(1.0 + offset)
    assert clock.events == []
    last_reply = clock.det.view("fw1").last_reply
    assert last_reply is not None
    clock.answering.clear()
    clock.inflight.clear()
    clock.run_until(3.0)
    assert len(clock.events) == 1
    at, ev = clock.events[0]
    assert ev == PeerSuspected("fw1")
    silence = at - last_reply
    assert INTERVAL * misses - 1e-9 <= silence <= INTERVAL * (misses + 1) + 1e-9
    assert not clock.det.is_live("fw1")
    assert clock.det.view("fw1").suspicions == 1


def test_exact_tick_of_detection() -> None:
    """Probes at 0, .05, .10, ...; fw1 answers through t=1.0, then dies at 1.0+."""
    clock = make(misses=3)
    clock.run_until(1.0 + 0.002)  # probe at 1.0 answered at 1.001
    clock.answering.clear()
    clock.run_until(2.0)
    # intervals ending 1.05 (answered), 1.10, 1.15, 1.20 missed -> suspected at 1.20
    assert clock.events == [(pytest.approx(1.20), PeerSuspected("fw1"))]


def test_late_replies_within_window_cause_no_suspicion() -> None:
    clock = make(misses=3)
    clock.delay = INTERVAL * 2.5  # every reply lands two and a half intervals late
    clock.run_until(5.0)
    assert clock.events == []
    assert clock.det.is_live("fw1")


def test_replies_older_than_window_are_stale() -> None:
    det = FailureDetector(interval=INTERVAL, misses=2, rise=1, now=0.0)
    det.add_peer("fw1", 0.0)
    ((_, first),) = det.probes_due(0.0)
    t = 0.0
    for _ in range(4):
        t += INTERVAL
        det.handle_timer(t)
        det.probes_due(t)
    assert det.on_reply("fw1", first, t) is False
    assert det.on_reply("fw1", 999, t) is False
    assert det.on_reply("nobody", 1, t) is False


def test_duplicate_reply_counts_once() -> None:
    det = FailureDetector(interval=INTERVAL, misses=1, rise=1, now=0.0)
    det.add_peer("fw1", 0.0)
    ((_, seq),) = det.probes_due(0.0)
    assert det.on_reply("fw1", seq, 0.01)
    assert not det.on_reply("fw1", seq, 0.02)


def test_one_missed_interval_is_not_enough() -> None:
    clock = make(misses=3)
    clock.run_until(1.025)
    clock.answering.clear()
    clock.run_until(1.025 + 2 * INTERVAL)  # probes at 1.05 and 1.10 unanswered
    clock.answering.add("fw1")
    clock.run_until(3.0)
    assert clock.events == []
    assert clock.det.view("fw1").state is PeerState.UP


@pytest.mark.parametrize("rise", [1, 2, 3, 4])
def test_rise_hysteresis(rise: int) -> None:
    clock = make(misses=2, rise=rise)
    clock.answering.clear()
    clock.run_until(1.0)
    assert [e for _, e in clock.events] == [PeerSuspected("fw1")]
    clock.events.clear()
    clock.answering.add("fw1")
    back = clock.now
    clock.run_until(back + INTERVAL * (rise + 2))
    assert [e for _, e in clock.events] == [PeerRecovered("fw1")]
    at = clock.events[0][0]
    # the first answered interval ends at most one interval after replies resume
    assert INTERVAL * (rise - 1) < at - back <= INTERVAL * (rise + 1) + 1e-9
    assert clock.det.view("fw1").recoveries == 1


def test_flapping_does_not_restore() -> None:
    clock = make(misses=1, rise=3)
    clock.answering.clear()
    clock.run_until(0.2)
    assert [e for _, e in clock.events] == [PeerSuspected("fw1")]
    # answer two intervals out of three: never three in a row
    for i in range(30):
        if i % 3 == 2:
            clock.answering.discard("fw1")
        else:
            clock.answering.add("fw1")
        clock.run_until(clock.now + INTERVAL)
    assert [e for _, e in clock.events] == [PeerSuspected("fw1")]
    assert not clock.det.is_live("fw1")


def test_peers_are_independent() -> None:
    clock = make(misses=3, rise=2, peers=("fw1", "fw2", "fw3"))
    clock.det.add_peer("fw4", now=0.0)
    clock.answering.add("fw4")
    clock.run_until(1.0)
    clock.answering.discard("fw2")
    clock.run_until(2.0)
    assert [e for _, e in clock.events] == [PeerSuspected("fw2")]
    assert sorted(clock.det.live_peers()) == ["fw1", "fw3", "fw4"]
    clock.answering.discard("fw3")
    clock.answering.add("fw2")
    clock.run_until(3.0)
    assert sorted(e.name for _, e in clock.events if isinstance(e, PeerSuspected)) == [
        "fw2",
        "fw3",
    ]
    assert [e for _, e in clock.events if isinstance(e, PeerRecovered)] == [PeerRecovered("fw2")]
    assert sorted(clock.det.live_peers()) == ["fw1", "fw2", "fw4"]


def test_peer_added_late_has_its_own_schedule() -> None:
    det = FailureDetector(interval=INTERVAL, misses=2, rise=1, now=0.0)
    det.add_peer("fw1", 0.0)
    det.add_peer("fw2", 0.02)
    assert det.get_timer() == pytest.approx(0.05)
    det.probes_due(0.02)
    det.handle_timer(0.05)
    assert det.get_timer() == pytest.approx(0.07)
    assert [n for n, _ in det.probes_due(0.05)] == ["fw1"]


def test_stall_is_judged_once() -> None:
    clock = make(misses=3)
    clock.run_until(1.0)
    clock.det.handle_timer(5.0)  # the event loop was stuck for 4 s
    assert clock.det.next_event() is None
    assert clock.det.is_live("fw1")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        FailureDetector(interval=0, misses=3, rise=1, now=0.0)
    det = FailureDetector(interval=INTERVAL, misses=3, rise=1, now=0.0)
    det.add_peer("fw1", 0.0)
    with pytest.raises(ValueError):
        det.add_peer("fw1", 0.0)
    det.remove_peer("fw1")
    assert det.get_timer() is None
