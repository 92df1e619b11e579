"""Port-I/O dispatch: each port maps to the device that owns it.

Devices implement :class:`PioDevice`; unknown ports read as all-ones (an ISA bus with
nothing on it) and ignore writes, counted per port and logged once.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Protocol

from ..ratelimit import RateLimitedLog

LOG = logging.getLogger(__name__)


class PioDevice(Protocol):
    def pio_read(self, offset: int, size: int) -> int: ...

    def pio_write(self, offset: int, size: int, value: int) -> None: ...


class PioBus:
    def __init__(self) -> None:
        self._ports: dict[int, tuple[PioDevice, int]] = {}
        self.unhandled: Counter[int] = Counter()  # at most one entry per port (65536)
        self.log = RateLimitedLog(LOG)

    def register(self, base: int, length: int, device: PioDevice) -> None:
        for port in range(base, base + length):
            if port in self._ports:
                raise ValueError(f"I/O port {port:#x} is already taken by {self._ports[port][0]!r}")
        for port in range(base, base + length):
            self._ports[port] = (device, base)

    def unregister(self, base: int, length: int, device: PioDevice | None = None) -> None:
        """Free the ports; with ``device``, only those that device holds (a PCI BAR's
        handler never frees ports another device owns)."""
        for port in range(base, base + length):
            entry = self._ports.get(port)
            if entry is not None and (device is None or entry[0] is device):
                del self._ports[port]

    def read(self, port: int, size: int) -> int:
        entry = self._ports.get(port)
        if entry is None:
            self._unhandled(port, "read")
            return (1 << (8 * size)) - 1
        dev, base = entry
        return dev.pio_read(port - base, size)

    def write(self, port: int, size: int, value: int) -> None:
        entry = self._ports.get(port)
        if entry is None:
            self._unhandled(port, "write")
            return
        dev, base = entry
        dev.pio_write(port - base, size, value)

    def _unhandled(self, port: int, what: str) -> None:
        if port not in self.unhandled:  # a scan of all 65536 ports is still rate-limited
            self.log.debug("guest %s of unclaimed I/O port %#x (further accesses counted, not logged)", what, port)
        self.unhandled[port] += 1


class MmioDevice(Protocol):
    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


class MmioBus:
    """Guest-physical MMIO windows (PCI memory BARs); nothing decoded reads all-ones."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, MmioDevice]] = []
        self.unhandled = 0

    def register(self, base: int, length: int, device: MmioDevice) -> None:
        for b, n, _ in self._ranges:
            if base < b + n and b < base + length:
                raise ValueError(f"MMIO range {base:#x}+{length:#x} overlaps {b:#x}+{n:#x}")
        self._ranges.append((base, length, device))

    def unregister(self, base: int, length: int, device: MmioDevice | None = None) -> None:
        """Remove the range ``base``+``length``; with ``device``, only if it is that device's."""
        self._ranges = [r for r in self._ranges if (r[0], r[1]) != (base, length) or (device is not None and r[2] is not device)]

    def _find(self, addr: int, size: int) -> tuple[MmioDevice, int] | None:
        for base, length, dev in self._ranges:
            if base <= addr and addr + size <= base + length:
                return dev, addr - base
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self._find(addr, size)
        if hit is None:
            self._unhandled(addr, "read")
            return (1 << (8 * size)) - 1
        return hit[0].mmio_read(hit[1], size)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self._find(addr, size)
        if hit is None:
            self._unhandled(addr, "write")
            return
        hit[0].mmio_write(hit[1], size, value)

    def _unhandled(self, addr: int, what: str) -> None:
        if not self.unhandled:
            LOG.debug("guest %s of unclaimed MMIO address %#x (further accesses counted, not logged)", what, addr)
        self.unhandled += 1
