"""The LB-aware switch process: probes forwarders, keeps ECMP over the live ones.

Runs in the router's network namespace. Every ``switch.probe_interval`` it sends
each forwarder a UDP datagram holding one signed frame with ``Ping(seq, sent)``
to ``(forwarder.address, forwarder.probe_port)``; the forwarder's
``ProbeResponder`` answers ``Pong(seq, sent)``. A ``FailureDetector`` turns the
answers (and their absence) into ``PeerSuspected`` / ``PeerRecovered``, and the
service applies the live set to an ``EcmpTable``: the VIP routes' next-hop
group then holds exactly the live forwarders.

Table updates go through one task, so they are applied in order and a burst of
changes becomes one group replacement. If the kernel refuses an update the
task retries every ``timers.reconnect_interval`` until it succeeds.

Each change is logged with the measured detection time (from the last reply,
or from start for a forwarder never heard) and the removal time (until the
kernel had the new group). ``/status`` shows each forwarder; ``/metrics`` the
counters:

- ``probes_sent``, ``probe_send_errors``, ``pongs``;
- ``pongs_stale`` (unknown or late sequence), ``pongs_unknown_source``,
  ``pongs_bad`` (not a frame, bad MAC, bad body, not a Pong);
- ``removals``, ``restorations``, ``ecmp_updates``, ``ecmp_errors``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

from ..admin import AdminServer, CountersCollector
from ..config import ClusterConfig
from ..protocol.codec import decode_body, encode_body, type_code
from ..protocol.framing import FrameDecoder, ProtocolError, RawFrame, encode_frame
from ..protocol.messages import Ping, Pong
from .detector import FailureDetector, PeerRecovered, PeerSuspected
from .ecmp import EcmpError, EcmpTable

__all__ = ["SwitchService"]

log = logging.getLogger("hanlb.switch")

_PING = type_code(Ping(0, 0.0))


@dataclass(slots=True)
class _Change:
    """A liveness change waiting to reach the kernel, for the removal-time log."""

    name: str
    live: bool
    since: float
    """Last reply (removal) or the change itself (restoration)."""


class _ProbeSocket(asyncio.DatagramProtocol):
    def __init__(self, service: SwitchService) -> None:
        self.service = service

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.service._on_datagram(data, (str(addr[0]), int(str(addr[1]))))

    def error_received(self, exc: Exception) -> None:
        self.service.counters["probe_send_errors"] += 1


class SwitchService:
    def __init__(self, config: ClusterConfig, table: EcmpTable | None = None) -> None:
        if not config.forwarders:
            raise ValueError("the switch needs at least one forwarder")
        self.config = config
        self.settings = config.switch
        self.name = config.switch.name
        self.key = config.key_bytes
        self.peers = {(f.address, f.probe_port): f.name for f in config.forwarders}
        self.table = table or EcmpTable(
            self.settings.interface,
            [a.vip for a in config.applications],
            {f.name: f.address for f in config.forwarders},
            self.settings.resilient_buckets,
        )
        self.counters: Counter[str] = Counter()
        self.detector: FailureDetector
        self.detection_times: dict[str, float] = {}
        self.removal_times: dict[str, float] = {}
        self._started = 0.0
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._dirty = asyncio.Event()
        self._pending: list[_Change] = []
        self._stopping = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        now = loop.time()
        self._started = now
        self.detector = FailureDetector(s.probe_interval, s.probe_misses, s.rise, now)
        for f in self.config.forwarders:
            self.detector.add_peer(f.name, now)
        await self.table.open(self.detector.live_peers())
        admin = AdminServer(self.config.cluster.run_dir, self.name)
        admin.routes["/status"] = self.status
        admin.registry.register(
            CountersCollector(
                "hanlb_switch",
                self.name,
                lambda: dict(self.counters),
                lambda: {
                    "live_forwarders": float(len(self.table.live)),
                    "forwarders": float(len(self.peers)),
                },
            )
        )
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _ProbeSocket(self), local_addr=("0.0.0.0", 0)
        )
        self._transport = transport
        await admin.start()
        updater = asyncio.create_task(self._update_table())
        log.info(
            "switch %s up: %d forwarders, ECMP mode %s on %s",
            self.name,
            len(self.peers),
            self.table.mode,
            s.interface,
        )
        self._on_timer()
        try:
            await self._stopping.wait()
        finally:
            if self._timer:
                self._timer.cancel()
            updater.cancel()
            await asyncio.gather(updater, return_exceptions=True)
            transport.close()
            admin.close()
            await self.table.close()
            log.info("switch %s stopped", self.name)

    def stop(self) -> None:
        self._stopping.set()

    def status(self) -> dict[str, object]:
        now = asyncio.get_running_loop().time()
        forwarders: dict[str, object] = {}
        for f in self.config.forwarders:
            v = self.detector.view(f.name)
            forwarders[f.name] = {
                "address": f.address,
                "state": "live" if v.live else "suspected",
                "detector_state": v.state.value,
                "in_ecmp": f.name in self.table.live,
                "last_reply_age": None if v.last_reply is None else round(now - v.last_reply, 4),
                "rtt": None if v.last_rtt is None else round(v.last_rtt, 6),
                "removals": v.suspicions,
                "restorations": v.recoveries,
                "last_detection_time": self.detection_times.get(f.name),
                "last_removal_time": self.removal_times.get(f.name),
            }
        return {
            "role": "switch",
            "name": self.name,
            "interface": self.settings.interface,
            "ecmp_mode": self.table.mode,
            "vips": self.table.vips,
            "live": sorted(self.table.live),
            "probe_interval": self.settings.probe_interval,
            "probe_misses": self.settings.probe_misses,
            "rise": self.settings.rise,
            "forwarders": forwarders,
            "counters": dict(self.counters),
        }

    # -- probes ----------------------------------------------------------------

    def _on_timer(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        det = self.detector
        det.handle_timer(now)
        while (event := det.next_event()) is not None:
            self._on_event(event, now)
        addresses = {f.name: (f.address, f.probe_port) for f in self.config.forwarders}
        for name, seq in det.probes_due(now):
            frame = encode_frame(self.key, _PING, encode_body(Ping(seq, now)))
            try:
                if self._transport is not None:
                    self._transport.sendto(frame, addresses[name])
                    self.counters["probes_sent"] += 1
            except OSError:
                self.counters["probe_send_errors"] += 1
        timer = det.get_timer()
        if timer is not None:
            self._timer = loop.call_at(max(timer, now), self._on_timer)

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        name = self.peers.get(addr)
        if name is None:
            self.counters["pongs_unknown_source"] += 1
            return
        decoder = FrameDecoder(self.key)
        decoder.receive_data(data)
        try:
            frame = decoder.next_frame()
            msg = decode_body(frame.type, frame.body) if isinstance(frame, RawFrame) else None
        except ProtocolError:
            msg = None
        if not isinstance(msg, Pong):
            self.counters["pongs_bad"] += 1
            return
        self.counters["pongs"] += 1
        if not self.detector.on_reply(name, msg.seq, asyncio.get_running_loop().time()):
            self.counters["pongs_stale"] += 1

    # -- ECMP ------------------------------------------------------------------

    def _on_event(self, event: PeerSuspected | PeerRecovered, now: float) -> None:
        view = self.detector.view(event.name)
        if isinstance(event, PeerSuspected):
            since = view.last_reply if view.last_reply is not None else self._started
            self.detection_times[event.name] = round(now - since, 4)
            self.counters["removals"] += 1
            log.warning(
                "forwarder %s suspected: no reply for %.3f s (%d probes of %.3f s missed)",
                event.name,
                now - since,
                self.settings.probe_misses,
                self.settings.probe_interval,
            )
            self._pending.append(_Change(event.name, False, since))
        else:
            self.counters["restorations"] += 1
            log.warning(
                "forwarder %s recovered: %d probes answered in a row",
                event.name,
                self.settings.rise,
            )
            self._pending.append(_Change(event.name, True, now))
        self._dirty.set()

    async def _update_table(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            live = self.detector.live_peers()
            changes, self._pending = self._pending, []
            try:
                await self.table.set_live(live)
            except EcmpError as exc:
                self._pending[:0] = changes
                self.counters["ecmp_errors"] += 1
                log.error("switch %s: ECMP update to %s failed: %s", self.name, live, exc)
                await asyncio.sleep(self.config.timers.reconnect_interval)
                self._dirty.set()
                continue
            self.counters["ecmp_updates"] += 1
            done = loop.time()
            for change in changes:
                verb = "restored to" if change.live else "removed from"
                if not change.live:
                    self.removal_times[change.name] = round(done - change.since, 4)
                log.warning(
                    "forwarder %s %s ECMP %.3f s after %s; live: %s",
                    change.name,
                    verb,
                    done - change.since,
                    "recovery" if change.live else "its last reply",
                    ", ".join(sorted(live)) or "none (VIPs unreachable)",
                )
