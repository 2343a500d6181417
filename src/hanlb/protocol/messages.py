"""Every control message, with its wire type code. Documented in docs/protocol.md.

Codes 1-31: session and liveness. 32-63: route plumbing (claims 21-23).
Codes from 64 on are left to the session tracker, health and load, and the
request router.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..flow import FlowKey
from .codec import decode_body, encode_body, message, record, type_code
from .framing import (
    ErrorCode,
    FrameDecoder,
    ProtocolError,
    RawFrame,
    Rejected,
    encode_frame,
)

__all__ = [
    "AddRoutes",
    "ClassifyBatch",
    "Connection",
    "DeleteRoutes",
    "DropRoute",
    "DropRoutes",
    "DumpRoutes",
    "Hello",
    "Miss",
    "Ping",
    "Pong",
    "Route",
    "RouteDump",
    "RoutesRemoved",
]


_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")

# -- session and liveness ----------------------------------------------------


@message(1)
@dataclass(frozen=True, slots=True)
class Hello:
    """First message on a connection: who is speaking."""

    node: str
    role: str
    incarnation: int
    """Changes each time the node restarts, so a peer can tell a restart."""


@message(2)
@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    sent: float


@message(3)
@dataclass(frozen=True, slots=True)
class Pong:
    seq: int
    sent: float


# -- route plumbing ----------------------------------------------------------


@record
@dataclass(frozen=True, slots=True)
class Miss:
    """A packet that missed the forwarder's local route table."""

    flow: FlowKey
    tcp_flags: int
    head: bytes
    """The first bytes of the IP packet (at most 128), for policy checks."""

    def __post_init__(self) -> None:
        if not 0 <= self.tcp_flags < 256 or len(self.head) > 128:
            raise ValueError("bad miss")


@record
@dataclass(frozen=True, slots=True)
class Route:
    flow: FlowKey
    host: str
    mac: str

    def __post_init__(self) -> None:
        if not _MAC.fullmatch(self.mac):
            raise ValueError(f"bad mac {self.mac!r}")


@record
@dataclass(frozen=True, slots=True)
class DropRoute:
    flow: FlowKey
    ttl: float


@message(32)
@dataclass(frozen=True, slots=True)
class ClassifyBatch:
    """Forwarder -> classifier: new flows (table misses), batched."""

    misses: list[Miss]


@message(33)
@dataclass(frozen=True, slots=True)
class AddRoutes:
    """Classifier -> forwarder: install these routes, then send held packets."""

    routes: list[Route]


@message(34)
@dataclass(frozen=True, slots=True)
class DeleteRoutes:
    """Classifier -> forwarder: remove these routes now."""

    flows: list[FlowKey]


@message(35)
@dataclass(frozen=True, slots=True)
class DropRoutes:
    """Classifier -> forwarder: drop these flows' packets in the datapath for ttl s."""

    drops: list[DropRoute]


@message(36)
@dataclass(frozen=True, slots=True)
class RoutesRemoved:
    """Forwarder -> classifier: routes it deleted (reason: closed, idle, deleted, dropped)."""

    flows: list[FlowKey]
    reason: str


@message(37)
@dataclass(frozen=True, slots=True)
class DumpRoutes:
    """Ask for the whole route table (audit or rebuild)."""

    req_id: int


@message(38)
@dataclass(frozen=True, slots=True)
class RouteDump:
    req_id: int
    routes: list[Route]
    drops: list[DropRoute]


# -- a connection ------------------------------------------------------------


class Connection:
    """Sans-I/O message stream over any byte transport.

    ``receive_data(bytes)`` returns the messages and ``Rejected`` events it
    completed; it raises ``ProtocolError`` only when the stream is beyond repair
    (the caller then closes the transport). ``send(msg)`` returns bytes to write.
    Rejected frames are counted in ``rejected``, by error code.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._decoder = FrameDecoder(key)
        self._error: ProtocolError | None = None
        self.rejected: dict[ErrorCode, int] = {}

    @property
    def failed(self) -> ProtocolError | None:
        """The stream error waiting to be raised, if any."""
        return self._error

    def send(self, msg: object) -> bytes:
        return encode_frame(self._key, type_code(msg), encode_body(msg))

    def receive_data(self, data: bytes) -> list[Any]:
        """Events completed by ``data``. A stream error that follows good frames
        in the same read is raised on the next call, after they are handed out."""
        if self._error is not None:
            raise self._error
        self._decoder.receive_data(data)
        out: list[Any] = []
        while True:
            try:
                frame = self._decoder.next_frame()
            except ProtocolError as exc:
                if not out:
                    raise
                self._error = exc
                return out
            if frame is None:
                return out
            if isinstance(frame, RawFrame):
                try:
                    out.append(decode_body(frame.type, frame.body))
                    continue
                except ProtocolError as exc:
                    frame = Rejected(exc.code, exc.detail)
            self.rejected[frame.code] = self.rejected.get(frame.code, 0) + 1
            out.append(frame)
