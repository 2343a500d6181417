"""Per-application firewall policy for new connections (claims 33-34, 60).

The classifier asks ``Firewall.admit`` for every new connection (a SYN it is
about to place). In order:

1. the first rule whose source prefix (and destination ports, if any) matches
   decides allow or deny; no rule matching -> the policy's default;
2. ``new_per_source_per_second``: a token bucket per client address
   (``new_burst`` deep); an empty bucket refuses;
3. ``concurrent_per_source``: connections this classifier placed for the
   address and has not yet seen end; at the limit it refuses.

A refusal becomes a drop route (``drop_ttl``) in the forwarder, so the flow's
later packets are dropped in the datapath. Every decision is counted by
application and verdict. Buckets of addresses idle for a minute are forgotten.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter
from dataclasses import dataclass

from ..config import FirewallPolicy

__all__ = ["Firewall", "Verdict"]

IDLE_FORGET = 60.0


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    DENIED_RULE = "denied_rule"
    DENIED_RATE = "denied_rate"
    DENIED_CONCURRENCY = "denied_concurrency"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class Firewall:
    def __init__(self, app: str, policy: FirewallPolicy) -> None:
        self.app = app
        self.policy = policy
        self._rules = [
            (r.action == "allow", ipaddress.IPv4Network(r.source), frozenset(r.ports))
            for r in policy.rules
        ]
        self._buckets: dict[str, _Bucket] = {}
        self.open: Counter[str] = Counter()
        """Connections open per client address (placed, not yet ended)."""
        self.verdicts: Counter[Verdict] = Counter()
        self._next_cleanup = 0.0

    @property
    def trivial(self) -> bool:
        """Admits everything: no rule, no limit, default allow."""
        p = self.policy
        return (
            not self._rules
            and p.default == "allow"
            and p.new_per_source_per_second is None
            and p.concurrent_per_source is None
        )

    def admit(self, src: str, dport: int, now: float) -> Verdict:
        verdict = self._decide(src, dport, now)
        self.verdicts[verdict] += 1
        if verdict is Verdict.ALLOWED:
            self.open[src] += 1
        if now >= self._next_cleanup:
            self._cleanup(now)
        return verdict

    def closed(self, src: str) -> None:
        """A connection of ``src`` that ``admit`` allowed has ended."""
        left = self.open[src] - 1
        if left > 0:
            self.open[src] = left
        else:
            self.open.pop(src, None)

    def _decide(self, src: str, dport: int, now: float) -> Verdict:
        p = self.policy
        allow = p.default == "allow"
        if self._rules:
            addr = ipaddress.IPv4Address(src)
            for rule_allows, net, ports in self._rules:
                if addr in net and (not ports or dport in ports):
                    allow = rule_allows
                    break
        if not allow:
            return Verdict.DENIED_RULE
        if p.new_per_source_per_second is not None:
            b = self._buckets.get(src)
            if b is None:
                b = self._buckets[src] = _Bucket(float(p.new_burst), now)
            b.tokens = min(
                float(p.new_burst), b.tokens + (now - b.stamp) * p.new_per_source_per_second
            )
            b.stamp = now
            if b.tokens < 1.0:
                return Verdict.DENIED_RATE
            b.tokens -= 1.0
        if p.concurrent_per_source is not None and self.open[src] >= p.concurrent_per_source:
            return Verdict.DENIED_CONCURRENCY
        return Verdict.ALLOWED

    def _cleanup(self, now: float) -> None:
        self._next_cleanup = now + IDLE_FORGET
        stale = [a for a, b in self._buckets.items() if now - b.stamp > IDLE_FORGET]
        for a in stale:
            del self._buckets[a]

    def counts(self) -> dict[str, int]:
        return {v.value: self.verdicts[v] for v in Verdict}
