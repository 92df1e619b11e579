"""QEMU's ``pc-testdev``, the x86 test device that kvm-unit-tests' harness always adds.

Its registers, as QEMU's hw/misc/pc-testdev.c defines them:

- ports 0xE0-0xE3 and 0xE8-0xEB: one 32-bit scratch register; an access of any width
  reads or writes the bytes at ``port & 3`` (the emulator and real-mode tests check
  that string and width-changing I/O reaches a device intact);
- port 0xE4 (32-bit write): "flush" the guest page at that physical address: its host
  mapping is made inaccessible and accessible again, so KVM drops its translations
  and the guest's next access faults into KVM (eventinj tests exception delivery through
  such a fault);
- ports 0x2000-0x2017 (byte writes; a wider write is bytes to consecutive ports, as QEMU
  splits it): drive ISA/IOAPIC interrupt line ``port - 0x2000`` to level ``byte != 0``
  (ioapic tests edge and level interrupts with it, realmode an interrupt through the PIC);
- MMIO 0xFF000000-0xFF00FFFF: 64 KiB of scratch memory behind MMIO exits.

Guest values are bounded by construction: offsets come from the bus, the page address
is checked against guest RAM, a line number is an offset into 24 ports.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from .. import layout
from ..memory import GuestMemory
from ..ratelimit import RateLimitedLog

LOG = logging.getLogger(__name__)

TESTDEV_IRQ_LINES = layout.TESTDEV_IRQ.length
TESTDEV_IOMEM = layout.TESTDEV_IOMEM
TESTDEV_IOMEM_SIZE = layout.TESTDEV_IOMEM_SIZE
PAGE = 0x1000
PROT_NONE = 0
PROT_READ_WRITE = 0x3

_mprotect: Any = None


def _libc_mprotect() -> Any:
    """libc's mprotect, declared in a small FFI of its own the first time a guest asks
    for a page flush (Python's mmap objects have no mprotect)."""
    global _mprotect
    if _mprotect is None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef("int mprotect(void *addr, size_t len, int prot);")
        lib = ffi.dlopen(None)
        _mprotect = (ffi, lib)
    return _mprotect


class TestDevData:
    """The scratch register at 0xE0 and 0xE8 (both views share it, as in QEMU)."""

    def __init__(self) -> None:
        self.value = 0
        self.lock = threading.Lock()  # a read-modify-write from any vCPU thread

    def pio_read(self, offset: int, size: int) -> int:
        shift = (offset & 3) * 8
        return (self.value >> shift) & ((1 << (8 * size)) - 1)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        shift = (offset & 3) * 8
        mask = (((1 << (8 * size)) - 1) << shift) & 0xFFFF_FFFF
        with self.lock:
            self.value = (self.value & ~mask) | ((value << shift) & mask)


class TestDevFlush:
    """Port 0xE4: drop KVM's mapping of one guest page (see the module docstring)."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.flushes = 0
        self._warn = RateLimitedLog(LOG)

    def pio_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def pio_write(self, offset: int, size: int, value: int) -> None:
        page = value & ~(PAGE - 1) & 0xFFFF_FFFF
        region = next((r for r in self.mem.regions if r.gpa <= page and page + PAGE <= r.end), None)
        if offset != 0 or size != 4 or region is None:
            self._warn.warning("pc-testdev: ignored flush of %#x (%d-byte write at +%d): not a page of guest RAM",
                               value, size, offset)
            return
        ffi, lib = _libc_mprotect()
        addr = ffi.cast("void *", self.mem.host_address(region) + (page - region.gpa))
        if lib.mprotect(addr, PAGE, PROT_NONE) != 0 or lib.mprotect(addr, PAGE, PROT_READ_WRITE) != 0:
            self._warn.warning("pc-testdev: mprotect of guest page %#x failed (errno %d)", page, ffi.errno)
        self.flushes += 1


class TestDevIrq:
    """Ports 0x2000-0x2017: interrupt line ``offset`` follows the written value."""

    def __init__(self, set_line: Callable[[int, int], None]) -> None:
        self.set_line = set_line

    def pio_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def pio_write(self, offset: int, size: int, value: int) -> None:
        # QEMU allows only byte accesses here and splits a wider one into bytes at
        # consecutive ports (flatview_write): each byte drives its own line. The
        # real-mode test raises IRQ 11 with "outl" to 0x200b and expects just that.
        for i in range(size):
            if 0 <= offset + i < TESTDEV_IRQ_LINES:
                self.set_line(offset + i, 1 if (value >> (8 * i)) & 0xFF else 0)


class TestDevIomem:
    """64 KiB of scratch memory at 0xFF000000, reached through MMIO exits."""

    def __init__(self) -> None:
        self.buf = bytearray(TESTDEV_IOMEM_SIZE)

    def mmio_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.buf[offset : offset + size], "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        # One slice assignment: atomic under the GIL, as the guest's own store would be.
        self.buf[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class PcTestDev:
    """The whole device; :meth:`attach` puts its registers on the buses."""

    def __init__(self, mem: GuestMemory, set_line: Callable[[int, int], None]) -> None:
        self.data = TestDevData()
        self.flush = TestDevFlush(mem)
        self.irq = TestDevIrq(set_line)
        self.iomem = TestDevIomem()

    def attach(self, pio: Any, mmio: Any) -> None:
        for ports, device in ((layout.TESTDEV_DATA, self.data), (layout.TESTDEV_FLUSH, self.flush),
                              (layout.TESTDEV_BYTE, self.data), (layout.TESTDEV_IRQ, self.irq)):
            pio.register(ports.base, ports.length, device)
        mmio.register(TESTDEV_IOMEM, TESTDEV_IOMEM_SIZE, self.iomem)
