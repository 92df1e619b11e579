"""TAP network interfaces (Documentation/networking/tuntap.rst): /dev/net/tun opened with
IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, so every frame carries a virtio_net_hdr that the
guest's virtio-net driver reads and writes as is."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

from .defaults import EXIT_NET
from .errors import KvmmError

LOG = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10


class NetError(KvmmError):
    """A network backend cannot be set up as requested."""

    exit_status = EXIT_NET


class Tap:
    def __init__(self, name: str) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ:
            raise NetError(f"invalid tap name {name!r}: 1 to {IFNAMSIZ - 1} characters")
        try:
            self.fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise NetError(f"cannot open {TUN_DEVICE}: {exc.strerror} (is the tun module loaded?)") from None
        ifreq = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, ifreq)
        except OSError as exc:
            os.close(self.fd)
            if exc.errno == errno.EPERM:
                raise NetError(
                    f"cannot create or attach tap {name!r}: permission denied; create it first "
                    f"(ip tuntap add {name} mode tap user $USER) or run with CAP_NET_ADMIN"
                ) from None
            if exc.errno == errno.EBUSY:
                raise NetError(f"tap {name!r} is in use by another process") from None
            raise NetError(f"cannot attach tap {name!r}: {exc.strerror}") from None
        self.name = name
        self.vnet_hdr_len = 10

    def set_offload(self, flags: int) -> bool:
        """TUNSETOFFLOAD: which offloads the guest may hand to the host; False if refused."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
            return True
        except OSError:
            return False

    def set_vnet_hdr_len(self, length: int) -> None:
        fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", length))
        self.vnet_hdr_len = length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
