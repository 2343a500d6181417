"""The forwarder's answer to the LB-aware switch's liveness probes.

Each UDP datagram holds exactly one frame (``hanlb.protocol.framing``) signed
with the cluster key and carrying ``Ping(seq, sent)``; the responder sends
``Pong(seq, sent)`` back to the datagram's source. Anything else is dropped and
counted in the ``Counter`` it was given:

- ``probe_pings`` / ``probe_pongs``: answered probes;
- ``probe_bad_frame``: not a whole frame, trailing bytes, bad magic/version/size;
- ``probe_bad_mac``: the frame does not authenticate under the cluster key;
- ``probe_bad_body``: unknown type or undecodable body;
- ``probe_not_ping``: a valid message that is not a ``Ping``;
- ``probe_send_errors``: the answer could not be sent.

Run on its own (the lab does, inside a forwarder's namespace)::

    python -m hanlb.forwarder.probe --listen 10.0.0.11:7401 --key-file /run/hanlb/key
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections import Counter
from pathlib import Path
from typing import cast

from ..protocol.codec import decode_body, encode_body, type_code
from ..protocol.framing import ErrorCode, FrameDecoder, ProtocolError, Rejected, encode_frame
from ..protocol.messages import Ping, Pong

__all__ = ["ProbeResponder", "answer_probe", "start_probe_responder"]

log = logging.getLogger("hanlb.forwarder.probe")

_PONG = type_code(Pong(0, 0.0))


def answer_probe(datagram: bytes, key: bytes, counters: Counter[str]) -> bytes | None:
    """The Pong datagram answering ``datagram``, or None (counted) if it is dropped."""
    decoder = FrameDecoder(key)
    decoder.receive_data(datagram)
    try:
        frame = decoder.next_frame()
        if frame is not None and decoder.next_frame() is not None:
            frame = None  # two frames in one datagram: not a probe
    except ProtocolError:
        frame = None
    if frame is None:
        counters["probe_bad_frame"] += 1
        return None
    if isinstance(frame, Rejected):
        counters["probe_bad_mac" if frame.code is ErrorCode.BAD_MAC else "probe_bad_body"] += 1
        return None
    try:
        msg = decode_body(frame.type, frame.body)
    except ProtocolError:
        counters["probe_bad_body"] += 1
        return None
    if not isinstance(msg, Ping):
        counters["probe_not_ping"] += 1
        return None
    counters["probe_pings"] += 1
    return encode_frame(key, _PONG, encode_body(Pong(msg.seq, msg.sent)))


class ProbeResponder(asyncio.DatagramProtocol):
    def __init__(self, key: bytes, counters: Counter[str]) -> None:
        self.key = key
        self.counters = counters
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        answer = answer_probe(data, self.key, self.counters)
        if answer is None or self.transport is None:
            return
        try:
            self.transport.sendto(answer, addr)
        except OSError:
            self.counters["probe_send_errors"] += 1
            return
        self.counters["probe_pongs"] += 1

    def error_received(self, exc: Exception) -> None:
        self.counters["probe_send_errors"] += 1


async def start_probe_responder(
    host: str, port: int, key: bytes, counters: Counter[str]
) -> asyncio.DatagramTransport:
    """Answer probes on UDP ``host:port`` until the returned transport is closed."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: ProbeResponder(key, counters), local_addr=(host, port)
    )
    return transport


async def _serve(host: str, port: int, key: bytes) -> None:
    counters: Counter[str] = Counter()
    transport = await start_probe_responder(host, port, key, counters)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("answering probes on %s:%d", host, port)
    try:
        await stop.wait()
    finally:
        transport.close()
        log.info("probe responder stopped: %s", dict(counters))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Answer the LB-aware switch's probes.")
    parser.add_argument("--listen", required=True, metavar="ADDRESS:PORT")
    parser.add_argument("--key-file", required=True, type=Path)
    args = parser.parse_args(argv)
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        parser.error(f"--listen {args.listen!r} is not ADDRESS:PORT")
    key = args.key_file.read_bytes().strip()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(host, int(port), key))


if __name__ == "__main__":
    main()
