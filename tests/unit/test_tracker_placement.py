"""Rendezvous placement: stable, balanced, and only a leaver's keys move."""

from __future__ import annotations

import random
from collections import Counter

from hanlb.tracker.placement import BUCKETS, bucket_of, rank, replicas

MEMBERS = [f"t{i}" for i in range(1, 6)]
KEYS = [f"f|6|10.91.{i // 250}.{i % 250}|{1000 + i}|10.93.0.1|80" for i in range(4000)]


def test_placement_is_stable_whatever_the_member_order() -> None:
    shuffled = MEMBERS[:]
    random.Random(1).shuffle(shuffled)
    for key in KEYS[:500]:
        assert replicas(key, MEMBERS, 2) == replicas(key, shuffled, 2)
        assert replicas(key, MEMBERS, 2) == rank(key, MEMBERS)[:2]


def test_primaries_and_buckets_are_balanced() -> None:
    primaries = Counter(replicas(k, MEMBERS, 1)[0] for k in KEYS)
    assert min(primaries.values()) > 0.8 * len(KEYS) / len(MEMBERS)
    buckets = Counter(bucket_of(k) for k in KEYS)
    assert len(buckets) == BUCKETS
    assert min(buckets.values()) > 0.5 * len(KEYS) / BUCKETS


def test_only_the_leavers_keys_move_and_they_move_back() -> None:
    for leaver in MEMBERS:
        rest = [m for m in MEMBERS if m != leaver]
        for key in KEYS[:1000]:
            before = replicas(key, MEMBERS, 2)
            after = replicas(key, rest, 2)
            if leaver not in before:
                assert after == before
            else:
                # the survivor keeps its place in the order; one new member joins
                assert [m for m in before if m != leaver] == [m for m in after if m in before]
                assert len(set(after) - set(before)) == 1
            assert replicas(key, MEMBERS, 2) == before
