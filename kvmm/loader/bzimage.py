"""bzImage loader for the 64-bit boot protocol (Documentation/x86/boot.rst).

The protected-mode kernel is loaded at its preferred address (relocatable kernels) or at
``code32_start``; the 64-bit entry point is 0x200 bytes into it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import GuestMemoryError, KernelImageError
from ..memory import GuestMemory
from . import bootparams as bp

MIN_VERSION = 0x0206  # cmdline_size; kvmm needs it and 64-bit kernels all have it
ENTRY_64_OFFSET = 0x200


@dataclass(frozen=True)
class BzImage:
    """A parsed bzImage: the setup header fields the 64-bit boot protocol uses (boot.rst)."""

    version: int
    setup_header: bytes
    payload_offset: int
    load_addr: int
    relocatable: bool
    initrd_addr_max: int
    cmdline_size: int
    init_size: int

    @property
    def entry(self) -> int:
        return self.load_addr + ENTRY_64_OFFSET


def is_bzimage(image: bytes) -> bool:
    return len(image) >= bp.HDR_HEADER + 4 and struct.unpack_from("<I", image, bp.HDR_HEADER)[0] == bp.HDRS_MAGIC


def parse_bzimage(image: bytes, name: str = "kernel") -> BzImage:
    if len(image) < 0x268:
        raise KernelImageError(f"{name}: truncated bzImage ({len(image)} bytes)")

    def u8(off: int) -> int:
        return image[off]

    def u16(off: int) -> int:
        return int(struct.unpack_from("<H", image, off)[0])

    def u32(off: int) -> int:
        return int(struct.unpack_from("<I", image, off)[0])

    if u16(bp.HDR_BOOT_FLAG) != bp.BOOT_FLAG or u32(bp.HDR_HEADER) != bp.HDRS_MAGIC:
        raise KernelImageError(f"{name}: not a bzImage (no boot flag / HdrS signature)")
    version = u16(bp.HDR_VERSION)
    if version < MIN_VERSION:
        raise KernelImageError(
            f"{name}: boot protocol {version >> 8}.{version & 0xFF:02d} is too old: kvmm needs 2.06 or newer"
        )
    if not u8(bp.HDR_LOADFLAGS) & bp.LOADED_HIGH:
        raise KernelImageError(f"{name}: a zImage (loaded low) is not supported; use a bzImage")
    # boot.rst: xloadflags (2.12+) bit 0 says the kernel has the 64-bit entry at 0x200.
    if version >= 0x020C and not u16(bp.HDR_XLOADFLAGS) & bp.XLF_KERNEL_64:
        raise KernelImageError(f"{name}: a 32-bit kernel (no 64-bit entry point in xloadflags): kvmm boots x86-64 kernels")
    setup_sects = u8(bp.HDR_SETUP_SECTS) or 4
    payload_offset = (setup_sects + 1) * 512
    if payload_offset >= len(image):
        raise KernelImageError(f"{name}: truncated bzImage: no protected-mode kernel after {setup_sects} setup sectors")
    header_end = bp.HDR_HEADER + u8(bp.HDR_JUMP + 1)  # the jump at 0x200 skips the header
    relocatable = version >= 0x0205 and bool(u8(bp.HDR_RELOCATABLE))
    load_addr = u32(bp.HDR_CODE32_START)
    if relocatable and version >= 0x020A:
        load_addr = struct.unpack_from("<Q", image, bp.HDR_PREF_ADDRESS)[0]
    init_size = u32(bp.HDR_INIT_SIZE) if version >= 0x020A else 0
    return BzImage(
        version=version,
        setup_header=bytes(image[bp.HDR_SETUP_SECTS:header_end]),
        payload_offset=payload_offset,
        load_addr=load_addr,
        relocatable=relocatable,
        initrd_addr_max=u32(bp.HDR_INITRD_ADDR_MAX),
        cmdline_size=u32(bp.HDR_CMDLINE_SIZE),
        init_size=init_size,
    )


def load_bzimage(mem: GuestMemory, image: bytes, name: str = "kernel") -> BzImage:
    bz = parse_bzimage(image, name)
    payload = memoryview(image)[bz.payload_offset :]
    # The decompressor needs init_size bytes from the load address (boot.rst, init_size).
    need = max(len(payload), bz.init_size)
    if not mem.contains(bz.load_addr, need):
        raise KernelImageError(f"{name}: needs {need >> 20} MiB of RAM at {bz.load_addr:#x}: give more --mem")
    try:
        mem.write(bz.load_addr, payload)
    except GuestMemoryError as exc:  # pragma: no cover - contains() above covers it
        raise KernelImageError(str(exc)) from None
    return bz
