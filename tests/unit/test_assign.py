"""Classifier assignment and failover for a forwarder, on a fake clock (claims 56-58)."""

from __future__ import annotations

from hanlb.forwarder.assign import ClassifierChoice
from hanlb.switch.detector import FailureDetector, PeerSuspected


def test_most_preferred_reachable_classifier_is_used() -> None:
    choice = ClassifierChoice(["cl1", "cl2", "cl3"], retry=0.2)
    assert choice.next_candidate(now=0.0) == "cl1"
    choice.failed("cl1", now=0.0)
    assert choice.next_candidate(now=0.1) == "cl2"
    choice.failed("cl2", now=0.1)
    assert choice.next_candidate(now=0.15) == "cl3"
    choice.failed("cl3", now=0.15)
    # all backing off: the one whose backoff ends first, and when
    assert choice.next_candidate(now=0.16) == "cl1"
    assert choice.wait_until("cl1") == 0.2


def test_a_returning_preferred_classifier_is_offered_back() -> None:
    choice = ClassifierChoice(["cl1", "cl2"], retry=0.2)
    choice.failed("cl1", now=0.0)
    assert choice.next_candidate(now=0.0) == "cl2"
    assert choice.better_than("cl2", now=0.1) is None  # cl1 still backing off
    assert choice.better_than("cl2", now=0.3) == "cl1"
    assert choice.better_than("cl1", now=0.3) is None  # nothing better than the first


def test_a_dead_classifier_is_replaced_within_300_ms() -> None:
    """Pings every 50 ms, 3 misses: suspected at most 200 ms after its last
    answer; the next classifier is connected at once (it is not backing off)."""
    interval, misses = 0.05, 3
    for death in (0.0, 0.013, 0.049, 0.05, 0.071):  # phases of the ping cycle
        det = FailureDetector(interval, misses, 1, now=0.0)
        det.add_peer("cl1", now=0.0)
        choice = ClassifierChoice(["cl1", "cl2"], retry=0.2)
        now, suspected = 0.0, None
        while suspected is None:
            det.handle_timer(now)
            event = det.next_event()
            if isinstance(event, PeerSuspected):
                suspected = now
                break
            for _, seq in det.probes_due(now):
                if now < death:
                    det.on_reply("cl1", seq, now + 0.001)  # answered within 1 ms
            now = det.get_timer() or now + interval
        choice.failed("cl1", suspected)
        assert choice.next_candidate(suspected) == "cl2"
        assert suspected - death <= 0.2 + 1e-9, (death, suspected)
        assert suspected - death < 0.3
