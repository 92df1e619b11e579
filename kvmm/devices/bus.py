"""Port-I/O dispatch: each port maps to the device that owns it.

Devices implement :class:`PioDevice`; unknown ports read as all-ones (an ISA bus with
nothing on it) and ignore writes, counted per port and logged once.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Protocol

LOG = logging.getLogger(__name__)


class PioDevice(Protocol):
    def pio_read(self, offset: int, size: int) -> int: ...

    def pio_write(self, offset: int, size: int, value: int) -> None: ...


class PioBus:
    def __init__(self) -> None:
        self._ports: dict[int, tuple[PioDevice, int]] = {}
        self.unhandled: Counter[int] = Counter()

    def register(self, base: int, length: int, device: PioDevice) -> None:
        for port in range(base, base + length):
            if port in self._ports:
                raise ValueError(f"I/O port {port:#x} is already taken by {self._ports[port][0]!r}")
        for port in range(base, base + length):
            self._ports[port] = (device, base)

    def unregister(self, base: int, length: int) -> None:
        for port in range(base, base + length):
            self._ports.pop(port, None)

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
        if port not in self.unhandled:
            LOG.debug("guest %s of unclaimed I/O port %#x (further accesses counted, not logged)", what, port)
        self.unhandled[port] += 1
