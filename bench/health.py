"""Failure detection time of the health and load cores, on a fake clock.

Run: ``.venv/bin/python bench/health.py [--trials N] [--seed S] [--latency SECONDS]``.

The real ``AgentCore``, ``HandlerCore`` and allotment code run in
``hanlb.health.sim`` (an in-memory network with a fixed one-way latency).
Each trial lets the cluster settle, then at a random moment (random phase
against the heartbeat and probe timers) breaks one thing and measures the time
until a subscribed classifier receives an allotment giving the broken endpoint
no tokens:

- **dead host**: the host stops (no probes, heartbeats or answers); the
  handler notices when heartbeats have been missing for
  ``heartbeat_misses * heartbeat_interval``;
- **dead application, refused**: the application's port refuses connections;
  the agent marks it down after ``fall`` failed probes and heartbeats at once;
- **dead application, hung**: the application accepts nothing and each probe
  fails only at the check's ``timeout``.

The defaults of ``hanlb.config`` are used. HAProxy's defaults (``inter 2s``,
``fall 3``) detect a dead server in 4-6 s, printed as the reference.
"""

from __future__ import annotations

import argparse
import random
import statistics

from hanlb.config import ClusterConfig, parse_config
from hanlb.health.sim import HealthSim


def cluster() -> ClusterConfig:
    return parse_config(
        {
            "cluster": {"key": "k" * 32},
            "hosts": [
                {"name": f"h{i}", "address": f"10.0.0.{i}", "mac": f"02:00:00:00:00:0{i}"}
                for i in (1, 2, 3)
            ],
            "applications": [
                {
                    "name": "web",
                    "vip": "10.9.0.1",
                    "port": 80,
                    "pool": [{"host": "h1"}, {"host": "h2"}, {"host": "h3"}],
                }
            ],
            "handlers": [{"name": "hl1", "listen": "127.0.0.1:7601"}],
        }
    )


def trial(cfg: ClusterConfig, kind: str, rng: random.Random, latency: float) -> float:
    sim = HealthSim(cfg, latency=latency, probe_latency=2 * latency)
    sim.subscribe("cl1", "hl1")
    sim.run_until(2.0 + rng.random() * 2.0)
    died = sim.now
    if kind == "host":
        sim.kill_host("h2")
    else:
        sim.set_app("h2", "web", "refused" if kind == "app-refused" else "hung")

    def h2_has_tokens() -> bool:
        last = [r for r in sim.received if r.allotment.app == "web"][-1]
        return any(e.host == "h2" and e.tokens > 0 for e in last.allotment.entries)

    sim.run_while(h2_has_tokens, died + 30.0)
    return sim.now - died


def describe(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return (
        f"min {min(samples):.3f}  p50 {q[49]:.3f}  p90 {q[89]:.3f}  p99 {q[98]:.3f}  "
        f"max {max(samples):.3f}  mean {statistics.fmean(samples):.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--latency", type=float, default=0.0005, help="one-way latency, s")
    args = ap.parse_args()
    cfg = cluster()
    h, hc = cfg.health, cfg.applications[0].health_check
    rng = random.Random(args.seed)
    print(f"seed {args.seed}, {args.trials} trials each, one-way latency {args.latency * 1e3} ms")
    print(
        f"config: heartbeat_interval {h.heartbeat_interval} s x misses {h.heartbeat_misses}; "
        f"check interval {hc.interval} s, fall {hc.fall}, timeout {hc.timeout} s"
    )
    bounds = {
        "host": (
            (h.heartbeat_misses - 1) * h.heartbeat_interval,
            h.heartbeat_misses * h.heartbeat_interval,
        ),
        "app-refused": ((hc.fall - 1) * hc.interval, hc.fall * hc.interval),
        "app-hung": (
            (hc.fall - 1) * hc.interval + hc.timeout,
            hc.fall * hc.interval + hc.timeout,
        ),
    }
    print(
        f"{'failure':<12} {'expected (s)':<14} measured until a classifier's allotment drops it, s"
    )
    for kind in ("host", "app-refused", "app-hung"):
        samples = [trial(cfg, kind, rng, args.latency) for _ in range(args.trials)]
        lo, hi = bounds[kind]
        print(f"{kind:<12} {lo:.2f}-{hi:.2f}{'':<5} {describe(samples)}")
    print(f"{'HAProxy':<12} {'4.00-6.00':<14} default inter 2 s, fall 3 (reference, not measured)")


if __name__ == "__main__":
    main()
