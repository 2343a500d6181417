"""ForwarderCore: misses, held packets, route life, batching (no I/O)."""

from __future__ import annotations

from hanlb.flow import ACK, FIN, SYN, FlowKey, mac_bytes
from hanlb.forwarder.core import (
    ForwarderCore,
    Install,
    LiftDrops,
    Remove,
    RouteState,
    Transmit,
    Trust,
)
from hanlb.protocol.messages import (
    AddRoutes,
    ClassifyBatch,
    DeleteRoutes,
    DropRoute,
    DropRoutes,
    DumpRoutes,
    Route,
    RouteDump,
    RoutesRemoved,
)
from tests.packets import tcp_frame

OWN = "02:92:00:00:00:0b"
HOST = "02:92:00:00:01:01"
VIP = ("10.93.0.1", 80)


def make(fast_path: bool = True, now: float = 0.0) -> ForwarderCore:
    return ForwarderCore(
        "fw1",
        mac_bytes(OWN),
        [VIP],
        fast_path=fast_path,
        linger=2.0,
        idle_timeout=30.0,
        sweep_interval=0.5,
        classify_timeout=1.0,
        now=now,
    )


def frame(sport: int = 40000, flags: int = SYN, dst_mac: str = OWN) -> bytes:
    return tcp_frame("10.91.1.2", sport, "10.93.0.1", 80, flags, dst_mac=dst_mac)


def flow(sport: int = 40000) -> FlowKey:
    return FlowKey(6, "10.91.1.2", sport, "10.93.0.1", 80)


def test_miss_is_held_and_sent_after_install() -> None:
    core = make()
    core.on_frame(frame(), now=0.0)
    core.on_frame(frame(), now=0.01)  # a retransmitted SYN is not asked about twice
    (batch,) = core.messages()
    assert isinstance(batch, ClassifyBatch)
    assert [m.flow for m in batch.misses] == [flow()]
    assert core.actions() == []
    core.on_message(AddRoutes([Route(flow(), "h1", HOST)]), now=0.02)
    install, send = core.actions()
    assert install == Install([(flow(), mac_bytes(HOST))])
    assert isinstance(send, Transmit)
    assert send.frame[:6] == mac_bytes(HOST) and send.frame[6:12] == mac_bytes(OWN)
    assert send.frame[12:] == frame()[12:]
    assert core.counters["classify_requests"] == 1


def test_misses_of_one_pass_become_one_batch_and_one_install() -> None:
    core = make()
    for port in range(40000, 40100):
        core.on_frame(frame(port), now=0.0)
    (batch,) = core.messages()
    assert isinstance(batch, ClassifyBatch) and len(batch.misses) == 100
    core.on_message(AddRoutes([Route(m.flow, "h1", HOST) for m in batch.misses]), now=0.01)
    actions = core.actions()
    installs = [a for a in actions if isinstance(a, Install)]
    assert len(installs) == 1 and len(installs[0].routes) == 100
    assert sum(isinstance(a, Transmit) for a in actions) == 100


def test_unanswered_miss_times_out() -> None:
    core = make()
    core.on_frame(frame(), now=0.0)
    core.messages()
    assert core.get_timer() <= 1.0
    core.handle_timer(now=1.0)
    assert not core.pending
    assert core.counters["held_timed_out"] == 1


def test_fin_copy_starts_linger_then_route_is_removed() -> None:
    core = make()
    core.on_message(AddRoutes([Route(flow(), "h1", HOST)]), now=0.0)
    core.actions()
    # kernel datapath: the copy of a forwarded FIN carries the host's MAC
    core.on_frame(frame(flags=FIN | ACK, dst_mac=HOST), now=1.0)
    assert core.routes[flow()].state is RouteState.CLOSING
    # the kernel forwarded it already; the client closed a real connection, so
    # its address is trusted on the miss path (once a minute at most)
    assert core.actions() == [Trust(["10.91.1.2"])]
    core.handle_timer(now=2.5)
    assert flow() in core.routes
    core.handle_timer(now=3.5)
    assert flow() not in core.routes
    assert core.actions() == [Remove([flow()])]
    assert RoutesRemoved([flow()], "closed") in core.messages()


def test_idle_route_expires_unless_kernel_counters_move() -> None:
    core = make()
    core.on_message(AddRoutes([Route(flow(1), "h1", HOST), Route(flow(2), "h1", HOST)]), now=0.0)
    core.actions()
    core.on_packet_counts({flow(1): 5, flow(2): 0}, now=20.0)
    core.handle_timer(now=30.0)
    assert flow(1) in core.routes and flow(2) not in core.routes
    assert core.counters["routes_removed_idle"] == 1


