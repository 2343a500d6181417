"""Issue 4 acceptance: host agents, HL handlers and token allotments in the lab.

Real-time bounds are documented at each check; the precise detection times are
measured on a fake clock in tests/unit/test_health_*.py and bench/health.py.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest

from hanlb.health.handler import Candidate, allot_tokens
from tests.lab.helpers import LabFactory, ctl, wait_for, wait_plumbed

HEARTBEAT = 0.2  # health.heartbeat_interval, the default the lab uses


def wait_allotments(apps: tuple[str, ...] = ("web",)) -> None:
    wait_for(lambda: all(a in ctl("hd1").get("apps_ready", []) for a in apps), 15, "handler ready")
    wait_for(
        lambda: ctl("cl1")["counters"].get("selector_allotments_received", 0) > 0,
        15,
        "classifier has an allotment",
    )


def background_load(lab: Any, **opts: Any) -> tuple[threading.Thread, list[dict[str, Any]]]:
    out: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: out.append(lab.load("hl-c1", "http", **opts)))
    t.start()
    return t, out


@pytest.mark.lab
def test_dead_application_gets_no_new_connections(lab_factory: LabFactory) -> None:
    lab = lab_factory(clients=1, forwarders=2, classifiers=1, hosts=4, handlers=2)
    lab.wait_ready()
    wait_plumbed(lab)
    wait_allotments()

    thread, out = background_load(lab, duration=9, concurrency=4, timeout=5, timeline=True)
    time.sleep(2.5)
    lab.kill("h2")  # the HTTP server on h2 stops; the host and its agent stay up
    stopped = time.time()
    time.sleep(3.5)
    lab.start("h2")
    restarted = time.time()
    thread.join(60)
    result = out[0]
    timeline = result["timeline"]

    failures = [(t, kind) for t, host, kind in timeline if kind != "ok"]
    late = [(round(t - stopped, 3), kind) for t, kind in failures if t > stopped + 1.0]
    last_failure = max((t for t, _ in failures), default=stopped) - stopped
    print(
        f"h2 stopped: {len(failures)} connections failed, the last one started "
        f"{last_failure:.3f} s after the stop; {result['ok']} ok in all"
    )
    # From 1 s after the stop no new connection goes to h2 (they would fail).
    assert not late, late
    # Nothing else was disturbed: failures only in the first second, and only
    # those that went to h2 (the other hosts kept serving throughout).
    assert all(stopped - 0.1 <= t <= stopped + 1.0 for t, _ in failures)
    during = Counter(h for t, h, k in timeline if stopped + 1.0 < t < restarted and k == "ok")
    assert set(during) == {"h1", "h3", "h4"}, during
    # h2 gets traffic again once it is back (rise 2 x 0.2 s + allotment).
    back = [t - restarted for t, h, k in timeline if h == "h2" and t > restarted]
    assert back, "h2 got no traffic after it came back"
    print(f"h2 served again {min(back):.3f} s after its restart")


@pytest.mark.lab
def test_shares_follow_weights_and_load(lab_factory: LabFactory) -> None:
    weights = (1, 2, 4, 1)
    lab = lab_factory(clients=1, forwarders=2, classifiers=1, hosts=4, handlers=2, weights=weights)
    lab.wait_ready()
    wait_plumbed(lab)
    wait_allotments()

    # While the load runs, sample the handler's view: the loads the agents report
    # and the tokens the handler allots from them.
    samples: list[dict[str, Any]] = []
    thread, out = background_load(lab, connections=3000, concurrency=6, timeout=10)
    while thread.is_alive():
        samples.append(ctl("hd1", "/hosts"))
        time.sleep(0.25)
    thread.join()
    result = out[0]
    assert result["failed"] == 0, result["errors"]
    assert samples

    # The documented formula (health/handler.py allot_tokens), applied to the
    # loads reported at each sample, predicts each host's share.
    predicted: Counter[str] = Counter()
    for view in samples:
        cands = [
            Candidate(
                h,
                view[h]["endpoints"]["web"]["weight"],
                view[h]["endpoints"]["web"]["up"],
                view[h]["endpoints"]["web"]["cpu"],
                view[h]["endpoints"]["web"]["app_load"],
            )
            for h in ("h1", "h2", "h3", "h4")
        ]
        tokens = dict(zip(("h1", "h2", "h3", "h4"), allot_tokens(1000, cands), strict=True))
        # the handler computed the same allotment from the same figures
        assert tokens == {h: view[h]["endpoints"]["web"]["tokens"] for h in tokens}
        for host, n in tokens.items():
            predicted[host] += n / 1000 / len(samples)
    served = result["served_by"]
    total = sum(served.values())
    for host in ("h1", "h2", "h3", "h4"):
        actual = served.get(host, 0) / total
        print(
            f"{host}: weight {weights[int(host[1]) - 1]}, predicted {predicted[host]:.3f}, "
            f"actual {actual:.3f}"
        )
        assert abs(actual - predicted[host]) <= 0.10 * predicted[host], (host, actual, predicted)


@pytest.mark.lab
def test_handler_dies_and_a_fresh_one_rebuilds(lab_factory: LabFactory) -> None:
    lab = lab_factory(clients=1, forwarders=2, classifiers=1, hosts=4, handlers=2)
    lab.wait_ready()
    wait_plumbed(lab)
    wait_allotments()
    wait_for(lambda: ctl("cl1")["handler"], 10, "classifier on a handler")
    used = ctl("cl1")["handler"]
    before = ctl("cl1")["counters"].get("health_handler_connects", 0)

    thread, out = background_load(lab, duration=6, concurrency=4, timeout=5)
    time.sleep(1.5)
    lab.kill(used)  # the handler the classifier gets its allotments from
    thread.join(60)
    result = out[0]
    assert result["failed"] == 0, result["errors"]
    assert set(result["served_by"]) == {"h1", "h2", "h3", "h4"}
    counters = ctl("cl1")["counters"]
    assert counters.get("health_handler_connects", 0) > before  # moved to the other
    assert ctl("cl1")["handler"] not in (None, used)
    assert counters.get("no_host", 0) == 0

    # A fresh, empty handler: its cache equals every agent's own table within
    # 3 heartbeat intervals of its start (measured from its admin socket's
    # first answer, i.e. once the process is up).
    lab.start(used)
    wait_for(lambda: ctl(used), 20, f"{used} answers")
    up_at = time.monotonic()

    def in_sync() -> bool:
        view = ctl(used, "/hosts")
        for host in ("h1", "h2", "h3", "h4"):
            agent = ctl(f"{host}-agent")
            if view.get(host, {}).get("checksum") != agent["checksum"]:
                return False
        return True

    wait_for(in_sync, 10, "fresh handler's cache equals the agents' tables", step=0.02)
    took = time.monotonic() - up_at
    print(f"fresh handler in sync {took:.3f} s after it answered ({took / HEARTBEAT:.1f} beats)")
    assert took <= 3 * HEARTBEAT + 0.5  # 3 intervals, plus the agents' reconnect delay
