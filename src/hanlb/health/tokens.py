"""Spending token allotments in a classifier or request router (claims 27, 35-42).

``TokenSelector`` is a ``HostSelector``: each new flow of an application
consumes one token of the endpoint it goes to. How the next endpoint is
picked is the application's ``strategy``:

- ``round-robin``: a rotation over the endpoints with tokens left, each
  appearing in proportion to its tokens in the allotment (smooth weighted
  round robin with the allotted tokens as weights: over a whole allotment
  every endpoint is chosen exactly its tokens' worth of times, interleaved, so
  every stretch of picks keeps the allotment's proportions);
- ``linear``: the first endpoint's tokens, then the next endpoint's, ...;
- ``greatest``: the endpoint with the most tokens left (ties: allotment order).

Allotments are double-buffered. When ``allotment_refresh`` of the current
allotment is spent, or it is that fraction of ``allotment_ttl`` old, the
application is ``wanted()`` and the client asks its handler for a new one.
An answer whose set of endpoints with tokens is the same as the current one's
waits as the *next* allotment and takes over when the current one is spent or
expires, so every allotment is spent whole and the shares hold whatever the
strategy. An allotment that changes which endpoints have tokens (an endpoint
went down or came back) replaces the current one at once.

It never stalls: with no allotment, an expired one, or every token spent and
no next one, it falls back to smooth weighted round robin over the configured
weights among the hosts last known healthy (those with tokens in the latest
allotment; all configured hosts if none has ever arrived), counting
``fallback_choices``. Only a current allotment in which every endpoint has 0
tokens (every endpoint down) makes ``choose`` answer None.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..classifier.selection import SmoothWeightedRoundRobin
from ..config import ClusterConfig
from .messages import TokenAllotment

__all__ = ["STRATEGIES", "TokenSelector"]

STRATEGIES = ("round-robin", "linear", "greatest")


@dataclass(slots=True)
class _Allotment:
    allotment_id: int
    source: str
    order: list[str]
    allotted: dict[str, int]
    left: dict[str, int]
    expires: float
    received: float
    rr_current: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.allotted.values())

    @property
    def remaining(self) -> int:
        return sum(self.left.values())

    @property
    def healthy(self) -> frozenset[str]:
        return frozenset(h for h, n in self.allotted.items() if n > 0)


@dataclass(slots=True)
class _App:
    weights: dict[str, int]
    strategy: str
    current: _Allotment | None = None
    next: _Allotment | None = None
    latest: _Allotment | None = None
    asked_at: float | None = None
    fallback: SmoothWeightedRoundRobin | None = None
    fallback_hosts: frozenset[str] | None = None


class TokenSelector:
    """Token allotments per application, spent one per new flow."""

    def __init__(
        self,
        pools: dict[str, dict[str, int]],
        strategies: dict[str, str] | None = None,
        *,
        refresh: float = 0.5,
        ttl: float = 5.0,
        retry: float = 1.0,
    ) -> None:
        strategies = strategies or {}
        for app, s in strategies.items():
            if s not in STRATEGIES:
                raise ValueError(f"{app}: unknown strategy {s!r}")
        self.refresh = refresh
        self.ttl = ttl
        self.retry = retry
        """A request not answered within this many seconds is sent again."""
        self.apps = {
            app: _App(dict(w), strategies.get(app, "round-robin")) for app, w in pools.items()
        }
        self.counters: Counter[str] = Counter()

    @classmethod
    def from_config(cls, config: ClusterConfig) -> TokenSelector:
        h = config.health
        return cls(
            {a.name: {m.host: m.weight for m in a.pool} for a in config.applications},
            {a.name: a.strategy for a in config.applications},
            refresh=h.allotment_refresh,
            ttl=h.allotment_ttl,
            retry=max(config.timers.liveness_interval * config.timers.liveness_misses, 0.1),
        )

    # -- HostSelector ------------------------------------------------------------------

    def choose(self, app: str, now: float) -> str | None:
        st = self.apps.get(app)
        if st is None:
            self.counters["unknown_app"] += 1
            return None
        self.counters["choices"] += 1
        a = self._in_force(st, now)
        if a is not None:
            host = self._spend(st, a)
            if host is not None:
                self.counters["token_choices"] += 1
                return host
        if st.current is not None and st.current.total == 0 and st.current.expires > now:
            self.counters["no_host_all_down"] += 1
            return None
        return self._fallback(st, now)

    def set_pool(self, app: str, weights: dict[str, int]) -> None:
        """Replace ``app``'s pool. Allotments naming a host no longer in it are
        dropped (the application is then wanted again)."""
        st = self.apps.get(app)
        if st is None:
            self.apps[app] = _App(dict(weights), "round-robin")
            return
        st.weights = dict(weights)
        st.fallback, st.fallback_hosts = None, None
        if st.current is not None and not set(st.current.order) <= set(weights):
            st.current = None
        if st.next is not None and not set(st.next.order) <= set(weights):
            st.next = None

    # -- allotments ----------------------------------------------------------------------

    def on_allotment(self, msg: TokenAllotment, now: float) -> None:
        st = self.apps.get(msg.app)
        if st is None:
            self.counters["allotments_unknown_app"] += 1
            return
        newest = st.latest
        if (
            newest is not None
            and newest.source == msg.source
            and msg.allotment_id <= newest.allotment_id
        ):
            self.counters["allotments_stale"] += 1
            return
        self.counters["allotments_received"] += 1
        order: list[str] = []
        allotted: dict[str, int] = {}
        for e in msg.entries:
            if e.host not in st.weights or e.host in allotted:
                self.counters["allotment_entries_unknown_host"] += 1
                continue
            order.append(e.host)
            allotted[e.host] = e.tokens
        a = _Allotment(
            msg.allotment_id,
            msg.source,
            order,
            allotted,
            dict(allotted),
            now + msg.ttl,
            now,
            dict.fromkeys(order, 0),
        )
        st.latest = a
        st.asked_at = None
        cur = st.current
        if cur is None or cur.expires <= now or cur.remaining == 0 or cur.healthy != a.healthy:
            if cur is not None and cur.healthy != a.healthy:
                self.counters["allotments_replaced_health"] += 1
            st.current, st.next = a, None
        else:
            st.next = a
            self.counters["allotments_queued"] += 1

    def wanted(self, now: float) -> list[str]:
        """Applications to ask a handler for a new allotment for, now.

        An application is wanted when it has no allotment, when
        ``allotment_refresh`` of its current allotment is spent or that
        fraction of its ttl has passed, and no next allotment is waiting.
        A request not answered within ``retry`` seconds is wanted again.
        Calling this records the request as sent.
        """
        out = []
        for app, st in self.apps.items():
            if st.asked_at is not None and now - st.asked_at < self.retry:
                continue
            cur = st.current
            if cur is None or cur.expires <= now:
                need = st.next is None or st.next.expires <= now
            elif st.next is not None:
                need = False
            else:
                total = cur.total
                spent = total - cur.remaining
                need = (
                    total > 0 and spent >= self.refresh * total
                ) or now - cur.received >= self.refresh * (cur.expires - cur.received)
            if need:
                st.asked_at = now
                self.counters["allotment_requests"] += 1
                out.append(app)
        return out

    def forget_requests(self) -> None:
        """Requests in flight are lost (the handler changed): ask again at once."""
        for st in self.apps.values():
            st.asked_at = None

    def allotment_id(self, app: str) -> int:
        """The id of ``app``'s current allotment (0: none)."""
        st = self.apps.get(app)
        return st.current.allotment_id if st is not None and st.current is not None else 0

    def tokens_left(self, app: str, now: float) -> dict[str, int] | None:
        """Tokens left per host in the allotment in force, or None if there is none."""
        st = self.apps.get(app)
        a = self._in_force(st, now) if st is not None else None
        return dict(a.left) if a is not None else None

    # -- internals -----------------------------------------------------------------------

    def _in_force(self, st: _App, now: float) -> _Allotment | None:
        cur = st.current
        if cur is not None and cur.expires > now and cur.remaining > 0:
            return cur
        if cur is not None and cur.expires <= now:
            self.counters["allotments_expired"] += 1
            st.current = None
        nxt = st.next
        if nxt is not None:
            st.next = None
            if nxt.expires > now:
                st.current = nxt
                self.counters["allotments_swapped_in"] += 1
                return nxt if nxt.remaining > 0 else None
            self.counters["allotments_expired"] += 1
        return None

    def _spend(self, st: _App, a: _Allotment) -> str | None:
        live = [h for h in a.order if a.left[h] > 0]
        if not live:
            return None
        if st.strategy == "linear":
            host = live[0]
        elif st.strategy == "greatest":
            host = max(live, key=lambda h: (a.left[h], -a.order.index(h)))
        else:
            host = self._rotate(a, live)
        a.left[host] -= 1
        return host

    @staticmethod
    def _rotate(a: _Allotment, live: list[str]) -> str:
        weights = {h: a.allotted[h] for h in live}
        total = sum(weights.values())
        best = live[0]
        best_value: int | None = None
        for h in live:
            a.rr_current[h] += weights[h]
            if best_value is None or a.rr_current[h] > best_value:
                best, best_value = h, a.rr_current[h]
        a.rr_current[best] -= total
        return best

    def _fallback(self, st: _App, now: float) -> str | None:
        latest = st.latest
        healthy = latest.healthy if latest is not None else frozenset()
        if st.current is None and st.next is None and latest is None:
            self.counters["fallback_no_allotment"] += 1
        elif latest is not None and latest.expires <= now:
            self.counters["fallback_expired"] += 1
        else:
            self.counters["fallback_spent"] += 1
        hosts = healthy & {h for h, w in st.weights.items() if w > 0}
        if not hosts:
            hosts = frozenset(h for h, w in st.weights.items() if w > 0)
        if st.fallback is None or st.fallback_hosts != hosts:
            st.fallback = SmoothWeightedRoundRobin(
                (h, w) for h, w in st.weights.items() if h in hosts
            )
            st.fallback_hosts = hosts
        host = st.fallback.choose()
        if host is not None:
            self.counters["fallback_choices"] += 1
        return host
