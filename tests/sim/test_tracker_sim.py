"""The session tracker on a lossy in-memory network, then on real loopback TCP.

Simulations: N tracker nodes (``TrackerNode``) and one ``TrackerClientCore`` on a
``FakeNet`` that drops, duplicates, delays and reorders messages with a seeded
random generator. Every assertion message carries the seed.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from hanlb.admin import query as admin_query
from hanlb.config import parse_config
from hanlb.flow import FlowKey
from hanlb.tracker.client import (
    AsyncTrackerClient,
    BulkDone,
    ClientEvent,
    QueryDone,
    TrackerClientCore,
    WriteDone,
)
from hanlb.tracker.entry import Entry, flow_key, session_key
from hanlb.tracker.messages import ACK_ALL, ACK_ONE
from hanlb.tracker.node import TrackerNode
from hanlb.tracker.placement import replicas
from hanlb.tracker.service import TrackerService
from tests.sim.fakenet import FakeClock, FakeNet, Link

CHAOS = Link(drop=0.05, dup=0.05, delay=(0.0005, 0.003), reorder=0.2, reorder_delay=0.03)
CALM = Link(drop=0.0, dup=0.05, delay=(0.0005, 0.003), reorder=0.2, reorder_delay=0.03)
AE = 0.5


class NodeEndpoint:
    def __init__(self, core: TrackerNode, net: FakeNet) -> None:
        self.core, self.net = core, net

    def deliver(self, src: str, msg: object) -> None:
        clock = self.net.clock
        self.core.on_message(src, msg, clock.now, clock.time())
        self.flush()

    def get_timer(self) -> float:
        return self.core.get_timer()

    def on_timer(self) -> None:
        self.core.handle_timer(self.net.clock.now, self.net.clock.time())
        self.flush()

    def flush(self) -> None:
        for dst, msg in self.core.messages():
            self.net.send(self.core.name, dst, msg)
        while self.core.next_event() is not None:
            pass


class ClientEndpoint:
    def __init__(self, name: str, core: TrackerClientCore, net: FakeNet) -> None:
        self.name, self.core, self.net = name, core, net
        self.done: dict[int, ClientEvent] = {}

    def deliver(self, src: str, msg: object) -> None:
        self.core.on_message(src, msg, self.net.clock.now)
        self.flush()

    def get_timer(self) -> float:
        return self.core.get_timer()

    def on_timer(self) -> None:
        self.core.handle_timer(self.net.clock.now)
        self.flush()

    def flush(self) -> None:
        for dst, msg in self.core.messages():
            self.net.send(self.name, dst, msg)
        while (ev := self.core.next_event()) is not None:
            self.done[ev.op_id] = ev


class Sim:
    def __init__(self, seed: int, n: int, replication: int = 2) -> None:
        self.seed = seed
        self.rng = random.Random(seed * 7919 + 1)
        self.clock = FakeClock()
        self.net = FakeNet(self.clock, seed, CHAOS)
        self.replication = replication
        self.names = [f"t{i}" for i in range(1, n + 1)]
        self.nodes: dict[str, TrackerNode] = {}
        for name in self.names:
            core = TrackerNode(
                name,
                self.names,
                now=0.0,
                replication=replication,
                anti_entropy_interval=AE,
            )
            self.nodes[name] = core
            self.net.attach(name, NodeEndpoint(core, self.net))
        self.client = ClientEndpoint("client", TrackerClientCore(self.names, timeout=1.0), self.net)
        for name in self.names:
            self.client.core.node_up(name, 0.0)
        self.net.attach("client", self.client)

    def __repr__(self) -> str:
        return f"seed={self.seed} {self.net!r}"

    @property
    def wall(self) -> float:
        return self.clock.time()

    def live(self) -> list[str]:
        return [n for n in self.names if n not in self.net.down]

    def op(self, start: Callable[[TrackerClientCore, float], int]) -> ClientEvent:
        op_id = start(self.client.core, self.clock.now)
        self.client.flush()
        assert self.net.run_until(lambda: op_id in self.client.done, 30.0), f"op hung; {self}"
        return self.client.done.pop(op_id)

    def insert(self, entries: list[Entry], ack: int = ACK_ALL) -> WriteDone:
        ev = self.op(lambda c, now: c.insert(entries, ack, now=now))
        assert isinstance(ev, WriteDone)
        return ev

    def delete(self, keys: list[str]) -> WriteDone:
        ev = self.op(lambda c, now: c.delete(keys, now=now))
        assert isinstance(ev, WriteDone)
        return ev

    def query(self, keys: list[str]) -> dict[str, Entry]:
        found: dict[str, Entry] = {}
        for i in range(0, len(keys), 50):
            chunk = keys[i : i + 50]
            ev = self.op(lambda c, now, chunk=chunk: c.query(chunk, now=now))  # type: ignore[misc]
            assert isinstance(ev, QueryDone)
            found.update(ev.entries)
        return found

    def holders(self, key: str) -> dict[str, Entry]:
        return {n: self.nodes[n].entries[key] for n in self.live() if key in self.nodes[n].entries}

    def problems(self, keys: list[str]) -> list[str]:
        """Every key must be held by exactly its replicas over the live nodes, all
        at the same version (keys whose newest entry has expired by no one)."""
        out = []
        live = self.live()
        for key in keys:
            holders = self.holders(key)
            if not holders or all(e.expires <= self.wall for e in holders.values()):
                continue
            want = set(replicas(key, live, self.replication))
            if set(holders) != want:
                out.append(f"{key}: held by {sorted(holders)}, replicas {sorted(want)}")
            elif len({e.version for e in holders.values()}) != 1:
                out.append(f"{key}: versions differ {[str(e.version) for e in holders.values()]}")
        return out

    def settle(self, duration: float) -> None:
        """Run without loss (still duplicated and reordered) for ``duration``."""
        self.net.faults = CALM
        self.net.run(duration)
        self.net.faults = CHAOS


def flows(start: int, n: int, host: str = "h1", forwarder: str = "fw1") -> list[Entry]:
    return [
        Entry(flow_key(FlowKey(6, "10.91.1.2", p, "10.93.0.1", 80)), host, forwarder)
        for p in range(start, start + n)
    ]


def sessions(start: int, n: int, host: str = "h2") -> list[Entry]:
    return [Entry(session_key("http-cookie", f"c{i}"), host) for i in range(start, start + n)]


SEEDS = [(1, 3), (2, 4), (3, 5), (4, 3), (5, 4), (6, 5)]


@pytest.mark.parametrize(("seed", "n"), SEEDS)
def test_replicas_converge_survive_a_death_and_catch_up(seed: int, n: int) -> None:
    sim = Sim(seed, n)
    sim.net.run(0.3)
    entries = flows(1000, 200) + sessions(0, 50)
    for i in range(0, len(entries), 25):
        sim.insert(entries[i : i + 25])
    keys = [e.key for e in entries]
    deleted = keys[::12]
    sim.delete(deleted)
    sim.net.run(2.0)  # under loss
    sim.settle(2 * AE + 0.3)
    assert sim.problems(keys) == [], sim
    alive_keys = [k for k in keys if k not in deleted]
    found = sim.query(alive_keys + deleted)
    assert sorted(found) == sorted(alive_keys), sim

    # One node dies (frozen: no messages, no timers). Nothing is lost, and the
    # replication factor is back within detection + one anti-entropy round.
    victim = sim.rng.choice(sim.names)
    sim.net.set_down(victim)
    sim.net.faults = CALM
    sim.net.run(0.15 + 0.1 + AE + 0.2)
    assert sim.problems(keys) == [], f"victim {victim}; {sim}"
    sim.net.faults = CHAOS
    found = sim.query(alive_keys)
    assert sorted(found) == sorted(alive_keys), f"victim {victim}; {sim}"
    assert all(found[e.key].host == e.host for e in entries if e.key in found), sim

    # While it is away: new entries, deletes of entries it holds, changed hosts.
    new = flows(5000, 30, host="h3")
    sim.insert(new)
    held = [k for k in alive_keys if k in sim.nodes[victim].entries]
    gone = held[:10]
    sim.delete(gone)
    moved = [Entry(k, "h9", "fw2") for k in held[10:20]]
    sim.insert(moved)
    sim.net.run(1.0)

    # It returns with its stale table and catches up; tombstones win.
    sim.net.set_up(victim)
    sim.settle(0.2 + 2 * AE + 0.3)
    all_keys = keys + [e.key for e in new]
    assert sim.problems(all_keys) == [], f"victim {victim} returned; {sim}"
    stale = [
        k
        for k, e in sim.nodes[victim].entries.items()
        if victim in replicas(k, sim.names, 2)
        and any(sim.nodes[o].entries.get(k, e).version > e.version for o in sim.names)
    ]
    assert stale == [], f"{victim} still stale; {sim}"
    expected_live = sorted(set(alive_keys + [e.key for e in new]) - set(gone))
    found = sim.query(all_keys)
    assert sorted(found) == expected_live, sim
    assert all(found[e.key].host == "h9" for e in moved), sim
    assert all(found[e.key].host == "h3" for e in new), sim


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_repair_restores_the_factor_after_each_death(seed: int) -> None:
    sim = Sim(seed, 5, replication=3)
    sim.net.faults = CALM
    entries = flows(1, 150)
    sim.insert(entries)
    keys = [e.key for e in entries]
    sim.net.run(0.5)
    for victim in ("t2", "t4"):  # two deaths in a row, replication 3: nothing lost
        sim.net.set_down(victim)
        sim.net.run(0.15 + 0.1 + AE + 0.2)
        assert sim.problems(keys) == [], f"after {victim} died; {sim}"
        for key in keys:
            assert len(sim.holders(key)) == 3, f"{key}; {sim}"
    assert sorted(sim.query(keys)) == sorted(keys), sim


@pytest.mark.parametrize("seed", [21, 22])
def test_a_partitioned_node_rejoins_without_resurrecting_deletes(seed: int) -> None:
    sim = Sim(seed, 4)
    entries = flows(1, 120)
    keys = [e.key for e in entries]
    sim.insert(entries)
    sim.settle(1.0)
    cut = "t3"
    sim.net.partition(cut)  # alive, but it hears no one: it believes it is alone
    sim.net.run(1.0)
    sim.delete(keys[:40])
    sim.insert([Entry(k, "h7") for k in keys[40:60]])
    sim.net.run(1.0)
    sim.net.heal()
    sim.settle(0.3 + 2 * AE + 0.5)
    assert sim.problems(keys) == [], sim
    found = sim.query(keys)
    assert sorted(found) == sorted(keys[40:]), sim
    assert {found[k].host for k in keys[40:60]} == {"h7"}, sim


def test_expired_entries_are_purged_everywhere() -> None:
    sim = Sim(31, 3)
    sim.net.faults = CALM
    short = [Entry(e.key, e.host, e.forwarder, sim.wall + 1.0) for e in flows(1, 40)]
    long = flows(100, 10)
    sim.insert(short + long)
    sim.net.run(0.2)
    assert sum(len(n.entries) for n in sim.nodes.values()) == 2 * 50, sim
    sim.net.faults = CHAOS
    sim.net.run(1.0)
    assert sim.query([e.key for e in short]) == {}, sim
    for node in sim.nodes.values():
        assert not any(e.key in node.entries for e in short), sim
    assert len(sim.query([e.key for e in long])) == 10, sim


def test_acks_one_and_bulk_queries() -> None:
    sim = Sim(41, 4)
    sim.net.faults = CALM
    a = flows(1, 30, host="h1", forwarder="fw1")
    b = flows(100, 20, host="h2", forwarder="fw2")
    assert sim.insert(a, ack=ACK_ONE).failed == ()
    assert sim.insert(b).failed == ()
    sim.delete([a[0].key])
    ev = sim.op(lambda c, now: c.bulk_query("forwarder", "fw1", now=now))
    assert isinstance(ev, BulkDone) and ev.complete
    assert sorted(e.key for e in ev.entries) == sorted(e.key for e in a[1:])
    ev = sim.op(lambda c, now: c.bulk_query("host", "h2", now=now))
    assert isinstance(ev, BulkDone) and len(ev.entries) == 20
    ev = sim.op(lambda c, now: c.bulk_query("all", now=now))
    assert isinstance(ev, BulkDone) and len(ev.entries) == 49
    flow = FlowKey(6, "10.91.1.2", 100, "10.93.0.1", 80)
    ev = sim.op(lambda c, now: c.query_connection(flow, now=now))
    assert isinstance(ev, QueryDone) and ev.entries[flow_key(flow)].host == "h2"


# -- real asyncio on loopback ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_three_services_and_a_client_on_loopback(tmp_path: Path) -> None:
    config = parse_config(
        {
            "cluster": {"key": "k" * 32, "run_dir": str(tmp_path)},
            "tracker": {"anti_entropy_interval": 0.5},
            "hosts": [{"name": "h1", "address": "10.92.0.101", "mac": "02:92:00:00:01:01"}],
            "applications": [
                {"name": "web", "vip": "10.93.0.1", "port": 80, "pool": [{"host": "h1"}]}
            ],
            "trackers": [
                {"name": f"t{i}", "listen": f"127.0.0.1:{free_port()}"} for i in (1, 2, 3)
            ],
        }
    )

    async def scenario() -> None:
        services = {n.name: TrackerService(config, n.name) for n in config.trackers}
        tasks = {name: asyncio.create_task(s.run()) for name, s in services.items()}
        await asyncio.sleep(0.1)
        client = AsyncTrackerClient(config)
        try:
            entries = [
                Entry(
                    flow_key(
                        FlowKey(6, f"10.91.{p // 250}.{p % 250 + 1}", 40000 + p, "10.93.0.1", 80)
                    ),
                    f"h{p % 4}",
                    f"fw{p % 2}",
                )
                for p in range(1000)
            ]
            for i in range(0, 1000, 100):
                assert await client.insert(entries[i : i + 100]) == []
            keys = [e.key for e in entries]
            found = await client.query(keys)
            assert len(found) == 1000
            assert all(found[e.key].host == e.host for e in entries)
            rows = await asyncio.to_thread(admin_query, str(tmp_path), "t1", "/entries")
            status = await asyncio.to_thread(admin_query, str(tmp_path), "t1", "/status")
            assert status["entries"] == len(rows) > 0
            assert all(m["alive"] for m in status["members"].values())
            metrics = await asyncio.to_thread(admin_query, str(tmp_path), "t2", "/metrics")
            assert "hanlb_tracker_client_inserts_total" in metrics

            services["t2"].stop()
            await tasks["t2"]
            found = await client.query(keys)
            assert len(found) == 1000
            by_host = await client.bulk_query("host", "h1")
            assert sorted(e.key for e in by_host) == sorted(
                e.key for e in entries if e.host == "h1"
            )
            assert await client.query_connection(FlowKey(6, "10.91.0.1", 40000, "10.93.0.1", 80))
            # Repair: the two survivors now both hold every entry.
            deadline = asyncio.get_running_loop().time() + 5
            while True:
                counts = [len(c.entries) for n in ("t1", "t3") if (c := services[n].core)]
                if counts == [1000, 1000]:
                    break
                assert asyncio.get_running_loop().time() < deadline, counts
                await asyncio.sleep(0.05)
        finally:
            client.close()
            for s in services.values():
                s.stop()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 30))
