"""A read-only subset of QEMU's fw_cfg interface on ports 0x510/0x511, for test kernels.

Multiboot test kernels written for QEMU ask fw_cfg how many CPUs and how much RAM the
machine has (kvm-unit-tests, lib/x86/fwcfg.c: FW_CFG_NB_CPUS and FW_CFG_RAM_SIZE, unless
its environment file overrides them). The interface is QEMU's "traditional" one
(docs/specs/fw_cfg.rst in QEMU): a 16-bit write to the selector port 0x510 selects an
item and rewinds it; each read of the data port 0x511 returns the item's next byte, and 0
past its end or for an item kvmm does not provide. kvmm offers no DMA interface (the ID
item says so) and ignores data-port writes, as QEMU has since 2.4.

Items: the signature "QEMU", the ID (1: traditional interface only), the UUID (zeros),
the RAM size, "no graphics", the CPU counts, and an empty file directory.
"""

from __future__ import annotations

import struct
import threading

from ..layout import FW_CFG

FW_CFG_PORT = FW_CFG.base  # selector (16-bit); data at 0x511
FW_CFG_PORTS = FW_CFG.length
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_ID_TRADITIONAL = 1  # bit 0: the port interface; bit 1 (DMA) clear


def fw_cfg_items(ram_size: int, cpus: int, max_cpus: int | None = None) -> dict[int, bytes]:
    """The items kvmm offers, little-endian as QEMU stores them (the file directory's
    count is big-endian, as in QEMU)."""
    return {
        FW_CFG_SIGNATURE: b"QEMU",
        FW_CFG_ID: struct.pack("<I", FW_CFG_ID_TRADITIONAL),
        FW_CFG_UUID: bytes(16),
        FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
        FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
        FW_CFG_NB_CPUS: struct.pack("<H", cpus),
        FW_CFG_MAX_CPUS: struct.pack("<H", cpus if max_cpus is None else max_cpus),
        FW_CFG_FILE_DIR: struct.pack(">I", 0),
    }


class FwCfg:
    """Ports 0x510 (selector) and 0x511 (data). Every guest value is harmless: a selector
    is looked up, the read position only moves forward and is bounded by the item."""

    def __init__(self, items: dict[int, bytes]) -> None:
        self.items = dict(items)
        self.selected = b""
        self.pos = 0
        self.lock = threading.Lock()  # vCPU threads select and read (the guest serialises its own)

    def pio_read(self, offset: int, size: int) -> int:
        if offset != 1:
            return 0  # the selector port reads as 0
        value = 0
        with self.lock:
            for i in range(size):  # a wider read returns the next bytes, first byte lowest
                if self.pos < len(self.selected):
                    value |= self.selected[self.pos] << (8 * i)
                self.pos += 1
            self.pos = min(self.pos, len(self.selected))
        return value

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size >= 2:  # a byte write there is a data write in QEMU: ignored
            # The selector's bit 14 (write) and 15 (arch-local) pick items kvmm does not
            # have; such a key selects nothing and reads as zeros.
            with self.lock:
                self.selected = self.items.get(value & 0xFFFF, b"")
                self.pos = 0
