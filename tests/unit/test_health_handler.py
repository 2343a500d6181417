"""The HL handler's core: cache by heartbeat/snapshot, dead hosts, token allotments."""

from __future__ import annotations

import random

import pytest

from hanlb.health.handler import (
    AppHealthChanged,
    Candidate,
    HandlerCore,
    HostLost,
    allot_tokens,
    spare_milli,
)
from hanlb.health.messages import (
    GetTableSnapshot,
    Heartbeat,
    RequestAllotment,
    SendTableSnapshot,
    Subscribe,
    TokenAllotment,
)
from hanlb.health.sim import HealthSim
from hanlb.health.table import HealthTable, make_row
from tests.unit.test_health_config import WEIGHTS, health_config

# -- the allotment formula -----------------------------------------------------------


def cands(
    loads: dict[str, tuple[float, float]] | None = None, down: frozenset[str] = frozenset()
) -> list[Candidate]:
    loads = loads or {}
    return [Candidate(h, w, h not in down, *loads.get(h, (0.0, -1.0))) for h, w in WEIGHTS.items()]


def test_weights_1_2_4_1_give_proportional_tokens() -> None:
    assert allot_tokens(1000, cands()) == [125, 250, 500, 125]
    assert allot_tokens(8, cands()) == [1, 2, 4, 1]


def test_largest_remainder_rounding_is_exact() -> None:
    assert allot_tokens(10, cands()) == [1, 3, 5, 1]  # quotas 1.25 2.5 5 1.25
    for total in range(1, 200):
        assert sum(allot_tokens(total, cands())) == total
    # ties go to the earlier endpoint in pool order
    assert allot_tokens(1, [Candidate("a", 1, True), Candidate("b", 1, True)]) == [1, 0]


def test_injected_load_moves_tokens_away() -> None:
    # h4 at cpu 0.5 -> share 1*500 vs h1 1*1000: quotas 133.3 266.7 533.3 66.7
    assert allot_tokens(1000, cands({"h4": (0.5, -1.0)})) == [133, 267, 533, 67]
    # the application's own report counts when it is the larger measure
    # (h3: spare 0.25 -> share 4 * 250 = 1000, the same as h1's 1 * 1000)
    assert allot_tokens(1000, cands({"h3": (0.1, 0.75)})) == [200, 400, 200, 200]
    # a saturated endpoint keeps the 0.05 floor
    assert spare_milli(1.0, 1.0) == 50
    assert allot_tokens(1000, cands({"h3": (1.0, -1.0)})) == [
        238,
        476,
        48,
        238,
    ]  # 4200ths: 238.1 476.2 47.6 238.1


def test_down_hosts_get_nothing_and_all_down_gives_zeros() -> None:
    assert allot_tokens(1000, cands(down=frozenset({"h3"}))) == [250, 500, 0, 250]
    assert allot_tokens(1000, cands(down=frozenset(WEIGHTS))) == [0, 0, 0, 0]
    zero = [Candidate("a", 0, True), Candidate("b", 3, True)]
    assert allot_tokens(9, zero) == [0, 9]


# -- heartbeats and snapshots ---------------------------------------------------------


def heartbeat(host: str, table: HealthTable) -> Heartbeat:
    return Heartbeat(host, table.version, table.checksum(), table.portion_sums())


def handler(**health: object) -> HandlerCore:
    return HandlerCore.from_config(health_config(health=health or None), "hl1", now=0.0)


def synced_handler() -> tuple[HandlerCore, dict[str, HealthTable]]:
    """A handler whose cache holds every host's table (all endpoints up)."""
    core = handler()
    tables = {}
    for host in WEIGHTS:
        t = HealthTable()
        for app, pool in core.pools.items():
            if host in pool:
                t.put(make_row(app, True, weight=pool[host]))
        tables[host] = t
        core.on_message(f"agent:{host}", heartbeat(host, t), 0.0)
    for peer, msg in core.messages():
        assert isinstance(msg, GetTableSnapshot) and msg.portions == []
        host = peer.removeprefix("agent:")
        t = tables[host]
        core.on_message(peer, SendTableSnapshot(msg.req_id, host, t.version, t.rows()), 0.0)
    assert all(h.synced for h in core.hosts.values())
    return core, tables


