"""bzImage loader for the 64-bit boot protocol (Documentation/x86/boot.rst).

Two ways in:

- **the payload decompressed on the host** (the default for boot protocol 2.08+, which
  locates the compressed ``vmlinux`` with ``payload_offset``/``payload_length``): kvmm
  decompresses it (:mod:`kvmm.loader.payload`) and loads the ELF inside exactly as it
  loads ``--kernel vmlinux``, then enters ``startup_64`` at its physical link address.
  That is what the kernel's own decompressor would have done (arch/x86/boot/compressed/
  misc.c, ``extract_kernel``), minus KASLR: on x86-64 it applies the relocation table
  appended to the payload only when it chose a randomised *virtual* base
  (``handle_relocations``: ``delta = virt_addr - LOAD_PHYSICAL_ADDR``, zero without KASLR),
  and ``startup_64`` itself copes with its physical load address. So the table is left
  unread and the kernel runs at the addresses it was linked for, as a ``vmlinux`` does.
- **the kernel's own decompressor**: the protected-mode kernel is loaded at its preferred
  address (relocatable kernels) or at ``code32_start`` and entered at its 64-bit entry
  point, 0x200 bytes in. Chosen with ``--kernel-format bzimage``, and taken on its own for
  a payload kvmm cannot read (older protocol, unknown compressor, LZO without
  ``python-lzo``). On a software-nested KVM this is minutes of emulated decompression.
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from ..errors import GuestMemoryError, KernelImageError
from ..memory import GuestMemory
from . import bootparams as bp

if TYPE_CHECKING:
    from .payload import Payload

LOG = logging.getLogger(__name__)

MIN_VERSION = 0x0206  # cmdline_size; kvmm needs it and 64-bit kernels all have it
PAYLOAD_VERSION = 0x0208  # payload_offset/payload_length
INIT_SIZE_VERSION = 0x020A  # pref_address/init_size
ENTRY_64_OFFSET = 0x200


@dataclass(frozen=True)
class BzImage:
    """A parsed bzImage: the setup header fields the 64-bit boot protocol uses (boot.rst)."""

    version: int
    setup_header: bytes
    pm_offset: int  # where the protected-mode kernel starts in the file: (setup_sects + 1) * 512
    load_addr: int
    relocatable: bool
    initrd_addr_max: int
    cmdline_size: int
    init_size: int
    payload: tuple[int, int] | None  # (offset in the file, length); None before 2.08 or if unset

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
    pm_offset = (setup_sects + 1) * 512
    if pm_offset >= len(image):
        raise KernelImageError(f"{name}: truncated bzImage: no protected-mode kernel after {setup_sects} setup sectors")
    header_end = bp.HDR_HEADER + u8(bp.HDR_JUMP + 1)  # the jump at 0x200 skips the header
    relocatable = version >= 0x0205 and bool(u8(bp.HDR_RELOCATABLE))
    load_addr = u32(bp.HDR_CODE32_START)
    if relocatable and version >= INIT_SIZE_VERSION:
        load_addr = struct.unpack_from("<Q", image, bp.HDR_PREF_ADDRESS)[0]
    init_size = u32(bp.HDR_INIT_SIZE) if version >= INIT_SIZE_VERSION else 0
    payload = None
    # boot.rst, payload_offset (2.08+): "from the beginning of the protected-mode code".
    if version >= PAYLOAD_VERSION and u32(bp.HDR_PAYLOAD_OFFSET):
        start, length = pm_offset + u32(bp.HDR_PAYLOAD_OFFSET), u32(bp.HDR_PAYLOAD_LENGTH)
        if start + length > len(image):
            raise KernelImageError(f"{name}: truncated bzImage: its {length}-byte payload at offset {start:#x} "
                                   f"runs past the end of the file ({len(image)} bytes)")
        payload = (start, length)
    return BzImage(
        version=version,
        setup_header=bytes(image[bp.HDR_SETUP_SECTS:header_end]),
        pm_offset=pm_offset,
        load_addr=load_addr,
        relocatable=relocatable,
        initrd_addr_max=u32(bp.HDR_INITRD_ADDR_MAX),
        cmdline_size=u32(bp.HDR_CMDLINE_SIZE),
        init_size=init_size,
        payload=payload,
    )


def output_limit(bz: BzImage, ram_size: int) -> int:
    """The most bytes kvmm lets ``bz``'s payload decompress to: the guest's RAM (the
    ``vmlinux`` has to fit in it), ``init_size`` where the kernel states it (header.S makes
    INIT_SIZE at least the decompressed size plus the decompressor, since the kernel
    decompresses within that much memory itself), and :data:`payload.MAX_OUTPUT`."""
    from .payload import MAX_OUTPUT

    limit = min(ram_size, MAX_OUTPUT)
    if bz.version >= INIT_SIZE_VERSION:
        limit = min(limit, bz.init_size)
    return limit


def extract_vmlinux(image: bytes, bz: BzImage, limit: int, name: str = "kernel") -> Payload:
    """The payload of ``bz`` decompressed (a :class:`kvmm.loader.payload.Payload`).
    Raises :class:`~kvmm.loader.payload.UnreadablePayload` where only the kernel's own
    decompressor can boot it, :class:`KernelImageError` where nothing can."""
    from .payload import UnreadablePayload, decompress

    if bz.payload is None:
        v = bz.version
        raise UnreadablePayload(f"boot protocol {v >> 8}.{v & 0xFF:02d} does not locate its payload "
                                "(payload_offset is 2.08+)" if v < PAYLOAD_VERSION else "its payload_offset is 0")
    start, length = bz.payload
    out = decompress(memoryview(image)[start : start + length], limit, f"{name}: bzImage payload")
    if out.data[:4] != b"\x7fELF":
        raise KernelImageError(f"{name}: the bzImage's {out.format} payload is not an ELF vmlinux")
    return out


class LoadedBzImage(NamedTuple):
    """What :func:`load_bzimage` put in guest memory and where the vCPU starts."""

    header: BzImage
    entry: int
    kernel_end: int
    payload_format: str | None  # decompressed on the host: its compressor; None: the kernel's decompressor runs


def load_bzimage(mem: GuestMemory, image: bytes, name: str = "kernel", host_decompress: bool = True) -> LoadedBzImage:
    """Load a bzImage: its payload decompressed on the host where kvmm can read it and
    ``host_decompress`` is set, else for its own decompressor. Logs which way it went."""
    bz = parse_bzimage(image, name)
    why = "--kernel-format bzimage"
    if host_decompress:
        from .elf import load_elf
        from .payload import UnreadablePayload

        started = time.monotonic()
        try:
            vmlinux = extract_vmlinux(image, bz, output_limit(bz, mem.size), name)
        except UnreadablePayload as exc:
            why = str(exc)
        else:
            elf = load_elf(mem, vmlinux.data, f"{name} (its {vmlinux.format} payload)")
            LOG.info("bzImage: %s payload %s on the host (%.1f MiB in %.2f s), entering the kernel at %#x",
                     vmlinux.format, "read" if vmlinux.format == "uncompressed" else "decompressed",
                     len(vmlinux.data) / (1 << 20), time.monotonic() - started, elf.entry)
            return LoadedBzImage(bz, elf.entry, elf.end, vmlinux.format)
    payload = memoryview(image)[bz.pm_offset :]
    # The decompressor needs init_size bytes from the load address (boot.rst, init_size).
    need = max(len(payload), bz.init_size)
    if not mem.contains(bz.load_addr, need):
        raise KernelImageError(f"{name}: needs {need >> 20} MiB of RAM at {bz.load_addr:#x}: give more --mem")
    try:
        mem.write(bz.load_addr, payload)
    except GuestMemoryError as exc:  # pragma: no cover - contains() above covers it
        raise KernelImageError(str(exc)) from None
    LOG.info("bzImage: %s: entering its own decompressor at %#x", why, bz.entry)
    return LoadedBzImage(bz, bz.entry, bz.load_addr + need, None)
