"""Issue 2 acceptance: real HTTP connections through the L4 tier of the lab.

2 client namespaces, 2 forwarders (ECMP at the router), 1 classifier, 4 equal
hosts. Every connection must succeed, each host must get 25% +/- 5%, the
classifier must see exactly one classify request per flow (the rest of every
flow stays in the datapath) and route tables must drain after the close.
"""

from __future__ import annotations

import pytest

from tests.lab.helpers import LabFactory, ctl, parallel_load, wait_for, wait_plumbed

CONNECTIONS = 2000


@pytest.mark.lab
@pytest.mark.parametrize("datapath", ["kernel", "userspace"])
def test_connections_are_balanced_and_classified_once(
    lab_factory: LabFactory, datapath: str
) -> None:
    lab = lab_factory(clients=2, forwarders=2, classifiers=1, hosts=4, datapath=datapath)
    lab.wait_ready()
    wait_plumbed(lab)

    result = parallel_load(lab, CONNECTIONS // 2, concurrency=20, timeout=10)

    assert result["failed"] == 0, result["errors"]
    assert result["ok"] == CONNECTIONS
    assert set(result["served_by"]) == {"h1", "h2", "h3", "h4"}
    for host, count in result["served_by"].items():
        share = count / CONNECTIONS
        assert 0.20 <= share <= 0.30, f"{host} served {share:.1%}"

    classifier = ctl("cl1")["counters"]
    assert classifier["new_flows"] == CONNECTIONS
    assert classifier["classify_requests"] == CONNECTIONS, classifier
    forwarders = [ctl(f"fw{i}") for i in (1, 2)]
    # both forwarders carried traffic (ECMP at the router)
    assert all(f["counters"].get("classify_requests", 0) > 0 for f in forwarders)
    assert sum(f["counters"]["classify_requests"] for f in forwarders) == CONNECTIONS
    if datapath == "kernel":
        # after the SYN, packets never left the kernel: >= 3 more per flow (ACK,
        # request, FIN/ACK...) were forwarded by the nftables map
        stats = [f["datapath_stats"] for f in forwarders]
        assert sum(s["forwarded"] for s in stats) >= 3 * CONNECTIONS
        assert sum(s["misses"] for s in stats) == CONNECTIONS

    # route tables drain after the connections close (linger 2 s + sweep)
    wait_for(
        lambda: all(ctl(f"fw{i}")["routes"] == 0 for i in (1, 2)),
        timeout=15,
        what="forwarder route tables drained",
    )
    wait_for(lambda: ctl("cl1")["flows"] == 0, timeout=5, what="classifier forgot the flows")
    rows = ctl("fw1", "/routes")
    assert rows == []
