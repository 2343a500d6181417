"""A configuration for the health tests (a helper module; it holds no tests itself)."""

from __future__ import annotations

from typing import Any

from hanlb.config import ClusterConfig, parse_config

WEIGHTS = {"h1": 1, "h2": 2, "h3": 4, "h4": 1}


def health_config(
    handlers: int = 1, health: dict[str, Any] | None = None, check: dict[str, Any] | None = None
) -> ClusterConfig:
    """Four hosts; ``web`` on all of them with weights 1:2:4:1, ``api`` on h1 and h2."""
    doc: dict[str, Any] = {
        "cluster": {"key": "k" * 32, "run_dir": "/tmp/hanlb-health-unit"},
        "hosts": [
            {"name": h, "address": f"10.0.0.{i}", "mac": f"02:00:00:00:00:0{i}"}
            for i, h in enumerate(WEIGHTS, 1)
        ],
        "applications": [
            {
                "name": "web",
                "vip": "10.9.0.1",
                "port": 80,
                "pool": [{"host": h, "weight": w} for h, w in WEIGHTS.items()],
                "health_check": check or {},
            },
            {
                "name": "api",
                "vip": "10.9.0.1",
                "port": 81,
                "pool": [{"host": "h1"}, {"host": "h2"}],
                "strategy": "greatest",
                "health_check": check or {},
            },
        ],
        "handlers": [
            {"name": f"hl{i}", "listen": f"127.0.0.1:{7600 + i}"} for i in range(1, handlers + 1)
        ],
    }
    if health:
        doc["health"] = health
    return parse_config(doc)
