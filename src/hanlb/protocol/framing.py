"""Frames: the one envelope every control message travels in.

::

    offset size  field
    0      2     magic   b"HL"
    2      1     version 1
    3      1     type    message type code (see messages.py)
    4      4     length  body length in bytes, big endian, <= MAX_BODY
    8      N     body    msgpack array of the message's fields
    8+N    32    mac     HMAC-SHA256(cluster key, bytes 0 .. 8+N)

Errors (all ``ProtocolError`` with a wire ``code``):

- ``BAD_MAGIC``, ``BAD_VERSION``, ``TOO_LARGE``: the stream cannot be trusted to
  stay in step; the decoder raises and the connection must be closed.
- ``BAD_MAC``, ``BAD_TYPE``, ``BAD_BODY``: the frame is whole but unusable; the
  decoder hands back a ``Rejected`` event, the caller counts it, and the stream
  goes on with the next frame.

Decoding never raises anything but ``ProtocolError``, whatever bytes it is fed,
whole or one byte at a time.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "HEADER",
    "MAC_LEN",
    "MAGIC",
    "MAX_BODY",
    "VERSION",
    "ErrorCode",
    "FrameDecoder",
    "ProtocolError",
    "RawFrame",
    "Rejected",
    "encode_frame",
]

MAGIC: Final = b"HL"
VERSION: Final = 1
HEADER: Final = struct.Struct("!2sBBI")
MAC_LEN: Final = 32
MAX_BODY: Final = 8 * 1024 * 1024


class ErrorCode(enum.IntEnum):
    BAD_MAGIC = 1
    BAD_VERSION = 2
    TOO_LARGE = 3
    BAD_MAC = 4
    BAD_TYPE = 5
    BAD_BODY = 6


class ProtocolError(Exception):
    """A frame or message could not be decoded. ``code`` is its ErrorCode.

    Not raised for a frame that is merely incomplete: the decoder waits for more.
    """

    def __init__(self, code: ErrorCode, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code.name}: {detail}" if detail else code.name)


@dataclass(frozen=True, slots=True)
class RawFrame:
    type: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """A whole frame was dropped; the stream continues."""

    code: ErrorCode
    detail: str = ""


def encode_frame(key: bytes, msg_type: int, body: bytes) -> bytes:
    if len(body) > MAX_BODY:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(body)} bytes")
    head = HEADER.pack(MAGIC, VERSION, msg_type, len(body))
    mac = hmac.new(key, head + body, hashlib.sha256).digest()
    return head + body + mac


class FrameDecoder:
    """Sans-I/O frame reader: ``receive_data`` bytes, then ``next_frame`` until None."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> RawFrame | Rejected | None:
        buf = self._buf
        if len(buf) < HEADER.size:
            # Check what we can early so garbage is refused before 8 bytes arrive.
            if buf[:2] and bytes(buf[:2]) != MAGIC[: len(buf[:2])]:
                raise ProtocolError(ErrorCode.BAD_MAGIC)
            return None
        magic, version, msg_type, length = HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise ProtocolError(ErrorCode.BAD_MAGIC)
        if version != VERSION:
            raise ProtocolError(ErrorCode.BAD_VERSION, f"version {version}")
        if length > MAX_BODY:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{length} bytes")
        end = HEADER.size + length + MAC_LEN
        if len(buf) < end:
            return None
        signed = bytes(buf[: HEADER.size + length])
        mac = bytes(buf[HEADER.size + length : end])
        del buf[:end]
        want = hmac.new(self._key, signed, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, want):
            return Rejected(ErrorCode.BAD_MAC, f"type {msg_type}")
        return RawFrame(msg_type, signed[HEADER.size :])
