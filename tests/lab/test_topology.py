"""The namespace lab itself: wiring, host servers, load generator, teardown."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from hanlb.config import load_config
from hanlb.lab import topology
from hanlb.lab.cli import lab as lab_cli
from hanlb.lab.topology import VIP, Lab, LabError

pytestmark = pytest.mark.lab

LabFactory = Callable[..., Lab]


def sysctl(lab: Lab, ns: str, key: str) -> str:
    proc = lab.netns_exec(ns, ["sysctl", "-n", key], check=True)
    return proc.stdout.strip()


def test_hosts_answer_clients_at_their_own_address(lab_factory: LabFactory) -> None:
    lab = lab_factory(clients=2, forwarders=2, classifiers=1, hosts=4, start_components=False)
    lab.wait_ready(30)
    hosts = [n for n in lab.nodes if n.role == "host"]
    assert [h.name for h in hosts] == ["h1", "h2", "h3", "h4"]
    for client in lab.clients:
        for host in hosts:
            result = lab.load(
                client, "http", address=host.address, port=80, connections=10, concurrency=3
            )
            assert result["ok"] == 10, result
            assert result["failed"] == 0, result
            assert result["served_by"] == {host.name: 10}, result

    # keep-alive, 404, health, on one connection, straight from a client namespace
    script = (
        "import socket;s=socket.create_connection(('10.92.0.102',80),timeout=5);"
        "s.sendall(b'GET /nope HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'"
        "b'GET /health HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n');"
        "d=b''\nwhile True:\n c=s.recv(4096)\n if not c: break\n d+=c\nprint(d.decode())"
    )
    out = lab.netns_exec("hl-c1", ["python3", "-c", script], check=True).stdout
    assert out.count("X-Served-By: h2") == 2
    assert "HTTP/1.1 404" in out
    assert out.rstrip().endswith("ok")

    stream = lab.load("hl-c2", "stream", address="10.92.0.103", connections=3, seconds=1)
    assert stream["complete"] == 3, stream
    assert stream["served_by"] == {"h3": 3}
    for rec in stream["connections"]:
        assert rec["complete"] and rec["outcome"] == "complete"
        assert 90 * 1024 <= rec["bytes"] <= 110 * 1024
    assert stream["stall"]["max"] < 0.5

    upload = lab.load("hl-c1", "upload", address="10.92.0.104", port=5001, seconds=0.5)
    assert upload["bytes"] == upload["sent"] > 0
    assert upload["gbit_per_s"] > 0


def test_layout_config_and_status(lab_factory: LabFactory) -> None:
    lab = lab_factory(
        clients=1,
        forwarders=3,
        classifiers=2,
        hosts=2,
        datapath="userspace",
        start_components=False,
    )
    # ECMP over every forwarder for the VIP
    route = subprocess.run(
        ["ip", "-n", "hl-router", "route", "show", f"{VIP}/32"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for k in (1, 2, 3):
        assert f"nexthop via 10.92.0.{10 + k} dev lan0" in route
    assert sysctl(lab, "hl-router", "net.ipv4.ip_forward") == "1"
    assert sysctl(lab, "hl-router", "net.ipv4.fib_multipath_hash_policy") == "3"
    assert sysctl(lab, "hl-router", "net.ipv4.fib_multipath_hash_fields") == "55"  # 0x37
    assert sysctl(lab, "hl-router", "net.ipv4.conf.c1.rp_filter") == "0"
    # hosts: VIP on lo, no ARP for it
    for ns in ("hl-h1", "hl-h2"):
        addrs = lab.netns_exec(ns, ["ip", "-4", "-o", "addr", "show", "dev", "lo"]).stdout
        assert f"{VIP}/32" in addrs
        assert sysctl(lab, ns, "net.ipv4.conf.lan0.arp_ignore") == "1"
        assert sysctl(lab, ns, "net.ipv4.conf.all.arp_announce") == "2"
    # addresses and MACs
    link = lab.netns_exec("hl-fw3", ["ip", "-o", "link", "show", "lan0"]).stdout
    assert "02:92:00:00:00:0d" in link
    link = lab.netns_exec("hl-h2", ["ip", "-o", "link", "show", "lan0"]).stdout
    assert "02:92:00:00:01:02" in link
    offload = lab.netns_exec("hl-c1", ["ethtool", "-k", "eth0"]).stdout
    assert "tx-checksumming: off" in offload

    cfg = load_config(topology.CONFIG_FILE)
    assert [f.name for f in cfg.forwarders] == ["fw1", "fw2", "fw3"]
    assert {f.datapath for f in cfg.forwarders} == {"userspace"}
    assert cfg.forwarder("fw2").address == "10.92.0.12"
    assert cfg.classifier("cl2").listen == "10.92.0.32:7400"
    assert cfg.host("h2").mac == "02:92:00:00:01:02"
    assert {(a.name, a.vip, a.port, a.mode) for a in cfg.applications} == {
        ("web", VIP, 80, "l4"),
        ("sink", VIP, 5001, "l4"),
    }
    assert cfg.cluster.run_dir == "/run/hanlb/lab/sock"

    st = lab.status()
    assert st["clients"] == ["hl-c1"]
    assert st["hosts"] == ["hl-h1", "hl-h2"]
    assert {(v["address"], v["port"], v["mode"]) for v in st["vips"]} == {
        (VIP, 80, "l4"),
        (VIP, 5001, "l4"),
    }
    roles = {c["name"]: c["role"] for c in st["components"]}
    assert roles == {
        "h1": "httpd",
        "h2": "httpd",
        "cl1": "classifier",
        "cl2": "classifier",
        "fw1": "forwarder",
        "fw2": "forwarder",
        "fw3": "forwarder",
    }
    started = {c["name"] for c in st["components"] if c["pid"] is not None}
    assert started == {"h1", "h2"}

    res = CliRunner().invoke(lab_cli, ["status", "--json"])
    assert res.exit_code == 0, res.output
    cli_st = json.loads(res.output)
    for key in ("vips", "clients", "hosts", "components"):
        assert cli_st[key] == st[key] or key == "components"
    for comp in cli_st["components"]:
        assert {"role", "name", "netns", "pid"} <= comp.keys()
    assert Lab.load().state == lab.state


def test_vip_reaches_hosts_through_a_static_dsr_forwarder(lab_factory: LabFactory) -> None:
    """The wiring a real forwarder relies on: router ECMP -> forwarder -> MAC rewrite -> host,
    host answers from the VIP on lo straight back through the router."""
    lab = lab_factory(clients=2, forwarders=2, classifiers=1, hosts=2, start_components=False)
    lab.wait_ready(30)
    h2 = lab.node("h2")
    for fw in (n for n in lab.nodes if n.role == "forwarder"):
        rules = (
            "table netdev hltest {\n chain in {\n"
            "  type filter hook ingress device lan0 priority 0;\n"
            f"  ip daddr {VIP} ether saddr set {fw.mac} ether daddr set {h2.mac} fwd to lan0\n"
            " }\n}\n"
        )
        lab.netns_exec(fw.netns, ["nft", "-f", "-"], input=rules, check=True)
    for client in lab.clients:
        result = lab.load(client, "http", connections=50, concurrency=10)
        assert result["ok"] == 50, result
        assert result["served_by"] == {"h2": 50}
    upload = lab.load("hl-c1", "upload", seconds=0.5)
    assert upload["bytes"] == upload["sent"] > 0


def test_kill_and_start_a_component(lab_factory: LabFactory) -> None:
    lab = lab_factory(clients=1, forwarders=1, classifiers=1, hosts=2, start_components=False)
    lab.wait_ready(30)
    old = lab.component("h1")["pid"]
    lab.kill("h1")
    assert not lab.alive("h1")
    assert not Lab.load().status()["components"][0]["alive"]
    probe = lab.load("hl-c1", "probe", targets="10.92.0.101:80,10.92.0.102:80", timeout=1)
    assert probe["results"]["10.92.0.101:80"]["error"] == "refused"
    assert probe["results"]["10.92.0.102:80"]["status"] == 200
    with pytest.raises(LabError, match="not running"):
        lab.wait_ready(2)
    new = lab.start("h1")
    assert new != old
    assert Lab.load().component("h1")["pid"] == new
    lab.wait_ready(30)
    with pytest.raises(LabError, match="already running"):
        lab.start("h1")
    with pytest.raises(LabError, match="no component"):
        lab.kill("nope")


def test_components_are_started_with_the_cluster_config(lab_factory: LabFactory) -> None:
    lab = lab_factory(clients=1, forwarders=2, classifiers=1, hosts=1, start_components=True)
    comps = {c["name"]: c for c in lab.components}
    order = [c["name"] for c in lab.components]
    assert order.index("cl1") < order.index("fw1") < order.index("fw2")
    for name in ("cl1", "fw1", "fw2"):
        comp = comps[name]
        assert comp["pid"] is not None
        assert comp["netns"] == f"hl-{name}"
        assert comp["argv"][-6:] == [
            "--config",
            str(topology.CONFIG_FILE),
            "--role",
            comp["role"],
            "--name",
            name,
        ]
        assert comp["argv"][-7] == "run"
        assert Path(comp["log"]).is_file()


def test_down_removes_everything_and_is_idempotent(lab_factory: LabFactory) -> None:
    lab = lab_factory(clients=1, forwarders=1, classifiers=1, hosts=1, start_components=False)
    lab.wait_ready(30)
    pids = [c["pid"] for c in lab.components if c["pid"] is not None]
    # a process the state does not know about, and a lost state file (as after a crash)
    stray = subprocess.Popen(
        ["ip", "netns", "exec", "hl-h1", "sleep", "300"], start_new_session=True
    )
    topology.STATE_FILE.unlink()
    res = CliRunner().invoke(lab_cli, ["down"])
    assert res.exit_code == 0, res.output
    assert topology.lab_namespaces() == []
    assert not topology.LAB_DIR.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert stray.wait(5) == -9  # SIGKILLed by down
    # again: harmless
    topology.down()
    lab.down()
    res = CliRunner().invoke(lab_cli, ["down"])
    assert res.exit_code == 0, res.output
    st = topology.status()
    assert st["up"] is False and st["namespaces_present"] == []
