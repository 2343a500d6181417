"""The LB-aware switch on real namespaces: a forwarder dies, leaves ECMP, comes back.

Topology (all namespaces named ``t-sw-<random>-*``, removed afterwards)::

    router ns: br0 10.201.0.1/24 -- vf1 | vf2 | vf3
    fw ns i:   lan0 10.201.0.1i/24 (veth peer of vfi), ProbeResponder on :7401

The switch (``python -m hanlb.switch``) and the responders
(``python -m hanlb.forwarder.probe``) run as subprocesses under ``ip netns exec``;
the test reads the kernel's group with ``ip -n ROUTER nexthop show`` and the
switch's admin socket.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from hanlb.admin import query
from hanlb.switch.ecmp import DEFAULT_ID_BASE

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces"),
]

KEY = "switch-lab-key-0123456789"
VIP = "10.202.0.1"
FORWARDERS = {"fw1": "10.201.0.11", "fw2": "10.201.0.12", "fw3": "10.201.0.13"}
PROBE_PORT = 7401
INTERVAL, MISSES, RISE = 0.05, 3, 3
BOUND = 2.0
SRC = str(Path(__file__).resolve().parents[2] / "src")


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@dataclass
class Lab:
    router: str
    forwarder_ns: dict[str, str]
    tmp: Path
    responders: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    switch: subprocess.Popen[bytes] | None = None
    logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def run_dir(self) -> str:
        return str(self.tmp / "run")

    def spawn(self, ns: str, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": SRC}
        log = open(self.tmp / f"{ns}-{args[1].rsplit('.', 1)[-1]}.log", "ab")  # noqa: SIM115
        self.logs.append(log)
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def start_responder(self, name: str) -> None:
        self.responders[name] = self.spawn(
            self.forwarder_ns[name],
            "-m",
            "hanlb.forwarder.probe",
            "--listen",
            f"{FORWARDERS[name]}:{PROBE_PORT}",
            "--key-file",
            str(self.tmp / "key"),
        )

    def kill_responder(self, name: str) -> None:
        proc = self.responders.pop(name)
        proc.kill()
        proc.wait()

    def group(self) -> list[str] | None:
        """Forwarders in the switch's next-hop group (None: no group)."""
        out = subprocess.run(
            ["ip", "-n", self.router, "nexthop", "show", "id", str(DEFAULT_ID_BASE)],
            capture_output=True,
            text=True,
        ).stdout
        m = re.search(r"group (\S+)", out)
        if m is None:
            return None
        by_id = {str(DEFAULT_ID_BASE + 1 + i): n for i, n in enumerate(sorted(FORWARDERS))}
        return sorted(by_id[part.split(",")[0]] for part in m.group(1).split("/"))

    def vip_route(self) -> str:
        return sh("ip", "-n", self.router, "route", "show", f"{VIP}/32").strip()


