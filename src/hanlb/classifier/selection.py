"""Choosing a host for a new flow.

Selection sits behind ``HostSelector`` so the health-and-load issue can replace
static weights with token allotments (claims 35-42) without touching the
classifier. ``SmoothWeightedRoundRobin`` is nginx's smooth weighted round
robin: over any window of ``sum(weights)`` picks every host is chosen exactly
``weight`` times, interleaved rather than in bursts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

__all__ = ["HostSelector", "SmoothWeightedRoundRobin", "StaticSelector"]


class HostSelector(Protocol):
    def choose(self, app: str, now: float) -> str | None:
        """A host for a new flow of ``app``, or None if none can take it."""

    def set_pool(self, app: str, weights: dict[str, int]) -> None:
        """Replace ``app``'s pool (host -> weight)."""


class SmoothWeightedRoundRobin:
    __slots__ = ("_current", "_total", "_weights")

    def __init__(self, weights: Iterable[tuple[str, int]]) -> None:
        self._weights: dict[str, int] = {h: w for h, w in weights if w > 0}
        self._current: dict[str, int] = dict.fromkeys(self._weights, 0)
        self._total = sum(self._weights.values())

    def choose(self) -> str | None:
        if not self._weights:
            return None
        best: str | None = None
        best_value = 0
        for host, weight in self._weights.items():
            value = self._current[host] + weight
            self._current[host] = value
            if best is None or value > best_value:
                best, best_value = host, value
        assert best is not None
        self._current[best] -= self._total
        return best


class StaticSelector:
    """Smooth weighted round robin per application over the configured weights."""

    def __init__(self, pools: dict[str, dict[str, int]]) -> None:
        self._rr = {app: SmoothWeightedRoundRobin(p.items()) for app, p in pools.items()}

    def choose(self, app: str, now: float) -> str | None:
        rr = self._rr.get(app)
        return rr.choose() if rr is not None else None

    def set_pool(self, app: str, weights: dict[str, int]) -> None:
        self._rr[app] = SmoothWeightedRoundRobin(weights.items())
