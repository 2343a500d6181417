"""The host agent's core: rise/fall, heartbeats, snapshots, dead-application detection."""

from __future__ import annotations

import random

import pytest

from hanlb.health.agent import (
    TRANSITIONS,
    AgentCore,
    EndpointChanged,
    EndpointSpec,
    HealthState,
    LoadProbe,
    load_file_env,
)
from hanlb.health.messages import GetTableSnapshot, Heartbeat, SendTableSnapshot
from hanlb.health.sim import HealthSim
from hanlb.health.table import HealthTable
from tests.unit.test_health_config import health_config


def agent(rise: int = 2, fall: int = 3, interval: float = 0.2) -> AgentCore:
    core = AgentCore("h1", [EndpointSpec("web", 2, interval, rise, fall)], 0.2, now=0.0)
    core.handler_connected("hl1", 0.0)
    core.messages()
    return core


def test_transition_table_covers_every_state_and_result() -> None:
    assert set(TRANSITIONS) == set(HealthState)
    assert all(set(row) == {True, False} for row in TRANSITIONS.values())


def test_first_probe_decides_then_fall_and_rise_hysteresis() -> None:
    core = agent(rise=2, fall=3)
    assert not core.is_up("web")  # INIT counts as down
    core.on_probe("web", True, 0.0)
    assert core.is_up("web")
    assert core.events() == [EndpointChanged("web", True, 0.0)]
    core.on_probe("web", False, 0.2)
    core.on_probe("web", False, 0.4)
    assert core.is_up("web")
    core.on_probe("web", True, 0.6)  # a pass resets the streak
    core.on_probe("web", False, 0.8)
    core.on_probe("web", False, 1.0)
    assert core.is_up("web")
    core.on_probe("web", False, 1.2)
    assert not core.is_up("web")
    assert core.events() == [EndpointChanged("web", False, 1.2)]
    core.on_probe("web", True, 1.4)
    core.on_probe("web", False, 1.6)  # a failure resets the rise
    core.on_probe("web", True, 1.8)
    assert not core.is_up("web")
    core.on_probe("web", True, 2.0)
    assert core.is_up("web")
    assert core.counters["endpoints_down"] == 1 and core.counters["endpoints_up"] == 2


def test_a_change_of_health_sends_a_heartbeat_at_once_load_waits() -> None:
    core = agent()
    core.on_probe("web", True, 0.01)
    [(handler, hb)] = core.messages()
    assert handler == "hl1" and isinstance(hb, Heartbeat)
    assert hb.version == core.table.version and hb.checksum == core.table.checksum()
    core.on_load("web", 10, 0.3, 0.2)
    assert core.messages() == []
    core.handle_timer(0.2)
    [(_, hb2)] = core.messages()
    assert isinstance(hb2, Heartbeat) and hb2.version > hb.version


def test_heartbeats_every_interval_and_probes_every_check_interval() -> None:
    core = AgentCore("h1", [EndpointSpec("web", 1, 0.5, 1, 1)], 0.2, now=0.0)
    core.handler_connected("hl1", 0.0)
    core.handler_connected("hl2", 0.0)
    assert len(core.messages()) == 2
    hb_times, probe_times = [], []
    now = 0.0
    while now < 2.0:
        now = core.get_timer()
        core.handle_timer(now)
        if core.messages():
            hb_times.append(round(now, 6))
        if core.probes_due():
            probe_times.append(round(now, 6))
    assert hb_times[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert probe_times[:4] == [0.0, 0.5, 1.0, 1.5]


def test_snapshot_answers_the_portions_asked() -> None:
    core = AgentCore(
        "h1",
        [EndpointSpec("web", 1, 0.2, 1, 1), EndpointSpec("api", 1, 0.2, 1, 1)],
        0.2,
        now=0.0,
    )
    core.on_message("hl1", GetTableSnapshot(5, ["api"]), 0.0)
    core.on_message("hl1", GetTableSnapshot(6, []), 0.0)
    [(_, part), (_, whole)] = core.messages()
    assert isinstance(part, SendTableSnapshot) and isinstance(whole, SendTableSnapshot)
    assert part.req_id == 5 and [r.app for r in part.rows] == ["api"]
    assert [r.app for r in whole.rows] == ["api", "web"]
    assert HealthTable(whole.rows).checksum() == core.table.checksum()


@pytest.mark.parametrize("state", ["refused", "hung"])
def test_dead_application_detection_time(state: str) -> None:
    """Probe failures mark the endpoint down after fall probes: within
    ((fall - 1) * interval, fall * interval] of the death, plus the probe's
    own time (latency, or the timeout for a hung application)."""
    cfg = health_config()
    hc = cfg.applications[0].health_check
    rng = random.Random(7)
    for _ in range(20):
        sim = HealthSim(cfg, latency=0.0005, probe_latency=0.001)
        sim.run_until(1.0 + rng.random())
        died = sim.now
        sim.set_app("h3", "web", state)  # type: ignore[arg-type]
        agent_h3 = sim.agents["h3"]
        sim.run_while(lambda a=agent_h3: a.is_up("web"), died + 5)  # type: ignore[misc]
        detected = sim.now - died
        extra = sim.probe_latency if state == "refused" else hc.timeout
        low = (hc.fall - 1) * hc.interval + extra
        high = hc.fall * hc.interval + extra
        assert low - 1e-9 <= detected <= high + 1e-9, detected


def test_load_file_env_name(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    assert load_file_env("web-2.eu") == "HANLB_LOAD_FILE_WEB_2_EU"
    path = f"{tmp_path}/load"
    with open(path, "w") as f:
        f.write("0.7\n")
    monkeypatch.setenv("HANLB_LOAD_FILE_WEB", path)
    probe = LoadProbe("web", 1)
    assert probe._app_load(-1.0) == 0.7
    monkeypatch.delenv("HANLB_LOAD_FILE_WEB")
    assert LoadProbe("web", 1)._app_load(0.4) == 0.4
