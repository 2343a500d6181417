"""The classifier's token selector: strategies, refresh before exhaustion, fallback."""

from __future__ import annotations

from collections import Counter

import pytest

from hanlb.classifier.core import ClassifierCore
from hanlb.classifier.selection import HostSelector
from hanlb.health.messages import TokenAllotment, TokenEntry
from hanlb.health.tokens import TokenSelector
from tests.unit.test_health_config import WEIGHTS, health_config

POOL = {"a": 1, "b": 1, "c": 1}


def allotment(
    tokens: dict[str, int], aid: int = 1, ttl: float = 5.0, app: str = "app"
) -> TokenAllotment:
    return TokenAllotment(app, aid, [TokenEntry(h, n) for h, n in tokens.items()], ttl, "hl1")


def selector(strategy: str, pool: dict[str, int] | None = None, **kw: float) -> TokenSelector:
    return TokenSelector({"app": pool or POOL}, {"app": strategy}, **kw)


def picks(sel: TokenSelector, n: int, now: float = 0.0) -> list[str | None]:
    return [sel.choose("app", now) for _ in range(n)]


def test_it_is_a_host_selector_and_plugs_into_the_classifier() -> None:
    cfg = health_config()
    sel: HostSelector = TokenSelector.from_config(cfg)
    core = ClassifierCore(cfg, sel)
    assert core.selector is sel


def test_linear_spends_the_first_endpoint_then_the_next() -> None:
    sel = selector("linear")
    sel.on_allotment(allotment({"a": 2, "b": 3, "c": 1}), 0.0)
    assert picks(sel, 6) == ["a", "a", "b", "b", "b", "c"]
    assert sel.counters["token_choices"] == 6


def test_greatest_takes_the_endpoint_with_most_tokens_left() -> None:
    sel = selector("greatest")
    sel.on_allotment(allotment({"a": 1, "b": 3, "c": 2}), 0.0)
    assert picks(sel, 6) == ["b", "b", "c", "a", "b", "c"]  # ties: allotment order


def test_round_robin_rotates_in_proportion_to_tokens() -> None:
    sel = selector("round-robin")
    sel.on_allotment(allotment({"a": 1, "b": 1, "c": 1}), 0.0)
    assert picks(sel, 3) == ["a", "b", "c"]
    sel = selector("round-robin", {"a": 1, "b": 1})
    sel.on_allotment(allotment({"a": 2, "b": 6}), 0.0)
    assert picks(sel, 8) == ["b", "a", "b", "b", "b", "a", "b", "b"]
    # 1:2:4:1 over a whole allotment: exact shares, and any half keeps them
    sel = TokenSelector({"app": WEIGHTS}, {"app": "round-robin"})
    sel.on_allotment(allotment({"h1": 125, "h2": 250, "h3": 500, "h4": 125}), 0.0)
    first_half = Counter(picks(sel, 500))
    assert first_half == {"h1": 62, "h2": 125, "h3": 250, "h4": 63} or first_half == {
        "h1": 63,
        "h2": 125,
        "h3": 250,
        "h4": 62,
    }
    assert Counter(picks(sel, 500)) + first_half == {"h1": 125, "h2": 250, "h3": 500, "h4": 125}


@pytest.mark.parametrize("strategy", ["round-robin", "linear", "greatest"])
def test_every_strategy_spends_exactly_the_allotment(strategy: str) -> None:
    sel = selector(strategy)
    sel.on_allotment(allotment({"a": 3, "b": 0, "c": 5}), 0.0)
    assert Counter(picks(sel, 8)) == {"a": 3, "c": 5}
    assert sel.tokens_left("app", 0.0) is None  # spent
    assert sel.counters["fallback_choices"] == 0


def test_refresh_is_asked_before_exhaustion_and_the_answer_waits_its_turn() -> None:
    sel = selector("linear", refresh=0.5, ttl=5.0)
    assert sel.wanted(0.0) == ["app"]  # nothing yet
    assert sel.wanted(0.1) == []  # asked already
    sel.on_allotment(allotment({"a": 4, "b": 4}, aid=1), 0.2)
    assert sel.allotment_id("app") == 1
    picks(sel, 3, 0.3)
    assert sel.wanted(0.3) == []
    picks(sel, 1, 0.3)  # half spent
    assert sel.wanted(0.3) == ["app"]
    assert sel.tokens_left("app", 0.3) == {"a": 0, "b": 4}
    sel.on_allotment(allotment({"a": 4, "b": 4}, aid=2), 0.31)  # same hosts: queued
    assert sel.allotment_id("app") == 1 and sel.wanted(0.4) == []
    assert picks(sel, 5, 0.4) == ["b", "b", "b", "b", "a"]  # then the next one takes over
    assert sel.allotment_id("app") == 2
    assert sel.counters["fallback_choices"] == 0
    assert sel.counters["allotments_queued"] == 1


