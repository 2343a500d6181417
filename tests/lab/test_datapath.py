"""Kernel and userspace datapaths on a real veth pair in a private netns.

``lan0`` is the forwarder's side, ``peer0`` stands for the switch/LAN: test
frames are written on peer0 with an AF_PACKET socket and whatever the datapath
sends out of lan0 is read back there. The datapath runs in a thread that has
entered the namespace (setns is per thread), with its own asyncio loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from hanlb.flow import ACK, FIN, RST, SYN, TCP, FlowKey, parse_frame, tcp_checksum_fix
from hanlb.forwarder.datapath import Datapath
from hanlb.forwarder.kernel import KernelDatapath
from hanlb.forwarder.nft import Nft, NftError
from hanlb.forwarder.tap import interface_mac
from hanlb.forwarder.userspace import UserspaceDatapath

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
VIP = "10.93.0.1"
CLIENT_MAC = bytes.fromhex("02aa00000001")
HOST_MAC = bytes.fromhex("02bb00000001")
HOST2_MAC = bytes.fromhex("02bb00000002")
QUIET = 0.3


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"t-dp-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        ns = ("ip", "netns", "exec", name)
        sh(*ns, "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "peer0")
        for dev in ("lan0", "peer0"):
            sh(*ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
            sh(*ns, "ip", "link", "set", dev, "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def run_in_netns(ns: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main()`` on a fresh event loop in a thread inside netns ``ns``."""
    errors: list[BaseException] = []
    libc = ctypes.CDLL(None, use_errno=True)

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            asyncio.run(main())
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target, name=f"netns-{ns}")
    t.start()
    t.join(180)
    assert not t.is_alive(), "netns thread hung"
    if errors:
        raise errors[0]


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def make_frame(flow: FlowKey, flags: int, dst_mac: bytes, payload: bytes = b"0123456789") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", flow.sport, flow.dport, 1000, 0, 5 << 4, flags, 65535, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(tcp) + len(payload),
        1,
        0x4000,
        64,
        TCP,
        0,
        socket.inet_aton(flow.src),
        socket.inet_aton(flow.dst),
    )
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    frame = dst_mac + CLIENT_MAC + b"\x08\x00" + ip + tcp + payload
    return tcp_checksum_fix(frame)


def flow(sport: int, dst: str = VIP, dport: int = 80, src: str = "10.1.0.5") -> FlowKey:
    return FlowKey(TCP, src, sport, dst, dport)


class Peer:
    """The far side of the veth: inject frames into lan0, read what lan0 sends."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("peer0", ETH_P_ALL))
        self.sock.setblocking(False)

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    async def recv(self, timeout: float = 1.0) -> bytes | None:
        """Next IPv4 frame received on peer0 (not one it sent), or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                data, addr = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 65600), left)
            except TimeoutError:
                return None
            if addr[2] != PACKET_OUTGOING and data[12:14] == b"\x08\x00":
                return data
        return None

    def close(self) -> None:
        self.sock.close()


class Inbox:
    """What the datapath delivered to the core."""

    def __init__(self) -> None:
        self.q: asyncio.Queue[bytes] = asyncio.Queue()

    def deliver(self, frame: bytes) -> None:
        self.q.put_nowait(frame)

    async def get(self, timeout: float = 1.0) -> bytes | None:
        try:
            return await asyncio.wait_for(self.q.get(), timeout)
        except TimeoutError:
            return None


def tables() -> list[str]:
    with Nft() as nft:
        return [str(i["table"]["name"]) for i in nft.json("list tables") if "table" in i]


def link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def checksum_ok(frame: bytes) -> bool:
    return tcp_checksum_fix(frame) == frame


# -- kernel ------------------------------------------------------------------


