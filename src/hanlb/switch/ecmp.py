"""ECMP over the forwarders in the router's kernel, through rtnetlink (claims 3, 5).

``EcmpTable`` owns, in the current network namespace:

- one nexthop object per forwarder: ``id BASE+1+i via ADDRESS dev INTERFACE``
  (forwarders numbered in name order);
- one nexthop group ``id BASE`` over the *live* forwarders: resilient
  (``type resilient buckets N``) when ``buckets > 0`` and the kernel accepts it,
  otherwise a plain multipath group;
- a ``/32`` route per VIP: ``VIP nhid BASE``.

Which of these the kernel got is ``EcmpTable.mode``:

- ``"resilient"``: a resilient group. When a forwarder leaves, only its buckets
  move; flows hashed to the others stay where they are. A returning forwarder
  takes buckets back as they go idle (``idle_timer``, kernel default 120 s),
  so established flows are not moved onto it.
- ``"multipath"``: a plain multipath group (hash-threshold: a membership change
  can move flows between surviving forwarders too).
- ``"route"``: the kernel has no nexthop objects; each VIP gets a classic
  multipath route (``nexthop via A dev D nexthop via B dev D``), replaced whole.

``set_live`` replaces the group in one netlink request, so the kernel switches
from the old member set to the new one atomically.

**No live forwarder.** A group cannot be empty. Rather than keep the VIPs routed
to the last forwarder (which is dead), the VIP routes become ``unreachable``
(senders get ICMP host-unreachable at once, and the VIP never leaks to a default
route) and the group is deleted, so the kernel never shows a dead member. The
first forwarder to come back recreates the group and the VIP routes point at it
again.

pyroute2 0.9.7 has no nexthop-object API (no ``nhmsg``, no ``RTA_NH_ID`` in its
``rtmsg``), so the two messages are declared here on pyroute2's ``nlmsg`` base
and sent with ``AsyncIPRoute.nlm_request_batch``; the classic multipath route of
``"route"`` mode uses pyroute2's own ``route()``. Everything is asyncio: the sync
``IPRoute`` of 0.9.7 cannot be used inside a running event loop.

Errors: every kernel refusal is raised as ``EcmpError`` (an ``OSError`` with the
netlink errno); the table's idea of what is live is only updated on success.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable
from typing import Any, Final, Literal

from pyroute2 import AsyncIPRoute
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    nla,
    nlmsg,
)
from pyroute2.netlink.exceptions import NetlinkError

__all__ = ["DEFAULT_ID_BASE", "RTPROT_HANLB", "EcmpError", "EcmpTable", "Mode"]

Mode = Literal["resilient", "multipath", "route"]

DEFAULT_ID_BASE: Final = 0x484C0000
"""Nexthop ids used: BASE (the group) and BASE+1.. (one per forwarder). "HL" << 16."""
RTPROT_HANLB: Final = 200
"""Routing protocol number on everything this module installs (``proto 200``)."""

RTM_NEWROUTE: Final = 24
RTM_DELROUTE: Final = 25
RTM_NEWNEXTHOP: Final = 104
RTM_DELNEXTHOP: Final = 105
RTM_GETNEXTHOP: Final = 106
RT_TABLE_MAIN: Final = 254
RTN_UNICAST: Final = 1
RTN_UNREACHABLE: Final = 7
NEXTHOP_GRP_TYPE_MPATH: Final = 0
NEXTHOP_GRP_TYPE_RES: Final = 1
NLA_F_NESTED: Final = 0x8000
USER_HZ: Final = 100
_GRP_ENTRY: Final = struct.Struct("=IBBH")  # struct nexthop_grp: id, weight-1, weight_high, pad

_REQ: Final = NLM_F_REQUEST | NLM_F_ACK
_PUT: Final = _REQ | NLM_F_CREATE | NLM_F_REPLACE


class nhmsg(nlmsg):
    """struct nhmsg + NHA_* attributes (linux/nexthop.h)."""

    fields = (
        ("family", "B"),
        ("scope", "B"),
        ("protocol", "B"),
        ("resvd", "B"),
        ("flags", "I"),
    )
    nla_map = (
        (0, "NHA_UNSPEC", "none"),
        (1, "NHA_ID", "uint32"),
        (2, "NHA_GROUP", "cdata"),
        (3, "NHA_GROUP_TYPE", "uint16"),
        (4, "NHA_BLACKHOLE", "flag"),
        (5, "NHA_OIF", "uint32"),
        (6, "NHA_GATEWAY", "ip4addr"),
        (12, "NHA_RES_GROUP", "res_group", NLA_F_NESTED),
    )

    class res_group(nla):
        nla_map = (
            (0, "NHA_RES_GROUP_PAD", "none"),
            (1, "NHA_RES_GROUP_BUCKETS", "uint16"),
            (2, "NHA_RES_GROUP_IDLE_TIMER", "uint32"),
            (3, "NHA_RES_GROUP_UNBALANCED_TIMER", "uint32"),
            (4, "NHA_RES_GROUP_UNBALANCED_TIME", "uint64"),
        )


class rtmsg_nh(nlmsg):
    """struct rtmsg with the attributes this module sets, RTA_NH_ID included."""

    fields = (
        ("family", "B"),
        ("dst_len", "B"),
        ("src_len", "B"),
        ("tos", "B"),
        ("table", "B"),
        ("proto", "B"),
        ("scope", "B"),
        ("type", "B"),
        ("flags", "I"),
    )
    nla_map = (
        (0, "RTA_UNSPEC", "none"),
        (1, "RTA_DST", "ip4addr"),
        (15, "RTA_TABLE", "uint32"),
        (30, "RTA_NH_ID", "uint32"),
    )


class EcmpError(OSError):
    """The kernel refused a change. ``errno`` is the netlink error code.

    Not raised by ``close`` for objects that are already gone.
    """


def _mapped(exc: NetlinkError, what: str) -> EcmpError:
    return EcmpError(exc.code, f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}")


class EcmpTable:
    def __init__(
        self,
        interface: str,
        vips: Iterable[str],
        next_hops: dict[str, str],
        buckets: int,
        *,
        id_base: int = DEFAULT_ID_BASE,
        idle_timer: float | None = None,
    ) -> None:
        if not next_hops:
            raise ValueError("no next hops")
        self.interface = interface
        self.vips = sorted(set(vips))
        self.next_hops = dict(next_hops)
        self.buckets = buckets
        self.idle_timer = idle_timer
        self.group_id = id_base
        self.ids = {name: id_base + 1 + i for i, name in enumerate(sorted(next_hops))}
        self.mode: Mode | None = None
        self.live: frozenset[str] = frozenset()
        self._ipr: AsyncIPRoute | None = None
        self._oif = 0
        self._group_exists = False

    # -- lifecycle -------------------------------------------------------------

    async def open(self, live: Iterable[str] | None = None) -> None:
        """Install the next hops, the group over ``live`` (default: all) and the VIP routes."""
        self._ipr = AsyncIPRoute()
        self._ipr.register_policy(RTM_NEWNEXTHOP, nhmsg)
        links = await self._ipr.link_lookup(ifname=self.interface)
        if not links:
            self._ipr.close()
            self._ipr = None
            raise EcmpError(errno.ENODEV, f"no interface {self.interface!r}")
        self._oif = links[0]
        try:
            await self._batch([self._nexthop(name) for name in sorted(self.next_hops)])
            self.mode = "resilient" if self.buckets > 0 else "multipath"
        except EcmpError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self.mode = "route"
        names = frozenset(self.next_hops if live is None else live)
        if self.mode == "resilient" and names:
            try:
                await self._batch([self._group(names)])
            except EcmpError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.mode = "multipath"
            else:
                self._group_exists = True
        self.live = frozenset()
        await self.set_live(names, force=True)

    async def set_live(self, names: Iterable[str], *, force: bool = False) -> None:
        """Route the VIPs over exactly ``names`` (unknown names are an error)."""
        live = frozenset(names)
        unknown = live - self.next_hops.keys()
        if unknown:
            raise ValueError(f"unknown next hops: {', '.join(sorted(unknown))}")
        if live == self.live and not force:
            return
        if self.mode == "route":
            await self._set_routes_classic(live)
        elif live:
            msgs = [self._group(live)]
            if not self._group_exists or force:
                msgs += [self._vip_route(vip, unreachable=False) for vip in self.vips]
            await self._batch(msgs)
            self._group_exists = True
        else:
            await self._batch([self._vip_route(vip, unreachable=True) for vip in self.vips])
            if self._group_exists:
                await self._batch([self._del_nexthop(self.group_id)])
                self._group_exists = False
        self.live = live

    async def close(self) -> None:
        """Remove the VIP routes, the group and the next hops this table made."""
        if self._ipr is None:
            return
        msgs: list[nlmsg] = [self._del_route(vip) for vip in self.vips]
        if self.mode != "route":
            msgs.append(self._del_nexthop(self.group_id))
            msgs += [self._del_nexthop(i) for i in self.ids.values()]
        for msg in msgs:  # one by one: a missing object must not stop the others
            try:
                await self._batch([msg])
            except EcmpError as exc:
                if exc.errno not in (errno.ENOENT, errno.ESRCH):
                    raise
        self._ipr.close()
        self._ipr = None
        self._group_exists = False
        self.live = frozenset()

    async def __aenter__(self) -> EcmpTable:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- reading back ----------------------------------------------------------

    async def kernel_members(self) -> list[str]:
        """The forwarders the kernel's group holds now (``[]``: no group / route mode)."""
        if self.mode == "route" or not self._group_exists:
            return []
        msg = nhmsg()
        msg["family"] = socket.AF_UNSPEC
        msg["attrs"] = [("NHA_ID", self.group_id)]
        msg["header"]["type"] = RTM_GETNEXTHOP
        msg["header"]["flags"] = _REQ
        names = {i: n for n, i in self.ids.items()}
        for reply in await self._request([msg]):
            raw = reply.get_attr("NHA_GROUP")
            if isinstance(raw, bytes):
                return sorted(
                    names.get(ident, str(ident)) for ident, *_ in _GRP_ENTRY.iter_unpack(raw)
                )
        return []

    # -- messages --------------------------------------------------------------

    def _nexthop(self, name: str) -> nhmsg:
        msg = nhmsg()
        msg["family"] = socket.AF_INET
        msg["protocol"] = RTPROT_HANLB
        msg["attrs"] = [
            ("NHA_ID", self.ids[name]),
            ("NHA_OIF", self._oif),
            ("NHA_GATEWAY", self.next_hops[name]),
        ]
        return self._header(msg, RTM_NEWNEXTHOP, _PUT)

    def _group(self, live: frozenset[str]) -> nhmsg:
        entries = b"".join(_GRP_ENTRY.pack(self.ids[n], 0, 0, 0) for n in sorted(live))
        msg = nhmsg()
        msg["family"] = socket.AF_UNSPEC
        msg["protocol"] = RTPROT_HANLB
        attrs: list[tuple[str, Any]] = [("NHA_ID", self.group_id), ("NHA_GROUP", entries)]
        if self.mode == "resilient":
            res: list[tuple[str, int]] = [("NHA_RES_GROUP_BUCKETS", self.buckets)]
            if self.idle_timer is not None:
                res.append(("NHA_RES_GROUP_IDLE_TIMER", round(self.idle_timer * USER_HZ)))
            attrs += [("NHA_GROUP_TYPE", NEXTHOP_GRP_TYPE_RES), ("NHA_RES_GROUP", {"attrs": res})]
        else:
            attrs.append(("NHA_GROUP_TYPE", NEXTHOP_GRP_TYPE_MPATH))
        msg["attrs"] = attrs
        return self._header(msg, RTM_NEWNEXTHOP, _PUT)

    def _del_nexthop(self, ident: int) -> nhmsg:
        msg = nhmsg()
        msg["family"] = socket.AF_UNSPEC
        msg["attrs"] = [("NHA_ID", ident)]
        return self._header(msg, RTM_DELNEXTHOP, _REQ)

    def _route_base(self, vip: str) -> rtmsg_nh:
        msg = rtmsg_nh()
        msg["family"] = socket.AF_INET
        msg["dst_len"] = 32
        msg["table"] = RT_TABLE_MAIN
        msg["proto"] = RTPROT_HANLB
        msg["attrs"] = [("RTA_DST", vip), ("RTA_TABLE", RT_TABLE_MAIN)]
        return msg

    def _vip_route(self, vip: str, *, unreachable: bool) -> rtmsg_nh:
        msg = self._route_base(vip)
        if unreachable:
            msg["type"] = RTN_UNREACHABLE
        else:
            msg["type"] = RTN_UNICAST
            msg["attrs"].append(("RTA_NH_ID", self.group_id))
        return self._header(msg, RTM_NEWROUTE, _PUT)

    def _del_route(self, vip: str) -> rtmsg_nh:
        return self._header(self._route_base(vip), RTM_DELROUTE, _REQ)

    @staticmethod
    def _header(msg: Any, msg_type: int, flags: int) -> Any:
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = flags
        return msg

    # -- I/O -------------------------------------------------------------------

    async def _set_routes_classic(self, live: frozenset[str]) -> None:
        ipr = self._require()
        for vip in self.vips:
            try:
                if live:
                    await ipr.route(
                        "replace",
                        dst=f"{vip}/32",
                        proto=RTPROT_HANLB,
                        multipath=[
                            {"gateway": self.next_hops[n], "oif": self._oif} for n in sorted(live)
                        ],
                    )
                else:
                    await self._batch([self._vip_route(vip, unreachable=True)])
            except NetlinkError as exc:
                raise _mapped(exc, f"route {vip}") from exc

    async def _request(self, msgs: list[nlmsg]) -> list[Any]:
        ipr = self._require()
        try:
            return [reply async for reply in ipr.nlm_request_batch(msgs)]
        except NetlinkError as exc:
            raise _mapped(exc, "rtnetlink") from exc

    async def _batch(self, msgs: list[nlmsg]) -> None:
        if msgs:
            await self._request(msgs)

    def _require(self) -> AsyncIPRoute:
        if self._ipr is None:
            raise EcmpError(errno.EBADF, "EcmpTable is not open")
        return self._ipr