def test_refresh_is_asked_before_expiry_too() -> None:
    sel = selector("linear", refresh=0.5, ttl=4.0)
    sel.wanted(0.0)
    sel.on_allotment(allotment({"a": 100}, ttl=4.0), 0.0)
    assert sel.wanted(1.9) == []
    assert sel.wanted(2.0) == ["app"]


def test_a_change_of_health_replaces_the_allotment_at_once() -> None:
    sel = selector("linear")
    sel.on_allotment(allotment({"a": 4, "b": 4}, aid=1), 0.0)
    sel.on_allotment(allotment({"a": 0, "b": 8}, aid=2), 0.1)
    assert picks(sel, 2, 0.1) == ["b", "b"]
    assert sel.counters["allotments_replaced_health"] == 1


def test_stale_allotments_from_the_same_handler_are_ignored() -> None:
    sel = selector("linear")
    sel.on_allotment(allotment({"a": 1, "b": 1}, aid=5), 0.0)
    sel.on_allotment(allotment({"a": 0, "b": 9}, aid=4), 0.0)
    assert sel.counters["allotments_stale"] == 1
    other = TokenAllotment("app", 1, [TokenEntry("a", 0), TokenEntry("b", 2)], 5.0, "hl2")
    sel.on_allotment(other, 0.0)  # another handler's numbering is its own
    assert sel.tokens_left("app", 0.0) == {"a": 0, "b": 2}


def test_fallback_without_allotment_is_weighted_round_robin_over_the_pool() -> None:
    sel = selector("round-robin", {"a": 1, "b": 2})
    assert picks(sel, 6) == ["b", "a", "b", "b", "a", "b"]
    assert sel.counters["fallback_choices"] == 6
    assert sel.counters["fallback_no_allotment"] == 6


def test_fallback_after_expiry_or_exhaustion_keeps_to_the_last_healthy_hosts() -> None:
    sel = selector("round-robin", {"a": 1, "b": 2, "c": 1}, ttl=1.0)
    sel.on_allotment(allotment({"a": 1, "b": 0, "c": 1}, ttl=1.0), 0.0)
    assert set(picks(sel, 2, 0.5)) == {"a", "c"}
    assert picks(sel, 4, 0.5) == ["a", "c", "a", "c"]  # spent: fallback, without b
    assert sel.counters["fallback_spent"] == 4
    sel.on_allotment(allotment({"a": 0, "b": 5, "c": 0}, aid=2, ttl=1.0), 0.6)
    assert picks(sel, 2, 2.0) == ["b", "b"]  # expired: fallback over b only
    assert sel.counters["fallback_expired"] == 2
    assert sel.counters["allotments_expired"] == 1


def test_every_endpoint_down_means_no_host_while_the_allotment_holds() -> None:
    sel = selector("greatest", ttl=1.0)
    sel.on_allotment(allotment({"a": 0, "b": 0, "c": 0}, ttl=1.0), 0.0)
    assert sel.choose("app", 0.5) is None
    assert sel.counters["no_host_all_down"] == 1
    assert sel.choose("app", 1.5) in POOL  # expired: try the configured pool


def test_unknown_hosts_and_apps() -> None:
    sel = selector("linear")
    sel.on_allotment(allotment({"zz": 5, "a": 1}), 0.0)
    assert sel.counters["allotment_entries_unknown_host"] == 1
    assert picks(sel, 1) == ["a"]
    assert sel.choose("nope", 0.0) is None
    sel.on_allotment(allotment({"a": 1}, app="nope"), 0.0)
    assert sel.counters["allotments_unknown_app"] == 1
    sel.set_pool("app", {"b": 1})
    assert picks(sel, 2) == ["b", "b"]  # the allotment named a: dropped, fallback
    assert sel.wanted(0.0) == ["app"]
    with pytest.raises(ValueError):
        selector("random")
