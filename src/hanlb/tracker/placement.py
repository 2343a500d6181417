"""Where an entry lives: rendezvous (highest random weight) hashing.

Every member gets a score ``blake2b(key, member)`` for a key; the members with
the ``replication`` highest scores over the *live* members are the key's
replicas, the first one its primary. When a member leaves, only the keys it was
a replica of change replicas (each gains the next member in its own order);
when it returns, exactly those keys move back.

Keys are also spread over ``BUCKETS`` buckets by their own hash, the unit of
anti-entropy digests.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b

__all__ = ["BUCKETS", "bucket_of", "rank", "replicas", "score"]

BUCKETS = 64


def score(key: str, member: str) -> int:
    h = blake2b(key.encode(), digest_size=8, key=member.encode()[:64])
    return int.from_bytes(h.digest(), "big")


def rank(key: str, members: Iterable[str]) -> list[str]:
    """All ``members``, best first, for ``key`` (ties, which need a hash
    collision, are broken by name)."""
    return sorted(members, key=lambda m: (-score(key, m), m))


def replicas(key: str, members: Iterable[str], replication: int) -> list[str]:
    """The ``replication`` best members for ``key``; the first is the primary."""
    return rank(key, members)[:replication]


def bucket_of(key: str) -> int:
    return int.from_bytes(blake2b(key.encode(), digest_size=2).digest(), "big") % BUCKETS
