"""The session-tracking protocol (claims 30-32, 46, 49, 65-66): wire codes 64-95.

Clients (classifiers, request routers, ``hanlb ctl``) and tracker nodes share
one port; the first message on a connection is ``Hello(node, role,
incarnation)`` (role ``tracker`` for a peer node, anything else for a client).

Client <-> any tracker node (the node *coordinates*: it forwards to the key's
replicas and answers)::

    64 Insert(req_id, entries, ack)      -> 66 WriteResult   (none if ack == ACK_NONE)
    65 Delete(req_id, keys, ack)         -> 66 WriteResult   (none if ack == ACK_NONE)
    67 Query(req_id, keys)               -> 69 QueryResult
    68 QueryConnection(req_id, flow)     -> 69 QueryResult
    70 BulkQuery(req_id, by, value)      -> 71 BulkResult ... (last=True ends it)

Tracker node <-> tracker node::

    80 Replicate(op_id, entries)         -> 81 ReplicateAck   (none if op_id == 0)
    82 Read(op_id, keys)                 -> 83 ReadReply
    84 BulkScan(op_id, by, value)        -> 85 BulkScanReply ... (last=True ends it)
    86 Digests(digests)                     (anti-entropy; answered by Replicate)

plus ``Ping``/``Pong`` (codes 2, 3) for liveness, every
``timers.liveness_interval``. A message that fails to authenticate or to decode
(wrong field types, a record's invariants, an unknown ``by``) is dropped and
counted by the link, never answered; the sender's timeout covers it. Requests
are idempotent, so a client may retry one on another node.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..flow import FlowKey
from ..protocol.codec import message
from .entry import MAX_KEY_LEN, Entry
from .placement import BUCKETS

__all__ = [
    "ACK_ALL",
    "ACK_NONE",
    "ACK_ONE",
    "BULK_BY",
    "BulkQuery",
    "BulkResult",
    "BulkScan",
    "BulkScanReply",
    "Delete",
    "Digests",
    "Insert",
    "Query",
    "QueryConnection",
    "QueryResult",
    "Read",
    "ReadReply",
    "Replicate",
    "ReplicateAck",
    "WriteResult",
]

ACK_NONE = 0
"""No answer: fire and forget."""
ACK_ONE = 1
"""Answer once one replica of every key has applied the write."""
ACK_ALL = 2
"""Answer once every live replica of every key has applied the write."""

BULK_BY = ("forwarder", "host", "all")


def _check_keys(keys: list[str]) -> None:
    for k in keys:
        if not 0 < len(k) <= MAX_KEY_LEN:
            raise ValueError("bad key")


def _check_ack(ack: int) -> None:
    if ack not in (ACK_NONE, ACK_ONE, ACK_ALL):
        raise ValueError(f"bad ack level {ack}")


def _check_by(by: str) -> None:
    if by not in BULK_BY:
        raise ValueError(f"bad bulk selector {by!r}")


# -- client <-> coordinator ----------------------------------------------------


@message(64)
@dataclass(frozen=True, slots=True)
class Insert:
    """Client -> any node: insert or refresh these entries.

    The coordinator stamps each entry with a new ``Version`` (its wall clock,
    its name); an ``expires`` of 0 becomes now + ``tracker.flow_ttl`` (flows) or
    ``tracker.session_ttl`` (sessions). ``deleted`` must be False. It applies
    the entries where it is a replica and sends them to the other live
    replicas. Answered by ``WriteResult`` according to ``ack`` (ACK_NONE: no
    answer); a key that does not reach the ack level within the node's
    operation timeout is listed in ``WriteResult.failed``.
    """

    req_id: int
    entries: list[Entry]
    ack: int

    def __post_init__(self) -> None:
        _check_ack(self.ack)
        if any(e.deleted for e in self.entries):
            raise ValueError("insert of a tombstone")


@message(65)
@dataclass(frozen=True, slots=True)
class Delete:
    """Client -> any node: delete these keys (unknown keys are not an error).

    The coordinator writes a tombstone for each key, replicated and
    acknowledged exactly like an ``Insert``.
    """

    req_id: int
    keys: list[str]
    ack: int

    def __post_init__(self) -> None:
        _check_ack(self.ack)
        _check_keys(self.keys)


@message(66)
@dataclass(frozen=True, slots=True)
class WriteResult:
    """Node -> client: the ``Insert`` or ``Delete`` ``req_id`` is done.

    ``failed`` lists the keys that did not reach the requested ack level in
    time (a replica did not answer); they may still have been applied by some
    replicas, and anti-entropy or repair completes them.
    """

    req_id: int
    failed: list[str]


@message(67)
@dataclass(frozen=True, slots=True)
class Query:
    """Client -> any node: look these keys up (claim 46). Answered by ``QueryResult``."""

    req_id: int
    keys: list[str]

    def __post_init__(self) -> None:
        _check_keys(self.keys)


@message(68)
@dataclass(frozen=True, slots=True)
class QueryConnection:
    """Client -> any node: look one transport flow up (claim 66).

    The same as ``Query`` of its flow key; answered by ``QueryResult``.
    """

    req_id: int
    flow: FlowKey


@message(69)
@dataclass(frozen=True, slots=True)
class QueryResult:
    """Node -> client: the live entries found for ``req_id``'s keys.

    A key without an entry here is unknown (never inserted, deleted or
    expired) or none of its replicas answered within the operation timeout.
    """

    req_id: int
    entries: list[Entry]


@message(70)
@dataclass(frozen=True, slots=True)
class BulkQuery:
    """Client -> any node: every live entry whose ``by`` field (``forwarder``
    or ``host``) equals ``value``, or all of them (``by="all"``, value ignored).

    Used to rebuild a forwarder's or classifier's state. The coordinator asks
    every live node and merges; answered by one or more ``BulkResult``.
    """

    req_id: int
    by: str
    value: str

    def __post_init__(self) -> None:
        _check_by(self.by)


@message(71)
@dataclass(frozen=True, slots=True)
class BulkResult:
    """Node -> client: one chunk of a ``BulkQuery``'s answer; ``last`` ends it."""

    req_id: int
    entries: list[Entry]
    last: bool


