"""Session entries and their canonical keys (claims 30-32, 48-49).

One record type holds both kinds of entry the tracker keeps:

- a *transport flow*: key ``f|<proto>|<src>|<sport>|<dst>|<dport>`` (the flow as
  the client sees it, see ``hanlb.flow.FlowKey``) -> host, plus the forwarder
  that carries it;
- a *higher-level session*: key ``s|<kind>|<value>`` (kind such as
  ``tls-session`` or ``http-cookie``; the value may contain anything) -> host,
  forwarder ``""``.

Every entry carries a ``Version``: ``(wall-clock ns at the writing tracker node,
that node's name)``. Versions are totally ordered and the highest one wins
(last writer wins); a delete is a *tombstone* entry (``deleted=True``) with a
newer version, kept until it expires so that the delete replicates like any
write. ``expires`` is wall-clock epoch seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import NamedTuple

from ..flow import FlowKey
from ..protocol.codec import record

__all__ = [
    "MAX_KEY_LEN",
    "ZERO_VERSION",
    "Entry",
    "SessionKey",
    "Version",
    "flow_key",
    "is_flow_key",
    "parse_key",
    "session_key",
]

MAX_KEY_LEN = 512
_KIND = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")


@record
@dataclass(frozen=True, slots=True, order=True)
class Version:
    """Who wrote an entry, when: ordered by ``ns`` then ``node``."""

    ns: int
    node: str

    def __post_init__(self) -> None:
        if not 0 <= self.ns < 2**63 or len(self.node) > 64:
            raise ValueError("bad version")

    def __str__(self) -> str:
        return f"{self.ns}@{self.node}"


ZERO_VERSION = Version(0, "")
"""The version of an entry not yet stamped by a tracker node (older than any write)."""


@record
@dataclass(frozen=True, slots=True)
class Entry:
    """One row of the session-tracking table.

    ``forwarder`` is the forwarder that carries a transport flow (``""`` for a
    higher-level session). An entry is *live* at wall time ``t`` when it is not
    a tombstone and ``expires > t``.
    """

    key: str
    host: str
    forwarder: str = ""
    expires: float = 0.0
    version: Version = ZERO_VERSION
    deleted: bool = False

    def __post_init__(self) -> None:
        if not 0 < len(self.key) <= MAX_KEY_LEN or self.key[:2] not in ("f|", "s|"):
            raise ValueError(f"bad key {self.key[:40]!r}")
        if len(self.host) > 64 or len(self.forwarder) > 64:
            raise ValueError("host or forwarder name too long")
        if not self.expires >= 0.0:  # also refuses NaN
            raise ValueError("bad expiry")

    def live(self, wall: float) -> bool:
        return not self.deleted and self.expires > wall

    def stamped(self, version: Version, expires: float) -> Entry:
        return replace(self, version=version, expires=expires)

    def tombstone(self, version: Version, expires: float) -> Entry:
        """A delete of this entry (it keeps host and forwarder, for bulk queries)."""
        return Entry(self.key, self.host, self.forwarder, expires, version, True)

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "host": self.host,
            "forwarder": self.forwarder,
            "expires": self.expires,
            "version": str(self.version),
            "deleted": self.deleted,
        }


class SessionKey(NamedTuple):
    """A higher-level session's identity: ``(kind, value)``."""

    kind: str
    value: str


def flow_key(flow: FlowKey) -> str:
    """The canonical key of a transport flow."""
    return f"f|{flow.proto}|{flow.src}|{flow.sport}|{flow.dst}|{flow.dport}"


def session_key(kind: str, value: str) -> str:
    """The canonical key of a higher-level session (``kind`` like ``tls-session``).

    Raises ``ValueError`` for a kind that is not ``[a-z0-9][a-z0-9_.-]*`` (at most
    32 characters) or a key longer than ``MAX_KEY_LEN``.
    """
    if not _KIND.match(kind):
        raise ValueError(f"bad session kind {kind!r}")
    key = f"s|{kind}|{value}"
    if len(key) > MAX_KEY_LEN:
        raise ValueError("session key too long")
    return key


def is_flow_key(key: str) -> bool:
    return key.startswith("f|")


def parse_key(key: str) -> FlowKey | SessionKey:
    """The inverse of ``flow_key`` and ``session_key``; ``ValueError`` if neither."""
    if key.startswith("f|"):
        parts = key.split("|")
        if len(parts) != 6:
            raise ValueError(f"bad flow key {key!r}")
        _, proto, src, sport, dst, dport = parts
        if not (proto.isdigit() and sport.isdigit() and dport.isdigit()):
            raise ValueError(f"bad flow key {key!r}")
        flow = FlowKey(int(proto), src, int(sport), dst, int(dport))
        if flow_key(flow) != key:  # e.g. leading zeros: not canonical
            raise ValueError(f"flow key {key!r} is not canonical")
        return flow
    if key.startswith("s|"):
        kind, sep, value = key[2:].partition("|")
        if not sep or not _KIND.match(kind):
            raise ValueError(f"bad session key {key!r}")
        return SessionKey(kind, value)
    raise ValueError(f"bad key {key!r}")