def write_config(tmp: Path) -> Path:
    (tmp / "key").write_text(KEY)
    forwarders = "".join(
        f'[[forwarders]]\nname = "{n}"\naddress = "{a}"\nprobe_port = {PROBE_PORT}\n\n'
        for n, a in FORWARDERS.items()
    )
    path = tmp / "cluster.toml"
    path.write_text(
        f"""
[cluster]
key = "{KEY}"
run_dir = "{tmp / "run"}"

[switch]
name = "switch"
interface = "br0"
probe_interval = {INTERVAL}
probe_misses = {MISSES}
rise = {RISE}
resilient_buckets = 64

[[hosts]]
name = "h1"
address = "10.201.0.101"
mac = "02:00:00:00:01:01"

[[applications]]
name = "web"
vip = "{VIP}"
port = 80
pool = [{{ host = "h1" }}]

[[classifiers]]
name = "cl1"
listen = "10.201.0.100:7500"

{forwarders}"""
    )
    return path


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    tag = uuid.uuid4().hex[:6]
    router = f"t-sw-{tag}-r"
    fw_ns = {n: f"t-sw-{tag}-{n}" for n in FORWARDERS}
    made: list[str] = []
    lab = Lab(router, fw_ns, tmp_path)
    try:
        for ns in (router, *fw_ns.values()):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", router, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", router, "addr", "add", "10.201.0.1/24", "dev", "br0")
        sh("ip", "-n", router, "link", "set", "br0", "up")
        for i, (name, addr) in enumerate(FORWARDERS.items(), 1):
            ns = fw_ns[name]
            sh("ip", "-n", router, "link", "add", f"vf{i}", "type", "veth", "peer", "name",
               "lan0", "netns", ns)  # fmt: skip
            sh("ip", "-n", router, "link", "set", f"vf{i}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "lan0")
            sh("ip", "-n", ns, "link", "set", "lan0", "up")
        yield lab
    finally:
        if lab.switch is not None:
            lab.switch.terminate()
            try:
                lab.switch.wait(5)
            except subprocess.TimeoutExpired:
                lab.switch.kill()
                lab.switch.wait()
        for proc in lab.responders.values():
            proc.kill()
            proc.wait()
        for log in lab.logs:
            log.close()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def wait_for(check: Callable[[], bool], bound: float) -> float:
    """Seconds until ``check()`` held; fails after ``bound``."""
    start = time.monotonic()
    while time.monotonic() - start < bound:
        if check():
            return time.monotonic() - start
        time.sleep(0.005)
    raise AssertionError(f"not within {bound} s")


def test_dead_forwarder_leaves_and_rejoins_ecmp(lab: Lab) -> None:
    config = write_config(lab.tmp)
    for name in FORWARDERS:
        lab.start_responder(name)
    time.sleep(0.3)  # responders bound
    lab.switch = lab.spawn(lab.router, "-m", "hanlb.switch", "-c", str(config))
    everyone = sorted(FORWARDERS)
    wait_for(lambda: lab.group() == everyone, 10.0)
    assert f"nhid {DEFAULT_ID_BASE}" in lab.vip_route()
    assert "type resilient" in sh("ip", "-n", lab.router, "nexthop", "show", "id",
                                  str(DEFAULT_ID_BASE))  # fmt: skip
    time.sleep(5 * INTERVAL)
    assert lab.group() == everyone, "a live forwarder was removed"

    lab.kill_responder("fw2")
    removal = wait_for(lambda: lab.group() == ["fw1", "fw3"], BOUND)
    print(f"\nfw2 killed -> removed from the group after {removal:.3f} s")
    assert removal <= (MISSES + 1) * INTERVAL + 0.5

    status = query(lab.run_dir, "switch", "/status")
    fw2 = status["forwarders"]["fw2"]
    assert fw2["state"] == "suspected" and fw2["removals"] == 1
    assert MISSES * INTERVAL - 0.01 <= fw2["last_detection_time"] <= (MISSES + 1) * INTERVAL + 0.1
    print(f"switch measured: detection {fw2['last_detection_time']} s, "
          f"removal {fw2['last_removal_time']} s")  # fmt: skip
    assert status["live"] == ["fw1", "fw3"]
    assert status["ecmp_mode"] == "resilient"

    lab.start_responder("fw2")
    back = wait_for(lambda: lab.group() == everyone, BOUND + 1.0)  # + interpreter start
    print(f"fw2 restarted -> back in the group after {back:.3f} s")
    status = query(lab.run_dir, "switch", "/status")
    assert status["forwarders"]["fw2"]["restorations"] == 1
    assert status["forwarders"]["fw1"]["removals"] == 0
    metrics = query(lab.run_dir, "switch", "/metrics")
    assert 'hanlb_switch_removals_total{component="switch"} 1.0' in metrics

    # every forwarder dead: the VIP is unreachable, not routed to a dead one
    for name in everyone:
        lab.kill_responder(name)
    wait_for(lambda: lab.vip_route().startswith("unreachable"), BOUND)
    assert lab.group() is None
    lab.start_responder("fw3")
    wait_for(lambda: lab.group() == ["fw3"], BOUND + 1.0)
    assert f"nhid {DEFAULT_ID_BASE}" in lab.vip_route()

    # a clean stop removes everything the switch installed
    lab.switch.terminate()
    assert lab.switch.wait(5) == 0
    assert lab.group() is None
    assert lab.vip_route() == ""