# -- node <-> node -------------------------------------------------------------


@message(80)
@dataclass(frozen=True, slots=True)
class Replicate:
    """Node -> node: merge these entries (last writer wins by version).

    Sent by a coordinator to a key's replicas (``op_id`` != 0: answer with
    ``ReplicateAck``), by repair and hand-off after a membership change, by
    read repair and by anti-entropy (``op_id`` 0: no answer). Entries already
    expired are ignored.
    """

    op_id: int
    entries: list[Entry]


@message(81)
@dataclass(frozen=True, slots=True)
class ReplicateAck:
    """Node -> node: every entry of ``Replicate`` ``op_id`` is applied (or was
    older than what the node holds)."""

    op_id: int


@message(82)
@dataclass(frozen=True, slots=True)
class Read:
    """Coordinator -> replica: send what you hold for these keys (``ReadReply``)."""

    op_id: int
    keys: list[str]

    def __post_init__(self) -> None:
        _check_keys(self.keys)


@message(83)
@dataclass(frozen=True, slots=True)
class ReadReply:
    """Replica -> coordinator: the entries held for ``Read`` ``op_id``'s keys,
    tombstones included (so the coordinator can tell a newer delete); a key
    missing here is not held."""

    op_id: int
    entries: list[Entry]


@message(84)
@dataclass(frozen=True, slots=True)
class BulkScan:
    """Coordinator -> every live node: the local part of a ``BulkQuery``."""

    op_id: int
    by: str
    value: str

    def __post_init__(self) -> None:
        _check_by(self.by)


@message(85)
@dataclass(frozen=True, slots=True)
class BulkScanReply:
    """Node -> coordinator: one chunk of matching live entries; ``last`` ends it."""

    op_id: int
    entries: list[Entry]
    last: bool


@message(86)
@dataclass(frozen=True, slots=True)
class Digests:
    """Node -> node, every ``tracker.anti_entropy_interval``: one digest per bucket.

    ``digests[b]`` is the XOR of ``blake2b(key, version)`` over the entries in
    bucket ``b`` that the sender holds and of which both nodes are replicas. The
    receiver computes the same over its own entries and, for every bucket that
    differs, sends its entries of that bucket in ``Replicate`` (op_id 0). Both
    nodes do this each round, so the pair converges whichever side is behind.
    """

    digests: list[int]

    def __post_init__(self) -> None:
        if len(self.digests) != BUCKETS or not all(0 <= d < 2**64 for d in self.digests):
            raise ValueError("bad digests")
