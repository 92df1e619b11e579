"""Kernel loading: ELF ``vmlinux`` or bzImage, initrd, command line, zero page and e820;
multiboot kernels (kvmm/loader/multiboot.py) are recognised here by their header."""

from __future__ import annotations

import logging
from typing import NamedTuple

from ..errors import KernelImageError
from ..layout import FLAT_LOAD_ADDR, FLAT_SEGMENT, VGA_HOLE
from ..memory import GuestMemory
from . import bootparams as bp

LOG = logging.getLogger(__name__)


class BootInfo(NamedTuple):
    """Where the vCPU starts: a 64-bit ``entry`` with ``rsi`` = ``boot_params`` (a flat
    image: real mode at ``entry``, which is :data:`FLAT_LOAD_ADDR`)."""

    kind: str  # "vmlinux", "bzImage" or "flat"
    entry: int
    boot_params: int
    kernel_end: int
    initrd: tuple[int, int] | None  # (address, size)


MULTIBOOT_MAGIC = (0x1BADB002).to_bytes(4, "little")
MULTIBOOT_SEARCH = 8192


def find_multiboot_header(image: bytes | bytearray | memoryview) -> int | None:
    """Where the image's multiboot header is: the first 32-bit aligned magic whose
    12-byte header lies in the first 8 KiB and whose checksum holds (magic + flags +
    checksum == 0 mod 2**32; Multiboot 0.6.96, 3.1.1-3.1.2), or None. Kept here, apart
    from the loader, so the common case (a Linux kernel: no magic there) costs one search."""
    data = bytes(image[:MULTIBOOT_SEARCH])
    at = data.find(MULTIBOOT_MAGIC, 0, MULTIBOOT_SEARCH - 8)
    while at >= 0:
        if at % 4 == 0 and at + 12 <= len(data):  # the whole header, not a magic cut short
            words = (int.from_bytes(data[at + i : at + i + 4], "little") for i in (0, 4, 8))
            if sum(words) & 0xFFFF_FFFF == 0:
                return at
        at = data.find(MULTIBOOT_MAGIC, at + 1, MULTIBOOT_SEARCH - 8)
    return None


def is_multiboot(image: bytes) -> bool:
    return find_multiboot_header(image) is not None


def read_image(path: str, what: str, limit: int) -> bytes:
    """The kernel, initrd or module at ``path``: a regular file of at most ``limit``
    bytes (the guest's RAM: nothing larger can be loaded), opened without blocking
    (kvmm/files.py). A FIFO, a device (``/dev/zero``) or a larger file: KernelImageError."""
    from ..files import read_file

    return read_file(path, what, limit, KernelImageError)


# A flat binary is loaded and entered where kvmtool puts one: 1000:0000 in real mode.
FLAT_MAX_SIZE = VGA_HOLE - FLAT_LOAD_ADDR  # up to the legacy VGA hole


def load_flat(mem: GuestMemory, image: bytes, name: str = "kernel") -> BootInfo:
    """A flat real-mode binary (a tiny test or benchmark guest every VMM can start):
    copied to :data:`FLAT_LOAD_ADDR` and entered at its first byte in real mode."""
    if not image:
        raise KernelImageError(f"{name}: the flat image is empty")
    if len(image) > FLAT_MAX_SIZE:
        raise KernelImageError(f"{name}: a flat image must fit in {FLAT_MAX_SIZE >> 10} KiB below 640 KiB, "
                               f"this one is {len(image) >> 10} KiB")
    mem.write(FLAT_LOAD_ADDR, image)
    return BootInfo("flat", FLAT_LOAD_ADDR, 0, FLAT_LOAD_ADDR + len(image), None)


def load_linux(mem: GuestMemory, kernel: bytes, cmdline: str, initrd: bytes | None = None, name: str = "kernel",
               bzimage_decompressor: bool = False) -> BootInfo:
    """Load a Linux kernel image for a 64-bit direct boot and build its zero page.

    A bzImage's payload is decompressed on the host and its vmlinux loaded like an ELF
    ``--kernel`` (kvmm/loader/bzimage.py), unless ``bzimage_decompressor`` asks for the
    kernel's own decompressor (``--kernel-format bzimage``) or kvmm cannot read it. Either
    way the zero page carries the bzImage's own setup header (boot.rst)."""
    # Imported here: a flat-image start (tests, the start-up benchmark) needs neither parser.
    from .bzimage import is_bzimage, load_bzimage
    from .elf import ELF_MAGIC, load_elf

    if kernel[:4] == ELF_MAGIC:
        if bzimage_decompressor:
            raise KernelImageError(f"{name}: --kernel-format bzimage, but this is an ELF vmlinux, not a bzImage")
        elf = load_elf(mem, kernel, name)
        kind, entry, kernel_end = "vmlinux", elf.entry, elf.end
        zp = bp.ZeroPage()
    elif is_bzimage(kernel):
        bz = load_bzimage(mem, kernel, name, host_decompress=not bzimage_decompressor)
        kind, entry, kernel_end = "bzImage", bz.entry, bz.kernel_end
        zp = bp.ZeroPage(bz.header.setup_header)
        if bz.payload_format is not None:
            # misc.c's extract_kernel clears KASLR_FLAG ("intended for solely in-kernel use")
            # and sets it only when it randomised the kernel; the host path never does.
            zp.u8(bp.HDR_LOADFLAGS, zp.get_u8(bp.HDR_LOADFLAGS) & ~bp.KASLR_FLAG)
    else:
        raise KernelImageError(f"{name}: neither a multiboot kernel, an ELF vmlinux nor a bzImage")
    bp.write_cmdline(mem, cmdline, zp.get_u32(bp.HDR_CMDLINE_SIZE) or 255)
    zp.set_cmdline(bp.CMDLINE_ADDR)
    where = None
    if initrd is not None:
        addr = bp.place_initrd(mem, initrd, kernel_end, zp.get_u32(bp.HDR_INITRD_ADDR_MAX) or 0x37FF_FFFF)
        zp.set_ramdisk(addr, len(initrd))
        where = (addr, len(initrd))
    zp.set_e820(bp.e820_map(mem))
    mem.write(bp.BOOT_PARAMS_ADDR, zp.buf)
    LOG.debug("loaded %s: entry %#x, end %#x, initrd %s", kind, entry, kernel_end, where)
    return BootInfo(kind, entry, bp.BOOT_PARAMS_ADDR, kernel_end, where)