def test_userspace_hits_are_forwarded_by_the_core() -> None:
    core = make(fast_path=False)
    core.on_message(AddRoutes([Route(flow(), "h1", HOST)]), now=0.0)
    core.actions()
    core.on_frame(frame(flags=ACK), now=0.1)
    (send,) = core.actions()
    assert isinstance(send, Transmit) and send.frame[:6] == mac_bytes(HOST)
    assert core.messages() == []
    assert core.routes[flow()].packets == 1


def test_drop_route_drops_without_asking() -> None:
    core = make(fast_path=False)
    core.on_frame(frame(), now=0.0)
    core.messages()
    core.on_message(DropRoutes([DropRoute(flow(), 5.0)]), now=0.1)
    assert not core.pending
    core.on_frame(frame(), now=1.0)
    assert core.messages() == []
    assert core.counters["dropped_by_route"] == 1
    core.handle_timer(now=6.0)
    core.on_frame(frame(), now=6.1)
    assert len(core.messages()) == 1


def test_a_route_lifts_a_standing_drop() -> None:
    core = make()
    core.on_message(DropRoutes([DropRoute(flow(1), 5.0), DropRoute(flow(2), 1.0)]), now=0.0)
    core.actions()
    routes = [Route(flow(1), "h1", HOST), Route(flow(2), "h1", HOST)]
    core.on_message(AddRoutes(routes), now=2.0)
    actions = core.actions()
    # flow(2)'s drop had ended: nothing to lift in the datapath.
    assert actions[0] == LiftDrops([flow(1)])
    assert isinstance(actions[1], Install) and len(actions[1].routes) == 2
    assert not core.drops
    assert core.counters["drop_routes_lifted"] == 1


def test_delete_and_dump() -> None:
    core = make()
    core.on_message(AddRoutes([Route(flow(1), "h1", HOST), Route(flow(2), "h2", HOST)]), now=0.0)
    core.actions()
    core.on_message(DeleteRoutes([flow(1), flow(3)]), now=0.1)
    assert core.actions() == [Remove([flow(1)])]
    core.messages()
    core.on_message(DumpRoutes(7), now=0.2)
    (dump,) = core.messages()
    assert dump == RouteDump(7, [Route(flow(2), "h2", HOST)], [])


def test_bad_and_foreign_frames_are_counted_not_raised() -> None:
    core = make()
    core.on_frame(b"\x00" * 10, now=0.0)
    core.on_frame(tcp_frame("10.91.1.2", 1, "10.93.0.9", 80, SYN, dst_mac=OWN), now=0.0)
    assert core.counters["frames_malformed"] == 1
    assert core.counters["frames_not_vip"] == 1
    assert core.messages() == []


def test_new_classifier_is_asked_again_for_held_flows() -> None:
    core = make()
    core.on_frame(frame(), now=0.0)
    core.messages()
    core.classifier_changed(now=0.5)
    (batch,) = core.messages()
    assert isinstance(batch, ClassifyBatch) and batch.misses[0].flow == flow()
    assert core.pending[flow()].deadline == 1.5


def test_retransmitted_syn_keeps_its_host_but_a_reused_flow_is_classified_anew() -> None:
    core = make()
    syn = tcp_frame("10.91.1.2", 40000, "10.93.0.1", 80, SYN, dst_mac=OWN, seq=100)
    core.on_frame(syn, now=0.0)
    core.messages()
    core.on_message(AddRoutes([Route(flow(), "h1", HOST)]), now=0.01)
    core.actions()
    # the same SYN again (the SYN-ACK was lost): the same host, no new question
    core.on_frame(syn, now=1.0)
    (send,) = core.actions()
    assert isinstance(send, Transmit) and send.frame[:6] == mac_bytes(HOST)
    assert core.messages() == []
    # a new connection from the same port (the old one was refused, say)
    fresh = tcp_frame("10.91.1.2", 40000, "10.93.0.1", 80, SYN, dst_mac=OWN, seq=999)
    core.on_frame(fresh, now=2.0)
    assert core.actions() == [Remove([flow()])]
    removed, batch = core.messages()
    assert removed == RoutesRemoved([flow()], "reused")  # before the new question
    assert isinstance(batch, ClassifyBatch) and batch.misses[0].flow == flow()
    assert core.counters["routes_reused"] == 1
