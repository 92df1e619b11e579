"""The Linux x86 zero page (``struct boot_params``), e820 map and low-memory layout.

Offsets are those of ``arch/x86/include/uapi/asm/bootparam.h`` and
Documentation/x86/zero-page.rst; field meanings are from Documentation/x86/boot.rst.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import KernelImageError
from ..memory import GuestMemory

# Where kvmm writes what below 1 MiB: kvmm/layout.py.
from ..layout import (  # noqa: F401 (re-exported: the loader's names for them)
    BOOT_PARAMS_ADDR, BOOT_STACK, CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, GDT_ADDR, HIMEM_START, PML4_ADDR,
)

E820_RAM = 1
E820_RESERVED = 2
E820_MAX_ENTRIES = 128  # boot_params.e820_table[E820_MAX_ENTRIES_ZEROPAGE]

# struct boot_params offsets
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_HDR = 0x1F1
BP_E820_TABLE = 0x2D0
ZERO_PAGE_SIZE = 4096

# struct setup_header offsets, relative to the start of the zero page / of the image
HDR_SETUP_SECTS = 0x1F1
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_HEADER = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_RELOCATABLE = 0x234
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_PAYLOAD_OFFSET = 0x248
HDR_PAYLOAD_LENGTH = 0x24C
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260

BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"
LOADED_HIGH = 0x01
KASLR_FLAG = 0x02  # set by the kernel's decompressor when it randomised the kernel's address
KEEP_SEGMENTS = 0x40
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
LOADER_TYPE_UNDEFINED = 0xFF

_E820 = struct.Struct("<QQI")


class E820Entry(NamedTuple):
    addr: int
    size: int
    type: int


def e820_map(mem: GuestMemory) -> list[E820Entry]:
    """The e820 map for ``mem``: base memory below the EBDA, then RAM from 1 MiB up."""
    entries = [E820Entry(0, EBDA_START, E820_RAM), E820Entry(EBDA_START, 0x100000 - EBDA_START, E820_RESERVED)]
    for r in mem.regions:
        start = max(r.gpa, HIMEM_START)
        if r.end > start:
            entries.append(E820Entry(start, r.end - start, E820_RAM))
    return entries


class ZeroPage:
    """A 4 KiB ``struct boot_params`` built in host memory, then written to the guest."""

    def __init__(self, setup_header: bytes = b"") -> None:
        self.buf = bytearray(ZERO_PAGE_SIZE)
        if setup_header:
            end = HDR_SETUP_SECTS + len(setup_header)
            if end > BP_E820_TABLE:
                raise KernelImageError("setup header runs past its place in the zero page")
            self.buf[HDR_SETUP_SECTS:end] = setup_header
        else:
            # A vmlinux has no setup header: fill in what the kernel reads (boot.rst).
            self.u16(HDR_BOOT_FLAG, BOOT_FLAG)
            self.u32(HDR_HEADER, HDRS_MAGIC)
            self.u16(HDR_VERSION, 0x020F)
            self.u32(HDR_KERNEL_ALIGNMENT, 0x0100_0000)
            self.u32(HDR_CMDLINE_SIZE, CMDLINE_MAX - 1)
            self.u32(HDR_INITRD_ADDR_MAX, 0x7FFF_FFFF)
        self.u8(HDR_TYPE_OF_LOADER, LOADER_TYPE_UNDEFINED)

    def u8(self, off: int, v: int) -> None:
        self.buf[off] = v

    def u16(self, off: int, v: int) -> None:
        struct.pack_into("<H", self.buf, off, v)

    def u32(self, off: int, v: int) -> None:
        struct.pack_into("<I", self.buf, off, v)

    def get_u8(self, off: int) -> int:
        return self.buf[off]

    def get_u32(self, off: int) -> int:
        return int(struct.unpack_from("<I", self.buf, off)[0])

    def set_cmdline(self, addr: int) -> None:
        self.u32(HDR_CMD_LINE_PTR, addr & 0xFFFF_FFFF)
        self.u32(BP_EXT_CMD_LINE_PTR, addr >> 32)

    def set_ramdisk(self, addr: int, size: int) -> None:
        self.u32(HDR_RAMDISK_IMAGE, addr & 0xFFFF_FFFF)
        self.u32(HDR_RAMDISK_SIZE, size & 0xFFFF_FFFF)
        self.u32(BP_EXT_RAMDISK_IMAGE, addr >> 32)
        self.u32(BP_EXT_RAMDISK_SIZE, size >> 32)

    def set_e820(self, entries: list[E820Entry]) -> None:
        if len(entries) > E820_MAX_ENTRIES:
            raise ValueError("too many e820 entries")
        self.u8(BP_E820_ENTRIES, len(entries))
        for i, e in enumerate(entries):
            _E820.pack_into(self.buf, BP_E820_TABLE + i * _E820.size, e.addr, e.size, e.type)

    def e820(self) -> list[E820Entry]:
        n = self.buf[BP_E820_ENTRIES]
        return [E820Entry(*_E820.unpack_from(self.buf, BP_E820_TABLE + i * _E820.size)) for i in range(n)]


def write_cmdline(mem: GuestMemory, cmdline: str, limit: int) -> None:
    """Write the NUL-terminated command line at CMDLINE_ADDR (at most ``limit`` bytes)."""
    data = cmdline.encode() + b"\0"
    if len(data) > min(limit + 1, CMDLINE_MAX):
        raise KernelImageError(f"kernel command line is {len(data) - 1} bytes, this kernel takes at most {limit}")
    mem.write(CMDLINE_ADDR, data)


def place_initrd(mem: GuestMemory, initrd: bytes, kernel_end: int, addr_max: int) -> int:
    """Put the initrd at the top of low RAM, below ``addr_max`` and above the kernel."""
    low = mem.regions[0]
    top = min(low.end, addr_max + 1)
    addr = (top - len(initrd)) & ~0xFFF
    if addr < kernel_end or addr < HIMEM_START:
        raise KernelImageError(
            f"initrd of {len(initrd) >> 10} KiB does not fit in guest RAM below {top:#x} above the kernel (end {kernel_end:#x}): give more --mem"
        )
    mem.write(addr, initrd)
    return addr
