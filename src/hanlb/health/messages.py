"""Health and load messages (claims 6-7, 35-42, 67-74), wire type codes 96-127.

Two exchanges share these codes:

- **heartbeat / snapshot** between a host agent and each health-and-load (HL)
  handler, on the connection the agent opens to the handler:
  ``Heartbeat`` (agent -> handler, every ``health.heartbeat_interval`` and at
  once when an endpoint goes up or down), ``GetTableSnapshot`` (handler ->
  agent, when a checksum in a heartbeat differs from the handler's cache) and
  ``SendTableSnapshot`` (agent -> handler, the answer).
- **token allotment** between a handler and the traffic routing functions
  (classifiers, request routers), on the connection those open to the handler:
  ``Subscribe`` and ``RequestAllotment`` (classifier -> handler) and
  ``TokenAllotment`` (handler -> classifier).

Codes 102-127 are free for later health and load messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..protocol.codec import message, record

__all__ = [
    "CHECKSUM_SIZE",
    "GetTableSnapshot",
    "Heartbeat",
    "PortionSum",
    "RequestAllotment",
    "SendTableSnapshot",
    "Subscribe",
    "TableRow",
    "TokenAllotment",
    "TokenEntry",
]

CHECKSUM_SIZE = 16
"""Bytes of a table or portion checksum (BLAKE2b digest size)."""


def _fraction(value: float, name: str, unknown_ok: bool = False) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} is not finite")
    if unknown_ok and value == -1.0:
        return
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} {value} outside 0..1")


@record
@dataclass(frozen=True, slots=True)
class TableRow:
    """One application endpoint's row in a host's health/load table.

    ``app_load`` is what the application itself reports (0..1), or -1 when it
    reports nothing. ``weight`` is the endpoint's pool weight as the host
    publishes it (0 drains it).
    """

    app: str
    up: bool
    active_connections: int
    cpu: float
    app_load: float
    weight: int

    def __post_init__(self) -> None:
        if not self.app:
            raise ValueError("empty application name")
        if not 0 <= self.active_connections < 2**32:
            raise ValueError(f"active_connections {self.active_connections}")
        if not 0 <= self.weight <= 1000:
            raise ValueError(f"weight {self.weight}")
        _fraction(self.cpu, "cpu")
        _fraction(self.app_load, "app_load", unknown_ok=True)


@record
@dataclass(frozen=True, slots=True)
class PortionSum:
    """The checksum of one portion (one application's row) of a host's table."""

    portion: str
    checksum: bytes

    def __post_init__(self) -> None:
        if len(self.checksum) != CHECKSUM_SIZE:
            raise ValueError(f"checksum of {len(self.checksum)} bytes")


@record
@dataclass(frozen=True, slots=True)
class TokenEntry:
    """Tokens for one destination endpoint (a host of the allotment's application)."""

    host: str
    tokens: int

    def __post_init__(self) -> None:
        if not 0 <= self.tokens <= 1_000_000:
            raise ValueError(f"tokens {self.tokens}")


@message(96)
@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Agent -> handler: the host is alive, and this is what its table holds.

    ``checksum`` covers the whole table, ``portions`` each application's row
    (the content indicator of claims 67, 71-73). ``version`` grows by one on
    every change of the table and restarts from 0 when the agent restarts.
    """

    host: str
    version: int
    checksum: bytes
    portions: list[PortionSum]

    def __post_init__(self) -> None:
        if len(self.checksum) != CHECKSUM_SIZE or self.version < 0:
            raise ValueError("bad heartbeat")


@message(97)
@dataclass(frozen=True, slots=True)
class GetTableSnapshot:
    """Handler -> agent: send these portions of your table; an empty list asks for all."""

    req_id: int
    portions: list[str]


@message(98)
@dataclass(frozen=True, slots=True)
class SendTableSnapshot:
    """Agent -> handler: the rows asked for by ``req_id``, as of table ``version``.

    A requested portion the host does not have is left out; for a whole-table
    request the rows are the entire table.
    """

    req_id: int
    host: str
    version: int
    rows: list[TableRow]


@message(99)
@dataclass(frozen=True, slots=True)
class Subscribe:
    """Classifier or request router -> handler: send me allotments for ``apps``.

    An empty list means every application. The handler answers with one
    ``TokenAllotment`` per application at once (or, while it is still
    rebuilding its cache after a start, as soon as it has), and again whenever
    the health of an application's endpoints changes.
    """

    node: str
    apps: list[str]


@message(100)
@dataclass(frozen=True, slots=True)
class RequestAllotment:
    """Classifier -> handler: a fresh allotment for ``app``, please.

    ``allotment_id_spent`` names the allotment that is running out (0: none yet).
    """

    app: str
    allotment_id_spent: int


@message(101)
@dataclass(frozen=True, slots=True)
class TokenAllotment:
    """Handler -> classifier: spend one token per new flow of ``app``.

    Valid for ``ttl`` seconds after it arrives. ``allotment_id`` increases with
    each allotment ``source`` (the handler's name) issues. Hosts with 0 tokens
    are down or not yet known.
    """

    app: str
    allotment_id: int
    entries: list[TokenEntry]
    ttl: float
    source: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ttl) and self.ttl > 0) or self.allotment_id < 0:
            raise ValueError("bad allotment")