def test_unknown_host_gets_a_whole_table_request() -> None:
    core = handler()
    t = HealthTable([make_row("web", True)])
    core.on_message("agent:h3", heartbeat("h3", t), 0.0)
    assert core.messages() == [("agent:h3", GetTableSnapshot(1, []))]
    core.on_message("agent:h3", heartbeat("ghost", t), 0.0)
    assert core.messages() == [] and core.counters["heartbeats_unknown_host"] == 1


def test_checksum_mismatch_asks_for_exactly_the_changed_portion() -> None:
    core, tables = synced_handler()
    t = tables["h1"]
    core.on_message("agent:h1", heartbeat("h1", t), 1.0)
    assert core.messages() == [] and core.counters["heartbeats_in_sync"] >= 1
    t.put(make_row("api", True, active_connections=40, cpu=0.3))
    core.on_message("agent:h1", heartbeat("h1", t), 1.2)
    [(peer, req)] = core.messages()
    assert peer == "agent:h1" and isinstance(req, GetTableSnapshot)
    assert req.portions == ["api"]
    core.on_message(
        "agent:h1", SendTableSnapshot(req.req_id, "h1", t.version, t.snapshot(["api"])), 1.2
    )
    assert core.hosts["h1"].table.checksum() == t.checksum()
    assert core.hosts["h1"].table.row("api") == t.row("api")
    core.on_message("agent:h1", heartbeat("h1", t), 1.4)
    assert core.messages() == []


def test_a_version_that_goes_backwards_asks_for_the_whole_table() -> None:
    core, _ = synced_handler()
    restarted = HealthTable([make_row("web", False, weight=1)])  # the agent restarted
    core.on_message("agent:h1", heartbeat("h1", restarted), 1.0)
    [(_, req)] = core.messages()
    assert isinstance(req, GetTableSnapshot) and req.portions == []
    core.on_message(
        "agent:h1", SendTableSnapshot(req.req_id, "h1", restarted.version, restarted.rows()), 1.0
    )
    assert core.hosts["h1"].table.checksum() == restarted.checksum()
    assert core.hosts["h1"].table.row("api") is None


def test_stale_and_unsolicited_snapshots_are_ignored() -> None:
    core, tables = synced_handler()
    t = tables["h2"]
    core.on_message("agent:h2", SendTableSnapshot(999, "h2", 50, []), 1.0)
    assert core.counters["snapshots_unsolicited"] == 1
    t.put(make_row("web", False, weight=2))
    core.on_message("agent:h2", heartbeat("h2", t), 1.0)
    [(_, req)] = core.messages()
    assert isinstance(req, GetTableSnapshot)
    core.on_message("agent:h2", SendTableSnapshot(req.req_id, "h2", 0, []), 1.0)
    assert core.counters["snapshots_stale"] == 1


def test_dead_host_is_down_exactly_misses_times_interval_after_its_last_heartbeat() -> None:
    core, tables = synced_handler()
    core.on_message("classifier:cl1", Subscribe("cl1", []), 0.0)
    core.messages()
    last = 3.7
    for host, t in tables.items():
        core.on_message(f"agent:{host}", heartbeat(host, t), last if host == "h3" else 4.0)
    core.events()
    deadline = last + 3 * 0.2
    assert core.get_timer() == deadline
    core.handle_timer(deadline - 1e-9)
    assert core.is_up("web", "h3") and core.events() == []
    core.handle_timer(deadline)
    assert not core.is_up("web", "h3")
    events = core.events()
    assert HostLost("h3", deadline) in events
    assert AppHealthChanged("web", ("h1", "h2", "h4"), deadline) in events
    [(peer, allot)] = core.messages()
    assert peer == "classifier:cl1" and isinstance(allot, TokenAllotment)
    assert {e.host: e.tokens for e in allot.entries} == {"h1": 250, "h2": 500, "h3": 0, "h4": 250}
    # heartbeats again: up again at once (its cache still matches)
    core.on_message("agent:h3", heartbeat("h3", tables["h3"]), 5.0)
    assert core.is_up("web", "h3")
    [(_, allot2)] = core.messages()
    assert isinstance(allot2, TokenAllotment) and allot2.allotment_id > allot.allotment_id


