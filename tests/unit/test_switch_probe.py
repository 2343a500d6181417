"""The forwarder's probe responder: answers signed Pings, drops and counts the rest."""

from __future__ import annotations

import asyncio
from collections import Counter

from hanlb.forwarder.probe import answer_probe, start_probe_responder
from hanlb.protocol.codec import decode_body, encode_body, type_code
from hanlb.protocol.framing import FrameDecoder, RawFrame, encode_frame
from hanlb.protocol.messages import Ping, Pong

KEY = b"k" * 16


def frame(msg: object, key: bytes = KEY) -> bytes:
    return encode_frame(key, type_code(msg), encode_body(msg))


def decode(data: bytes) -> object:
    dec = FrameDecoder(KEY)
    dec.receive_data(data)
    raw = dec.next_frame()
    assert isinstance(raw, RawFrame)
    return decode_body(raw.type, raw.body)


def test_ping_is_answered() -> None:
    counters: Counter[str] = Counter()
    out = answer_probe(frame(Ping(7, 1.5)), KEY, counters)
    assert out is not None
    assert decode(out) == Pong(7, 1.5)
    assert counters == {"probe_pings": 1}


def test_bad_datagrams_are_dropped_and_counted() -> None:
    counters: Counter[str] = Counter()
    ping = frame(Ping(1, 0.0))
    assert answer_probe(frame(Ping(1, 0.0), key=b"x" * 16), KEY, counters) is None
    assert answer_probe(ping[:-1], KEY, counters) is None
    assert answer_probe(ping + ping, KEY, counters) is None
    assert answer_probe(b"garbage!" * 8, KEY, counters) is None
    assert answer_probe(b"", KEY, counters) is None
    assert answer_probe(frame(Pong(1, 0.0)), KEY, counters) is None
    assert answer_probe(encode_frame(KEY, 250, b"\x90"), KEY, counters) is None
    assert counters == {
        "probe_bad_mac": 1,
        "probe_bad_frame": 4,
        "probe_not_ping": 1,
        "probe_bad_body": 1,
    }


def test_responder_over_udp() -> None:
    async def main() -> None:
        counters: Counter[str] = Counter()
        server = await start_probe_responder("127.0.0.1", 0, KEY, counters)
        port = server.get_extra_info("sockname")[1]
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                got.set_result(data)

        client, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
        client.sendto(b"junk")
        client.sendto(frame(Ping(3, 2.0)))
        assert decode(await asyncio.wait_for(got, 2)) == Pong(3, 2.0)
        client.close()
        server.close()
        assert counters == {"probe_bad_frame": 1, "probe_pings": 1, "probe_pongs": 1}

    asyncio.run(main())
