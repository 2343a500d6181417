"""Cluster configuration: a valid file loads; every mistake names its field."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from hanlb.config import (
    ClusterConfig,
    ConfigError,
    Timers,
    load_config,
    parse_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster.toml"

VALID = """\
[cluster]
name = "test"
key = "0123456789abcdef"

[timers]
route_linger = 1.5
liveness_misses = 4

[[hosts]]
name = "web1"
address = "10.0.0.11"
mac = "02:00:00:00:01:01"

[[hosts]]
name = "web2"
address = "10.0.0.12"
mac = "02:00:00:00:01:02"

[[applications]]
name = "www"
vip = "203.0.113.10"
port = 80
pool = [{ host = "web1", weight = 3 }, { host = "web2" }]

[[forwarders]]
name = "fw1"
address = "10.0.0.1"
classifiers = ["cl1"]

[[classifiers]]
name = "cl1"
listen = "10.0.0.5:7000"
"""


def base() -> dict[str, Any]:
    """A valid configuration as a parsed TOML document, to spoil one field of."""
    return {
        "cluster": {"key": "0123456789abcdef"},
        "hosts": [
            {"name": "web1", "address": "10.0.0.11", "mac": "02:00:00:00:01:01"},
            {"name": "web2", "address": "10.0.0.12", "mac": "02:00:00:00:01:02"},
        ],
        "applications": [
            {
                "name": "www",
                "vip": "203.0.113.10",
                "port": 80,
                "pool": [{"host": "web1", "weight": 1}, {"host": "web2", "weight": 1}],
            }
        ],
        "forwarders": [{"name": "fw1", "address": "10.0.0.1", "classifiers": ["cl1"]}],
        "classifiers": [{"name": "cl1", "listen": "10.0.0.5:7000"}],
    }


def problems_of(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    problems = info.value.problems
    assert problems, "a ConfigError must list its problems"
    for field, reason in problems:
        assert field and reason
        assert field in str(info.value)
    return problems


def fields_of(data: dict[str, Any]) -> list[str]:
    return [field for field, _ in problems_of(data)]


# -- valid configurations -------------------------------------------------------


def test_valid_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(VALID)
    cfg = load_config(path)
    assert isinstance(cfg, ClusterConfig)
    assert cfg.cluster.name == "test"
    assert cfg.key_bytes == b"0123456789abcdef"
    assert cfg.timers.route_linger == 1.5
    assert cfg.timers.liveness_misses == 4
    assert cfg.timers.route_idle_timeout == Timers().route_idle_timeout  # default kept
    assert [(m.host, m.weight) for m in cfg.applications[0].pool] == [("web1", 3), ("web2", 1)]
    assert cfg.applications[0].protocol == "tcp"
    assert cfg.host("web2").address == "10.0.0.12"
    assert cfg.forwarder("fw1").datapath == "kernel"
    assert cfg.classifier("cl1").endpoint == ("10.0.0.5", 7000)
    assert [c.name for c in cfg.classifiers_for("fw1")] == ["cl1"]


def test_minimal_config_uses_defaults() -> None:
    data = base()
    del data["forwarders"], data["classifiers"]
    cfg = parse_config(data)
    assert cfg.timers == Timers()
    assert cfg.cluster.run_dir == "/run/hanlb"
    assert cfg.forwarders == [] and cfg.classifiers == []


def test_mac_is_normalised_to_lower_case() -> None:
    data = base()
    data["hosts"][0]["mac"] = "02:AB:CD:EF:01:01"
    assert parse_config(data).hosts[0].mac == "02:ab:cd:ef:01:01"


def test_config_is_frozen() -> None:
    cfg = parse_config(base())
    with pytest.raises(ValueError):
        cfg.timers.route_linger = 9.0  # type: ignore[misc]


def test_example_cluster_toml_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert [a.name for a in cfg.applications] == ["www", "api"]
    assert len(cfg.hosts) == 4
    assert [f.name for f in cfg.forwarders] == ["fw1", "fw2"]
    assert [c.name for c in cfg.classifiers] == ["cl1", "cl2"]
    for fw in cfg.forwarders:
        assert {c.name for c in cfg.classifiers_for(fw.name)} == {"cl1", "cl2"}
    # Every pool host exists and every application can place a flow.
    for app in cfg.applications:
        assert any(m.weight for m in app.pool)
        for m in app.pool:
            cfg.host(m.host)


# -- each kind of mistake names the field ----------------------------------------


def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    target = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return data


MISTAKES: dict[str, tuple[tuple[Any, ...], Any, str, str]] = {
    # name: (where, bad value, field named, words in the reason)
    "vip not an address": (
        ("applications", 0, "vip"),
        "203.0.113",
        "applications[0].vip",
        "not an IPv4 address",
    ),
    "vip is a name": (
        ("applications", 0, "vip"),
        "www.example.com",
        "applications[0].vip",
        "not an IPv4 address",
    ),
    "vip ipv6": (("applications", 0, "vip"), "2001:db8::1", "applications[0].vip", "IPv4"),
    "port 0": (("applications", 0, "port"), 0, "applications[0].port", "greater than or equal"),
    "port 70000": (
        ("applications", 0, "port"),
        70000,
        "applications[0].port",
        "less than or equal",
    ),
    "port not a number": (("applications", 0, "port"), "http", "applications[0].port", "integer"),
    "host address": (("hosts", 1, "address"), "10.0.0.256", "hosts[1].address", "IPv4"),
    "host mac too short": (("hosts", 0, "mac"), "02:00:00:00:01", "hosts[0].mac", "not a MAC"),
    "host mac not hex": (("hosts", 0, "mac"), "02:00:00:00:01:zz", "hosts[0].mac", "not a MAC"),
    "host mac dashes": (("hosts", 0, "mac"), "02-00-00-00-01-01", "hosts[0].mac", "not a MAC"),
    "short key": (("cluster", "key"), "short", "cluster.key", "at least 16 characters"),
    "weight negative": (
        ("applications", 0, "pool", 1, "weight"),
        -1,
        "applications[0].pool[1].weight",
        "greater than or equal",
    ),
    "weight too big": (
        ("applications", 0, "pool", 1, "weight"),
        1001,
        "applications[0].pool[1].weight",
        "less than or equal",
    ),
    "bad protocol": (("applications", 0, "protocol"), "udp", "applications[0].protocol", "tcp"),
    "bad datapath": (("forwarders", 0, "datapath"), "xdp", "forwarders[0].datapath", "kernel"),
    "bad name": (("hosts", 0, "name"), "web 1", "hosts[0].name", "pattern"),
    "listen without port": (
        ("classifiers", 0, "listen"),
        "10.0.0.5",
        "classifiers[0].listen",
        "ADDRESS:PORT",
    ),
    "listen port 0": (
        ("classifiers", 0, "listen"),
        "10.0.0.5:0",
        "classifiers[0].listen",
        "ADDRESS:PORT",
    ),
    "forwarder admin port 70000": (
        ("forwarders", 0, "admin"),
        "127.0.0.1:70000",
        "forwarders[0].admin",
        "ADDRESS:PORT",
    ),
    "timer zero": (("timers",), {"sweep_interval": 0}, "timers.sweep_interval", "greater than"),
    "timer negative": (("timers",), {"route_linger": -1}, "timers.route_linger", "greater than"),
    "liveness misses 0": (
        ("timers",),
        {"liveness_misses": 0},
        "timers.liveness_misses",
        "greater than or equal",
    ),
    "empty pool": (("applications", 0, "pool"), [], "applications[0].pool", "at least 1"),
    "no hosts": (("hosts",), [], "hosts", "at least 1"),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_mistake_names_field(name: str) -> None:
    where, value, field, words = MISTAKES[name]
    problems = problems_of(_set(base(), where, value))
    assert [f for f, _ in problems] == [field]
    assert words in problems[0][1], problems


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ((), "clusters"),  # top-level typo
        (("cluster",), "keys"),
        (("timers",), "route_lingr"),
        (("hosts", 0), "adress"),
        (("applications", 0), "vip_port"),
        (("applications", 0, "pool", 0), "wieght"),
        (("forwarders", 0), "classifier"),
        (("classifiers", 0), "listen_on"),
    ],
)
def test_unknown_field_is_named(where: tuple[Any, ...], field: str) -> None:
    data = base()
    data.setdefault("timers", {})
    target: Any = data
    for part in where:
        target = target[part]
    target[field] = "x"
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in (*where, field))
    assert problems_of(data) == [(path.lstrip("."), "unknown field")]


def test_pool_host_missing() -> None:
    data = base()
    data["applications"][0]["pool"][1]["host"] = "web9"
    assert problems_of(data) == [("applications[0].pool[1].host", "no host named 'web9'")]


@pytest.mark.parametrize("kind", ["hosts", "applications", "forwarders", "classifiers"])
def test_duplicate_names(kind: str) -> None:
    data = base()
    twin = copy.deepcopy(data[kind][0])
    if kind == "applications":
        twin["port"] = 81  # only the name is the same
    if kind == "hosts":
        twin["address"] = "10.0.0.19"
    data[kind].append(twin)
    (problem,) = problems_of(data)
    assert problem[0] == f"{kind}[{len(data[kind]) - 1}].name"
    assert "duplicate name" in problem[1]
    assert repr(twin["name"]) in problem[1]


def test_same_host_twice_in_a_pool() -> None:
    data = base()
    data["applications"][0]["pool"][1]["host"] = "web1"
    ((field, reason),) = problems_of(data)
    assert field == "applications[0].pool"
    assert "host listed twice: web1" in reason


def test_same_vip_and_port_twice() -> None:
    data = base()
    app2 = copy.deepcopy(data["applications"][0]) | {"name": "www2"}
    data["applications"].append(app2)
    assert problems_of(data) == [("applications[1].port", "203.0.113.10:80 used twice")]


def test_all_zero_weights() -> None:
    data = base()
    for member in data["applications"][0]["pool"]:
        member["weight"] = 0
    ((field, reason),) = problems_of(data)
    assert field == "applications[0].pool"
    assert "every weight is 0" in reason


def test_forwarder_names_missing_classifier() -> None:
    data = base()
    data["forwarders"][0]["classifiers"] = ["cl1", "cl7"]
    assert problems_of(data) == [("forwarders[0].classifiers[1]", "no classifier named 'cl7'")]


def test_forwarders_without_any_classifier() -> None:
    data = base()
    data["forwarders"][0]["classifiers"] = []
    data["classifiers"] = []
    assert problems_of(data) == [("classifiers", "forwarders need at least one classifier")]


def test_missing_required_fields() -> None:
    data = base()
    del data["cluster"]["key"]
    del data["hosts"][0]["mac"]
    problems = problems_of(data)
    assert sorted(f for f, _ in problems) == ["cluster.key", "hosts[0].mac"]
    assert all(r == "Field required" for _, r in problems)


def test_several_mistakes_reported_together() -> None:
    data = base()
    data["applications"][0]["vip"] = "nope"
    data["applications"][0]["port"] = 0
    data["hosts"][1]["mac"] = "nope"
    assert sorted(fields_of(data)) == [
        "applications[0].port",
        "applications[0].vip",
        "hosts[1].mac",
    ]


def test_several_cross_field_mistakes_reported_together() -> None:
    data = base()
    data["applications"][0]["pool"][0]["host"] = "web8"
    data["applications"][0]["pool"][1]["host"] = "web9"
    data["forwarders"][0]["classifiers"] = ["cl9"]
    assert fields_of(data) == [
        "applications[0].pool[0].host",
        "applications[0].pool[1].host",
        "forwarders[0].classifiers[0]",
    ]


# -- files ------------------------------------------------------------------------


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(VALID.replace("port = 80", "port = = 80"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    ((field, reason),) = info.value.problems
    assert field == "(syntax)"
    assert "line" in reason
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    ((field, reason),) = info.value.problems
    assert field == "(file)"
    assert f"cannot read {path}" in reason
    assert "No such file" in reason


def test_invalid_file_names_the_source(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(VALID.replace("port = 80", "port = 0"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path} is invalid:")
    assert [f for f, _ in info.value.problems] == ["applications[0].port"]


def test_config_error_is_a_value_error() -> None:
    err = ConfigError([("a.b", "bad")], "x.toml")
    assert isinstance(err, ValueError)
    assert str(err) == "x.toml is invalid:\n  a.b: bad"


# -- spreading forwarders over classifiers --------------------------------------------


def _spread(n_forwarders: int, n_classifiers: int) -> ClusterConfig:
    data = base()
    data["forwarders"] = [
        {"name": f"fw{i:02d}", "address": f"10.0.1.{i + 1}"} for i in range(n_forwarders)
    ]
    data["classifiers"] = [
        {"name": f"cl{i:02d}", "listen": f"10.0.2.{i + 1}:7000"} for i in range(n_classifiers)
    ]
    return parse_config(data)


@pytest.mark.parametrize(("n_fw", "n_cl"), [(1, 1), (2, 2), (4, 2), (6, 3), (5, 2), (3, 5)])
def test_classifiers_for_spreads_evenly(n_fw: int, n_cl: int) -> None:
    cfg = _spread(n_fw, n_cl)
    firsts = Counter(cfg.classifiers_for(f.name)[0].name for f in cfg.forwarders)
    counts = [firsts.get(c.name, 0) for c in cfg.classifiers]
    assert max(counts) - min(counts) <= 1
    for fw in cfg.forwarders:
        order = [c.name for c in cfg.classifiers_for(fw.name)]
        # every classifier once, as a rotation of the sorted names (fallback order)
        names = sorted(c.name for c in cfg.classifiers)
        assert sorted(order) == names
        start = names.index(order[0])
        assert order == names[start:] + names[:start]


def test_classifiers_for_does_not_depend_on_listing_order() -> None:
    cfg = _spread(4, 2)
    data = cfg.model_dump()
    data["forwarders"].reverse()
    data["classifiers"].reverse()
    again = parse_config(data)
    for fw in cfg.forwarders:
        assert [c.name for c in cfg.classifiers_for(fw.name)] == [
            c.name for c in again.classifiers_for(fw.name)
        ]


def test_classifiers_for_explicit_list_wins() -> None:
    data = base()
    data["classifiers"].append({"name": "cl2", "listen": "10.0.0.6:7000"})
    data["forwarders"][0]["classifiers"] = ["cl2", "cl1"]
    cfg = parse_config(data)
    assert [c.name for c in cfg.classifiers_for("fw1")] == ["cl2", "cl1"]


def test_lookups_of_unknown_names() -> None:
    cfg = parse_config(base())
    with pytest.raises(KeyError):
        cfg.forwarder("fw9")
    with pytest.raises(KeyError):
        cfg.classifier("cl9")
    with pytest.raises(KeyError):
        cfg.classifiers_for("fw9")


# -- regressions: problems found in src by these tests, since fixed ---------------


def test_host_lookup_of_unknown_name() -> None:
    with pytest.raises(KeyError):
        parse_config(base()).host("web9")


@pytest.mark.parametrize("value", [True, "80"])
def test_wrongly_typed_port(value: Any) -> None:
    assert fields_of(_set(base(), ("applications", 0, "port"), value)) == ["applications[0].port"]
