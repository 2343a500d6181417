"""Firewall policy (claims 33-34, 60) on a fake clock, alone and in the classifier."""

from __future__ import annotations

from typing import Any

from hanlb.classifier.core import ClassifierCore
from hanlb.classifier.firewall import Firewall, Verdict
from hanlb.config import FirewallPolicy, parse_config
from hanlb.flow import SYN, FlowKey
from hanlb.protocol.messages import AddRoutes, ClassifyBatch, DropRoutes, Miss, RoutesRemoved
from tests.unit.test_classifier_core import config


def policy(**kw: Any) -> FirewallPolicy:
    return FirewallPolicy.model_validate(kw)


def test_first_matching_rule_decides_then_default() -> None:
    fw = Firewall(
        "web",
        policy(
            default="deny",
            rules=[
                {"action": "deny", "source": "10.91.2.0/24"},
                {"action": "allow", "source": "10.91.0.0/16", "ports": [80]},
            ],
        ),
    )
    assert fw.admit("10.91.1.2", 80, now=0.0) is Verdict.ALLOWED
    assert fw.admit("10.91.2.2", 80, now=0.0) is Verdict.DENIED_RULE  # first rule wins
    assert fw.admit("10.91.1.2", 443, now=0.0) is Verdict.DENIED_RULE  # port not listed
    assert fw.admit("192.0.2.1", 80, now=0.0) is Verdict.DENIED_RULE  # default
    assert fw.counts() == {
        "allowed": 1,
        "denied_rule": 3,
        "denied_rate": 0,
        "denied_concurrency": 0,
    }


def test_new_connections_per_source_are_a_token_bucket() -> None:
    fw = Firewall("web", policy(new_per_source_per_second=10, new_burst=5))
    verdicts = [fw.admit("10.91.1.2", 80, now=0.0) for _ in range(7)]
    assert verdicts.count(Verdict.ALLOWED) == 5
    assert verdicts[5:] == [Verdict.DENIED_RATE, Verdict.DENIED_RATE]
    assert fw.admit("10.91.1.3", 80, now=0.0) is Verdict.ALLOWED  # per source
    assert fw.admit("10.91.1.2", 80, now=0.05) is Verdict.DENIED_RATE  # half a token
    assert fw.admit("10.91.1.2", 80, now=0.1) is Verdict.ALLOWED  # 0.1 s = 1 token


def test_concurrent_connections_per_source() -> None:
    fw = Firewall("web", policy(concurrent_per_source=2))
    assert fw.admit("10.91.1.2", 80, now=0.0) is Verdict.ALLOWED
    assert fw.admit("10.91.1.2", 80, now=0.0) is Verdict.ALLOWED
    assert fw.admit("10.91.1.2", 80, now=0.0) is Verdict.DENIED_CONCURRENCY
    fw.closed("10.91.1.2")
    assert fw.admit("10.91.1.2", 80, now=1.0) is Verdict.ALLOWED


def syn(sport: int, src: str = "10.91.1.2") -> Miss:
    return Miss(FlowKey(6, src, sport, "10.93.0.1", 80), SYN, b"")


def test_classifier_plumbs_drop_routes_and_counts() -> None:
    doc = config()
    doc["applications"][0]["firewall"] = {  # type: ignore[index]
        "rules": [{"action": "deny", "source": "10.91.2.0/24"}],
        "concurrent_per_source": 1,
        "drop_ttl": 7.0,
    }
    core = ClassifierCore(parse_config(doc))
    denied = core.classify("fw1", ClassifyBatch([syn(1, "10.91.2.2")]), now=0.0)
    assert isinstance(denied[0], DropRoutes)
    assert denied[0].drops[0].ttl == 7.0
    (ok,) = core.classify("fw1", ClassifyBatch([syn(2)]), now=0.0)
    assert isinstance(ok, AddRoutes)
    (second,) = core.classify("fw1", ClassifyBatch([syn(3)]), now=0.0)
    assert isinstance(second, DropRoutes)  # the first one is still open
    core.routes_removed("fw1", [ok.routes[0].flow], now=1.0)  # it ended
    (third,) = core.classify("fw1", ClassifyBatch([syn(4)]), now=1.0)
    assert isinstance(third, AddRoutes)
    assert core.firewall_counts() == {
        "web": {"allowed": 2, "denied_rule": 1, "denied_rate": 0, "denied_concurrency": 1}
    }
    assert core.counters["firewall_denied_rule"] == 1
    core.on_message("fw1", RoutesRemoved([third.routes[0].flow], "closed"), now=2.0)
    assert core.firewalls["web"].open == {}