def test_dead_host_detection_time_in_simulation() -> None:
    """From the host's death to a subscriber's allotment without it: within
    ((misses - 1) * interval, misses * interval] plus the network latencies."""
    cfg = health_config()
    h = cfg.health
    rng = random.Random(11)
    for _ in range(20):
        sim = HealthSim(cfg, latency=0.0005)
        sim.subscribe("cl1", "hl1")
        sim.run_until(1.0 + rng.random())
        died = sim.now
        sim.kill_host("h2")

        def h2_has_tokens(sim: HealthSim = sim) -> bool:
            last = [r for r in sim.received if r.allotment.app == "web"][-1]
            return any(e.host == "h2" and e.tokens for e in last.allotment.entries)

        sim.run_while(h2_has_tokens, died + 5)
        detected = sim.now - died
        low = (h.heartbeat_misses - 1) * h.heartbeat_interval
        high = h.heartbeat_misses * h.heartbeat_interval + 2 * sim.latency
        assert low <= detected <= high + 1e-9, detected


# -- subscriptions and readiness ------------------------------------------------------


def test_subscribe_and_request_get_allotments() -> None:
    core, _ = synced_handler()
    core.on_message("classifier:cl1", Subscribe("cl1", ["web", "nope"]), 1.0)
    [(peer, a)] = core.messages()
    assert peer == "classifier:cl1" and isinstance(a, TokenAllotment)
    assert a.app == "web" and a.source == "hl1" and a.ttl == 5.0
    assert [(e.host, e.tokens) for e in a.entries] == [
        ("h1", 125),
        ("h2", 250),
        ("h3", 500),
        ("h4", 125),
    ]
    assert core.counters["unknown_app"] == 1
    core.on_message("classifier:cl1", RequestAllotment("api", a.allotment_id), 1.0)
    [(_, b)] = core.messages()
    assert isinstance(b, TokenAllotment) and b.app == "api" and b.allotment_id > a.allotment_id


def test_a_fresh_handler_answers_only_once_it_has_every_host_or_the_wait_is_over() -> None:
    core = handler()
    core.on_message("classifier:cl1", Subscribe("cl1", []), 0.0)
    assert core.messages() == []
    t = HealthTable([make_row("api", True), make_row("web", True)])
    core.on_message("agent:h1", heartbeat("h1", t), 0.1)
    [(_, req)] = core.messages()
    assert isinstance(req, GetTableSnapshot)
    core.on_message("agent:h1", SendTableSnapshot(req.req_id, "h1", t.version, t.rows()), 0.1)
    assert core.messages() == []  # h2 not heard yet: api not ready
    assert core.get_timer() == pytest.approx(0.6)
    core.handle_timer(core.get_timer())  # the others are silent: down
    sent = dict((a.app, a) for _, a in core.messages() if isinstance(a, TokenAllotment))
    assert {e.host: e.tokens for e in sent["api"].entries} == {"h1": 1000, "h2": 0}
    assert {e.host: e.tokens for e in sent["web"].entries}["h1"] == 1000


def test_a_handler_starting_empty_converges_to_the_agents_tables() -> None:
    cfg = health_config(handlers=1)
    sim = HealthSim(cfg, handlers=["hl1"])
    sim.run_until(2.0)
    sim.agents["h2"].on_load("web", 17, 0.4, 0.3)
    sim.set_app("h4", "web", "refused")
    sim.run_until(3.0)
    started = sim.now
    fresh = sim.add_handler("hl2")
    interval = cfg.health.heartbeat_interval

    def converged() -> bool:
        return all(
            fresh.hosts[h].synced and fresh.hosts[h].table.checksum() == a.table.checksum()
            for h, a in sim.agents.items()
        )

    sim.run_while(lambda: not converged(), started + 3 * interval)
    assert converged(), "not converged within 3 heartbeat intervals"
    assert sim.now - started < interval  # in fact at the first heartbeat
    for host, agent in sim.agents.items():
        assert fresh.hosts[host].table.rows() == agent.table.rows()
    assert fresh.tokens("web") == sim.handlers["hl1"].tokens("web")
    assert fresh.tokens("web")["h4"] == 0
