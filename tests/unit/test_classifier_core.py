"""ClassifierCore and smooth weighted round robin (no I/O)."""

from __future__ import annotations

from collections import Counter

from hanlb.classifier.core import ClassifierCore
from hanlb.classifier.selection import SmoothWeightedRoundRobin
from hanlb.config import parse_config
from hanlb.flow import ACK, SYN, FlowKey
from hanlb.protocol.messages import (
    AddRoutes,
    ClassifyBatch,
    DropRoutes,
    Miss,
    RoutesRemoved,
)


def config(weights: tuple[int, ...] = (1, 1, 1, 1)) -> dict[str, object]:
    hosts = [
        {"name": f"h{i}", "address": f"10.92.0.{100 + i}", "mac": f"02:92:00:00:01:{i:02x}"}
        for i in range(1, len(weights) + 1)
    ]
    return {
        "cluster": {"key": "k" * 32},
        "hosts": hosts,
        "applications": [
            {
                "name": "web",
                "vip": "10.93.0.1",
                "port": 80,
                "pool": [{"host": f"h{i}", "weight": w} for i, w in enumerate(weights, 1)],
            }
        ],
    }


def miss(sport: int, flags: int = SYN, dport: int = 80) -> Miss:
    return Miss(FlowKey(6, "10.91.1.2", sport, "10.93.0.1", dport), flags, b"")


def test_swrr_is_exact_and_smooth() -> None:
    rr = SmoothWeightedRoundRobin([("a", 5), ("b", 1), ("c", 1)])
    picks = [rr.choose() for _ in range(7)]
    assert Counter(picks) == {"a": 5, "b": 1, "c": 1}
    assert picks[:3] != ["a", "a", "a"]  # interleaved, not a burst
    assert SmoothWeightedRoundRobin([("a", 0)]).choose() is None


def test_new_flows_follow_weights() -> None:
    core = ClassifierCore(parse_config(config((1, 2, 4, 1))))
    (reply,) = core.classify("fw1", ClassifyBatch([miss(p) for p in range(800)]), now=0.0)
    assert isinstance(reply, AddRoutes)
    shares = Counter(r.host for r in reply.routes)
    assert shares == {"h1": 100, "h2": 200, "h3": 400, "h4": 100}


def test_known_flow_goes_to_the_same_host_from_any_forwarder() -> None:
    core = ClassifierCore(parse_config(config()))
    (first,) = core.classify("fw1", ClassifyBatch([miss(1000)]), now=0.0)
    assert isinstance(first, AddRoutes)
    host = first.routes[0].host
    # the flow moved to fw2 (ECMP change): a mid-flow packet, same host
    (again,) = core.classify("fw2", ClassifyBatch([miss(1000, ACK)]), now=1.0)
    assert isinstance(again, AddRoutes) and again.routes[0].host == host
    assert core.counters["replumbed_known"] == 1
    core.routes_removed("fw1", [first.routes[0].flow], now=1.5)
    assert first.routes[0].flow in core.flows  # fw2 still carries it
    core.on_message("fw2", RoutesRemoved([first.routes[0].flow], "closed"), now=2.0)
    assert first.routes[0].flow not in core.flows


def test_unknown_mid_flow_packet_gets_a_drop_route() -> None:
    core = ClassifierCore(parse_config(config()))
    (reply,) = core.classify("fw1", ClassifyBatch([miss(5, ACK)]), now=0.0)
    assert isinstance(reply, DropRoutes)
    assert core.counters["mid_flow_unknown"] == 1


def test_unknown_application_gets_a_drop_route() -> None:
    core = ClassifierCore(parse_config(config()))
    (reply,) = core.classify("fw1", ClassifyBatch([miss(5, SYN, dport=81)]), now=0.0)
    assert isinstance(reply, DropRoutes)
    assert core.counters["no_application"] == 1


def test_a_reused_flow_is_placed_anew_but_a_retransmitted_syn_is_not() -> None:
    from tests.packets import tcp_frame

    core = ClassifierCore(parse_config(config()))

    def syn(seq: int) -> Miss:
        frame = tcp_frame("10.91.1.2", 7000, "10.93.0.1", 80, SYN, seq=seq)
        return Miss(FlowKey(6, "10.91.1.2", 7000, "10.93.0.1", 80), SYN, frame[14:142])

    (first,) = core.classify("fw1", ClassifyBatch([syn(1)]), now=0.0)
    assert isinstance(first, AddRoutes)
    # the same SYN through another forwarder (ECMP moved it): same host
    (again,) = core.classify("fw2", ClassifyBatch([syn(1)]), now=0.5)
    assert isinstance(again, AddRoutes) and again.routes[0].host == first.routes[0].host
    # a new connection on the same ports: placed by the selector (the next host)
    (fresh,) = core.classify("fw2", ClassifyBatch([syn(5000)]), now=1.0)
    assert isinstance(fresh, AddRoutes) and fresh.routes[0].host != first.routes[0].host
    assert core.counters["flows_reused"] == 1
