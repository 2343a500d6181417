"""TAP devices and interface flags through ioctls (no netlink needed).

``open_tap`` creates the TAP device if it does not exist (or attaches to an
existing one) and returns a non-blocking file descriptor on it. The device is
made non-persistent, so it disappears when the last descriptor is closed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct

__all__ = ["close_tap", "interface_mac", "open_tap", "set_up"]

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1
IFNAMSIZ = 16


def _ifreq(name: str, flags: int = 0) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise ValueError(f"bad interface name {name!r}")
    return struct.pack("16sH22x", raw, flags)


def open_tap(name: str) -> int:
    """Create or attach TAP ``name`` (no packet info header); non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, IFF_TAP | IFF_NO_PI))
        # A device left behind persistent by a crashed run goes with our fd.
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    except OSError:
        os.close(fd)
        raise
    # No IPv6 autoconfiguration chatter on the miss device.
    sysctl = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
    with contextlib.suppress(OSError), open(sysctl, "w") as f:
        f.write("1")
    return fd


def close_tap(fd: int) -> None:
    """Close a descriptor from ``open_tap``; the device goes with the last one."""
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    os.close(fd)


def set_up(name: str) -> None:
    """Set IFF_UP on interface ``name``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        res = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, _ifreq(name))
        flags = struct.unpack_from("H", res, 16)[0]
        if not flags & IFF_UP:
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, _ifreq(name, flags | IFF_UP))


def interface_mac(name: str) -> bytes:
    """The hardware address of interface ``name`` (6 bytes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        res = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, _ifreq(name))
    return bytes(res[18:24])
