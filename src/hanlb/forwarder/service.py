"""The forwarder process: the core, a datapath, a classifier link, an admin socket.

Frames from the datapath go to the core as they arrive; the work they cause
(installs, transmits, messages to the classifier) is flushed once per event-loop
pass, so a burst of misses becomes one ``ClassifyBatch`` and its routes one
datapath install.

Classifier liveness (claims 56-58): the forwarder pings its classifier every
``liveness_interval``; after ``liveness_misses`` intervals without a pong
(the switch's ``FailureDetector``) it drops the link and moves to the next
classifier in its preference list (``assign.ClassifierChoice``), re-sending
every miss it is still holding. While on a fallback it tries the preferred
classifiers again every ``TAKE_BACK_INTERVAL`` and hands over to the first
that answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from pathlib import Path

from ..admin import AdminServer, CountersCollector
from ..config import ClusterConfig, ForwarderConfig
from ..net import Link, LinkClosed, open_link
from ..protocol.messages import Hello, Ping, Pong
from ..switch.detector import FailureDetector, PeerSuspected
from .assign import ClassifierChoice
from .core import ForwarderCore, Install, InstallDrops, LiftDrops, Remove, Transmit, Trust
from .datapath import Datapath, MemoryDatapath
from .probe import start_probe_responder

__all__ = ["ForwarderService", "make_datapath"]

log = logging.getLogger("hanlb.forwarder")

TAKE_BACK_INTERVAL = 1.0
"""Seconds between attempts to return to a more preferred classifier."""


def make_datapath(fc: ForwarderConfig) -> Datapath:
    kind = fc.datapath
    if kind == "kernel":
        from .kernel import KernelDatapath, MissLimits

        limits = MissLimits(fc.miss_limit, fc.miss_limit_per_source, fc.trusted_ttl)
        return KernelDatapath(fc.interface, fc.miss_device, limits=limits)
    if kind == "userspace":
        from .userspace import UserspaceDatapath

        return UserspaceDatapath(fc.interface)
    return MemoryDatapath()


def interface_mac(interface: str) -> bytes:
    text = Path(f"/sys/class/net/{interface}/address").read_text().strip()
    return bytes.fromhex(text.replace(":", ""))


class ForwarderService:
    def __init__(self, config: ClusterConfig, name: str, datapath: Datapath | None = None) -> None:
        self.config = config
        self.fc = config.forwarder(name)
        self.name = name
        self.datapath = datapath or make_datapath(self.fc)
        self.link: Link | None = None
        self.classifier: str | None = None
        self.net_counters: Counter[str] = Counter()
        self.incarnation = int.from_bytes(os.urandom(4), "big")
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._stopping = asyncio.Event()
        self.core: ForwarderCore

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        t = self.config.timers
        own_mac = (
            interface_mac(self.fc.interface)
            if self.fc.datapath != "memory"
            else b"\x02\0\0\0\0\x01"
        )
        vips = [(a.vip, a.port) for a in self.config.applications]
        self.core = ForwarderCore(
            self.name,
            own_mac,
            vips,
            fast_path=self.datapath.fast_path,
            linger=t.route_linger,
            idle_timeout=t.route_idle_timeout,
            sweep_interval=t.sweep_interval,
            classify_timeout=t.classify_timeout,
            now=loop.time(),
        )
        admin = AdminServer(self.config.cluster.run_dir, self.name, self.fc.admin)
        admin.routes["/status"] = self.status
        admin.routes["/routes"] = self.core.route_rows
        admin.registry.register(
            CountersCollector(
                "hanlb_forwarder",
                self.name,
                lambda: {**self.core.counters, **self.net_counters},
                lambda: {"routes": len(self.core.routes), "held_flows": len(self.core.pending)},
            )
        )
        self.datapath.open(self._on_frame, vips, own_mac)
        probe = await start_probe_responder(
            self.fc.address, self.fc.probe_port, self.config.key_bytes, self.net_counters
        )
        await admin.start()
        self._arm_timer()
        counter_task = asyncio.create_task(self._read_packet_counts())
        log.info("forwarder %s up (%s datapath)", self.name, self.fc.datapath)
        try:
            await self._classifier_loop()
        finally:
            counter_task.cancel()
            probe.close()
            admin.close()
            if self._timer:
                self._timer.cancel()
            self.datapath.close()

    def stop(self) -> None:
        self._stopping.set()
        if self.link:
            self.link.close()

    def status(self) -> dict[str, object]:
        return {
            "role": "forwarder",
            "name": self.name,
            "datapath": self.fc.datapath,
            "classifier": self.classifier,
            "routes": len(self.core.routes),
            "held_flows": len(self.core.pending),
            "drops": len(self.core.drops),
            "counters": {**self.core.counters, **self.net_counters},
            "datapath_stats": self.datapath.stats(),
        }

    # -- data path -------------------------------------------------------------

    def _on_frame(self, frame: bytes) -> None:
        self.core.on_frame(frame, asyncio.get_running_loop().time())
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dp = self.datapath
        for action in self.core.actions():
            try:
                if isinstance(action, Transmit):
                    dp.transmit(action.frame)
                elif isinstance(action, Install):
                    dp.install(action.routes)
                elif isinstance(action, Remove):
                    dp.remove(action.flows)
                elif isinstance(action, InstallDrops):
                    dp.install_drops(action.drops)
                elif isinstance(action, LiftDrops):
                    dp.lift_drops(action.flows)
                elif isinstance(action, Trust):
                    dp.trust(action.sources)
            except (OSError, RuntimeError) as exc:  # NftError is a RuntimeError
                self.net_counters["datapath_errors"] += 1
                log.warning("datapath %s failed: %s", type(action).__name__, exc)
        msgs = self.core.messages()
        if msgs and self.link is not None:
            try:
                self.link.send(*msgs)
            except LinkClosed:
                self.net_counters["messages_lost_link_down"] += len(msgs)
        elif msgs:
            self.net_counters["messages_lost_link_down"] += len(msgs)

    def _arm_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(max(self.core.get_timer(), loop.time()), self._on_timer)

    def _on_timer(self) -> None:
        now = asyncio.get_running_loop().time()
        self.core.handle_timer(now)
        self._flush()
        self._arm_timer()

    async def _read_packet_counts(self) -> None:
        """A fast-path datapath counts packets per route; the core needs them to
        tell idle routes. Listing a large map costs about 30 us a route, so it runs
        off the loop, and only 8 times per idle timeout: an idle route goes at most
        an eighth of the timeout late."""
        if not self.datapath.fast_path:
            return
        t = self.config.timers
        period = max(t.sweep_interval, t.route_idle_timeout / 8)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            try:
                counts = await asyncio.to_thread(self.datapath.packet_counts)
            except Exception as exc:  # a failed read only delays idle detection
                self.net_counters["packet_count_errors"] += 1
                log.warning("reading route counters failed: %s", exc)
                continue
            if counts is not None:
                self.core.on_packet_counts(counts, loop.time())

    # -- classifier link ---------------------------------------------------------

    async def _classifier_loop(self) -> None:
        loop = asyncio.get_running_loop()
        t = self.config.timers
        endpoints = {c.name: c.endpoint for c in self.config.classifiers_for(self.name)}
        choice = ClassifierChoice(list(endpoints), t.reconnect_interval)
        link: Link | None = None
        name = ""
        while not self._stopping.is_set():
            if link is None:
                name = choice.next_candidate(loop.time())
                await asyncio.sleep(max(0.0, choice.wait_until(name) - loop.time()))
                link = await self._connect(name, endpoints[name])
                if link is None:
                    choice.failed(name, loop.time())
                    continue
            choice.succeeded(name)
            self._attach(link, name)
            try:
                handover = await self._serve_link(link, name, choice, endpoints)
            finally:
                self.link, self.classifier = None, None
                link.close()
            if handover is not None:
                self.net_counters["classifier_takebacks"] += 1
                name, link = handover
                log.info("forwarder %s: back to preferred classifier %s", self.name, name)
            else:
                self.net_counters["classifier_losses"] += 1
                choice.failed(name, loop.time())
                link = None

    async def _connect(self, name: str, endpoint: tuple[str, int]) -> Link | None:
        try:
            link = await open_link(*endpoint, self.config.key_bytes, self.net_counters, timeout=1.0)
        except (OSError, TimeoutError):
            self.net_counters["classifier_connect_failures"] += 1
            return None
        link.send(Hello(self.name, "forwarder", self.incarnation))
        return link

    def _attach(self, link: Link, name: str) -> None:
        """Make ``link`` the classifier link and ask it about every held miss."""
        self.link, self.classifier = link, name
        self.net_counters["classifier_connects"] += 1
        log.info("forwarder %s: classifier %s", self.name, name)
        self.core.classifier_changed(asyncio.get_running_loop().time())
        self._schedule_flush()

    async def _serve_link(
        self,
        link: Link,
        name: str,
        choice: ClassifierChoice,
        endpoints: dict[str, tuple[str, int]],
    ) -> tuple[str, Link] | None:
        """Use ``link`` until it dies (None) or a more preferred classifier is
        reachable again (its name and a new link: the handover)."""
        t = self.config.timers
        loop = asyncio.get_running_loop()
        detector = FailureDetector(t.liveness_interval, t.liveness_misses, 1, loop.time())
        detector.add_peer(name, loop.time())
        reader = asyncio.create_task(self._read(link, detector))
        pinger = asyncio.create_task(self._ping(link, name, detector))
        taker = asyncio.create_task(self._take_back(name, choice, endpoints))
        tasks = {reader, pinger, taker}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if taker in done and not taker.cancelled() and taker.exception() is None:
            return taker.result()
        if reader in done and not reader.cancelled() and reader.exception() is not None:
            log.warning("forwarder %s: classifier %s lost: %s", self.name, name, reader.exception())
        return None

    async def _read(self, link: Link, detector: FailureDetector) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for msg in await link.recv():
                if isinstance(msg, Pong):
                    detector.on_reply(self.classifier or "", msg.seq, loop.time())
                elif isinstance(msg, Ping):
                    link.send(Pong(msg.seq, msg.sent))
                else:
                    self.core.on_message(msg, loop.time())
            self._flush()

    async def _ping(self, link: Link, name: str, detector: FailureDetector) -> None:
        """Liveness: a Ping every interval; ``misses`` unanswered intervals in a
        row and the classifier is taken for dead (the link is dropped)."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            detector.handle_timer(now)
            event = detector.next_event()
            if isinstance(event, PeerSuspected):
                self.net_counters["classifier_liveness_timeouts"] += 1
                log.warning("forwarder %s: classifier %s stopped answering", self.name, name)
                return
            for _, seq in detector.probes_due(now):
                link.send(Ping(seq, now))
            when = detector.get_timer()
            await asyncio.sleep(max(0.0, (when if when is not None else now + 0.05) - now))

    async def _take_back(
        self, current: str, choice: ClassifierChoice, endpoints: dict[str, tuple[str, int]]
    ) -> tuple[str, Link]:
        """While on a fallback classifier, try the more preferred ones again
        every ``TAKE_BACK_INTERVAL``; returns once one answers."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TAKE_BACK_INTERVAL)
            better = choice.better_than(current, loop.time())
            if better is None:
                continue
            link = await self._connect(better, endpoints[better])
            if link is None:
                choice.failed(better, loop.time())
                continue
            return better, link
