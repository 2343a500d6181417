"""Which classifier a forwarder uses (claims 56-58), without I/O.

A forwarder has its classifiers in preference order (``ClusterConfig.
classifiers_for``: the configured list, or every classifier, rotated so that
forwarders spread evenly). It uses the most preferred one it can reach:

- ``next_candidate(now)``: whom to connect to now: the most preferred
  classifier that is not backing off after a failure;
- ``failed(name, now)``: connecting failed or the link died (closed, or the
  liveness detector suspected it): back off ``retry`` seconds from it;
- ``better_than(current, now)``: a more preferred classifier worth trying
  while connected to ``current`` (one that came back takes its work back;
  routes live in the forwarder, so nothing established is disturbed, and
  flows it did not place are found in the session tracker).
"""

from __future__ import annotations

__all__ = ["ClassifierChoice"]


class ClassifierChoice:
    def __init__(self, names: list[str], retry: float) -> None:
        if not names:
            raise ValueError("a forwarder needs at least one classifier")
        self.names = list(names)
        self.retry = retry
        self._backoff: dict[str, float] = {}

    def next_candidate(self, now: float) -> str:
        """The most preferred classifier not backing off; if all are, the one
        whose backoff ends first."""
        for name in self.names:
            if self._backoff.get(name, 0.0) <= now:
                return name
        return min(self.names, key=lambda n: self._backoff[n])

    def wait_until(self, name: str) -> float:
        """When ``name``'s backoff ends (0.0 if it has none)."""
        return self._backoff.get(name, 0.0)

    def failed(self, name: str, now: float) -> None:
        self._backoff[name] = now + self.retry

    def succeeded(self, name: str) -> None:
        self._backoff.pop(name, None)

    def better_than(self, current: str, now: float) -> str | None:
        for name in self.names:
            if name == current:
                return None
            if self._backoff.get(name, 0.0) <= now:
                return name
        return None