@pytest.mark.lab
def test_kernel_miss_hit_close_remove_drop(netns: str) -> None:
    async def main() -> None:
        own = interface_mac("lan0")
        dp = KernelDatapath("lan0")
        inbox = Inbox()
        peer = Peer()
        try:
            dp.open(inbox.deliver, [(VIP, 80), ("10.93.0.2", 443)], own)
            assert dp.fast_path
            assert "hanlb" in tables()
            assert link_exists("hlmiss0")
            a = flow(40001)

            # A miss reaches the core unchanged, and is not forwarded.
            syn = make_frame(a, SYN, own)
            peer.send(syn)
            assert await inbox.get() == syn
            assert await peer.recv(QUIET) is None

            # A hit is rewritten and forwarded in the kernel; the core sees nothing.
            dp.install([(a, HOST_MAC)])
            ack = make_frame(a, ACK, own)
            peer.send(ack)
            out = await peer.recv()
            assert out == HOST_MAC + own + ack[12:]
            assert await inbox.get(QUIET) is None

            # FIN of a routed flow: forwarded and a rewritten copy delivered.
            fin = make_frame(a, FIN | ACK, own)
            peer.send(fin)
            assert await peer.recv() == HOST_MAC + own + fin[12:]
            copy = await inbox.get()
            assert copy == HOST_MAC + own + fin[12:]
            rst = make_frame(a, RST, own)
            peer.send(rst)
            assert await peer.recv() == HOST_MAC + own + rst[12:]
            assert await inbox.get() == HOST_MAC + own + rst[12:]

            # Non-VIP frames are neither delivered nor forwarded.
            for other in (flow(40002, dport=81), flow(40003, dst="10.93.0.3")):
                peer.send(make_frame(other, SYN, own))
            peer.send(b"\xff" * 6 + CLIENT_MAC + b"\x08\x06" + b"\0" * 28)
            assert await inbox.get(QUIET) is None
            assert await peer.recv(QUIET) is None

            # The second VIP works too.
            b = flow(40005, dst="10.93.0.2", dport=443)
            peer.send(make_frame(b, SYN, own))
            delivered = await inbox.get()
            assert delivered is not None and parse_frame(delivered).flow == b

            counts = dp.packet_counts()
            assert counts == {a: 3}
            stats = dp.stats()
            assert stats["forwarded"] == 3 and stats["closes"] == 2 and stats["hits"] == 1
            assert stats["misses"] == 2 and stats["drops"] == 0

            # Re-install with the same MAC is a no-op; another MAC replaces.
            dp.install([(a, HOST_MAC)])
            dp.install([(a, HOST2_MAC)])
            peer.send(ack)
            assert await peer.recv() == HOST2_MAC + own + ack[12:]

            # remove() brings miss behaviour back; removing absent flows is fine.
            dp.remove([a, a, flow(1)])
            dp.remove([a])
            peer.send(syn)
            assert await inbox.get() == syn
            assert await peer.recv(QUIET) is None
            assert dp.packet_counts() == {}

            # Drops drop until the ttl runs out (the core deletes a flow's route
            # before it drops the flow: a flow is never in both).
            dp.install_drops([(a, 30.0), (b, 0.5)])
            peer.send(ack)
            peer.send(make_frame(b, ACK, own))
            assert await inbox.get(QUIET) is None
            assert await peer.recv(QUIET) is None
            assert dp.stats()["drops"] == 2
            await asyncio.sleep(0.6)
            peer.send(make_frame(b, ACK, own))
            delivered = await inbox.get()
            assert delivered is not None and parse_frame(delivered).flow == b
            # A route lifts a standing drop; lifting an expired one is harmless.
            dp.lift_drops([a, b])
            dp.install([(a, HOST_MAC)])
            peer.send(ack)
            assert await peer.recv() == HOST_MAC + own + ack[12:]
            assert dp.stats()["drops"] == 2

            # transmit() sends out of lan0.
            dp.transmit(HOST_MAC + own + syn[12:])
            assert await peer.recv() == HOST_MAC + own + syn[12:]
            assert dp.stats()["transmitted"] == 1
        finally:
            peer.close()
            dp.close()
        assert "hanlb" not in tables()
        assert not link_exists("hlmiss0")
        await asyncio.sleep(0.1)
        assert not link_exists("hlmiss0")

    run_in_netns(netns, main)


@pytest.mark.lab
def test_kernel_big_batches_and_stale_table(netns: str) -> None:
    async def main() -> None:
        own = interface_mac("lan0")
        # A table left by a crashed run is replaced atomically.
        with Nft() as nft:
            nft.run("table netdev hanlb { set junk { type ipv4_addr; }; }")
        dp = KernelDatapath("lan0", chunk=2000)
        inbox = Inbox()
        try:
            dp.open(inbox.deliver, [(VIP, 80)], own)
            with Nft() as nft, pytest.raises(NftError):
                nft.run("list set netdev hanlb junk")
            routes = [
                (flow(1024 + i % 60000, src=f"10.2.{i // 60000}.{1 + i % 250}"), HOST_MAC)
                for i in range(5000)
            ]
            dp.install(routes)
            counts = dp.packet_counts()
            assert counts is not None and len(counts) == 5000
            # Half replaced (delete + add in one transaction), half unchanged.
            dp.install([(f, HOST2_MAC) for f, _ in routes[:2500]] + routes[2500:])
            assert len(dp.packet_counts() or {}) == 5000
            dp.remove([f for f, _ in routes])
            assert dp.packet_counts() == {}
            assert dp.stats()["routes"] == 0
        finally:
            dp.close()

    run_in_netns(netns, main)


def offloaded_syn_reaches_core(netns: str, dp: Datapath) -> None:
    """A local client's SYN to the VIP (veth leaves its TCP checksum to
    offload) reaches the core through ``dp`` with a valid checksum."""

    async def main() -> None:
        own = interface_mac("lan0")
        sh("ip", "addr", "add", "10.1.0.5/24", "dev", "peer0")
        sh("ip", "route", "add", f"{VIP}/32", "dev", "peer0")
        sh("ip", "neigh", "add", VIP, "lladdr", own.hex(":"), "dev", "peer0")
        inbox = Inbox()
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            dp.open(inbox.deliver, [(VIP, 80)], own)
            client.setblocking(False)
            client.connect_ex((VIP, 80))
            frame = await inbox.get(2.0)
            assert frame is not None
            assert parse_frame(frame).flags & SYN
            assert checksum_ok(frame)
        finally:
            client.close()
            dp.close()

    run_in_netns(netns, main)


@pytest.mark.lab
def test_kernel_offloaded_checksum_reaches_core_valid(netns: str) -> None:
    offloaded_syn_reaches_core(netns, KernelDatapath("lan0"))


# -- userspace ---------------------------------------------------------------


@pytest.mark.lab
def test_userspace_deliver_transmit_drop(netns: str) -> None:
    async def main() -> None:
        own = interface_mac("lan0")
        dp = UserspaceDatapath("lan0")
        inbox = Inbox()
        peer = Peer()
        try:
            dp.open(inbox.deliver, [(VIP, 80), ("10.93.0.2", 443)], own)
            assert not dp.fast_path
            a, b = flow(40001), flow(40005, dst="10.93.0.2", dport=443)

            syn = make_frame(a, SYN, own)
            peer.send(syn)
            assert await inbox.get() == syn
            peer.send(make_frame(b, SYN, own))
            delivered = await inbox.get()
            assert delivered is not None and parse_frame(delivered).flow == b

            # Non-VIP and frames not addressed to us are not delivered.
            peer.send(make_frame(flow(40002, dport=81), SYN, own))
            peer.send(make_frame(flow(40003, dst="10.93.0.3"), SYN, own))
            peer.send(make_frame(a, SYN, HOST_MAC))
            peer.send(b"\xff" * 6 + CLIENT_MAC + b"\x08\x06" + b"\0" * 28)
            assert await inbox.get(QUIET) is None

            # Routes are the core's business here: every VIP frame is delivered.
            dp.install([(a, HOST_MAC)])
            fin = make_frame(a, FIN | ACK, own)
            peer.send(fin)
            assert await inbox.get() == fin
            dp.remove([a, flow(1)])
            assert dp.packet_counts() is None

            # transmit() sends out of lan0, and our own sends are not delivered.
            dp.transmit(HOST_MAC + own + fin[12:])
            assert await peer.recv() == HOST_MAC + own + fin[12:]
            assert await inbox.get(QUIET) is None

            # Drops until the ttl runs out.
            dp.install_drops([(a, 0.5), (b, 30.0)])
            ack = make_frame(a, ACK, own)
            peer.send(ack)
            peer.send(make_frame(b, ACK, own))
            assert await inbox.get(QUIET) is None
            assert dp.stats()["drops"] == 2
            await asyncio.sleep(0.5)
            peer.send(ack)
            assert await inbox.get() == ack
            dp.lift_drops([b])
            ack_b = make_frame(b, ACK, own)
            peer.send(ack_b)
            assert await inbox.get() == ack_b
            stats = dp.stats()
            assert stats["transmitted"] == 1 and stats["delivered"] == 5
        finally:
            peer.close()
            dp.close()

    run_in_netns(netns, main)


@pytest.mark.lab
def test_userspace_offloaded_checksum_is_fixed(netns: str) -> None:
    dp = UserspaceDatapath("lan0")
    offloaded_syn_reaches_core(netns, dp)
    assert dp.stats()["csum_fixed"] >= 1


@pytest.mark.lab
def test_run_in_netns_reports_errors() -> None:
    async def boom() -> None:
        raise ValueError("boom")

    start = time.monotonic()
    with pytest.raises((ValueError, OSError)):
        run_in_netns("t-dp-does-not-exist", boom)
    assert time.monotonic() - start < 10
