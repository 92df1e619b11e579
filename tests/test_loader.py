"""Kernel loaders: ELF vmlinux and bzImage, zero page, e820, initrd, command line."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kvmm.errors import KernelImageError
from kvmm.loader import bootparams as bp
from kvmm.loader import load_linux
from kvmm.loader.bzimage import parse_bzimage
from kvmm.loader.elf import parse_elf
from kvmm.memory import GuestMemory
from kernel_images import make_bzimage, make_elf


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.allocate(64 << 20, check_available=False)


def zero_page(mem: GuestMemory) -> bp.ZeroPage:
    zp = bp.ZeroPage()
    zp.buf[:] = mem.read(bp.BOOT_PARAMS_ADDR, bp.ZERO_PAGE_SIZE)
    return zp


# --- ELF -----------------------------------------------------------------------------------
def test_elf_segments_loaded_at_physical_address_and_bss_zeroed(mem: GuestMemory) -> None:
    mem.fill(0x200000, 64, 0xAA)
    info = load_linux(mem, make_elf(segments=[(0x200000, b"code", 64)]), "console=ttyS0")
    assert info.kind == "vmlinux" and info.entry == 0x200000
    assert mem.read(0x200000, 4) == b"code"
    assert mem.read(0x200004, 60) == b"\0" * 60
    assert info.kernel_end == 0x200040


@pytest.mark.parametrize(
    "image,match",
    [
        (b"\x7fELF\x02\x01", "truncated ELF header"),
        (make_elf(ei_class=1), "not a 64-bit"),
        (make_elf(machine=3), "not an x86-64 executable"),
        (make_elf(e_type=3), "not an x86-64 executable"),
        (make_elf(segments=[]), "program headers missing"),
        (make_elf()[:-8], "outside the file"),
    ],
)
def test_malformed_elf_is_refused(image: bytes, match: str) -> None:
    with pytest.raises(KernelImageError, match=match):
        parse_elf(image)


def test_elf_segment_outside_ram_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="does not fit in guest RAM"):
        load_linux(mem, make_elf(segments=[(0x3FFFFF0, b"x" * 64, 64)]), "")


def test_elf_entry_outside_ram_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="entry point"):
        load_linux(mem, make_elf(entry=0xD0000000), "")


def test_unknown_format_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="neither"):
        load_linux(mem, b"MZ" + b"\0" * 4096, "")


# --- bzImage ---------------------------------------------------------------------------------
def test_bzimage_loaded_at_preferred_address_with_64bit_entry(mem: GuestMemory) -> None:
    img = make_bzimage(payload=b"PAYLOAD!" * 16)
    info = load_linux(mem, img, "console=ttyS0")
    assert info.kind == "bzImage"
    assert info.entry == 0x1000000 + 0x200
    assert mem.read(0x1000000, 8) == b"PAYLOAD!"
    zp = zero_page(mem)
    # The setup header is copied into the zero page, and the loader fields are ours.
    assert zp.get_u32(bp.HDR_HEADER) == bp.HDRS_MAGIC
    assert zp.get_u8(bp.HDR_TYPE_OF_LOADER) == bp.LOADER_TYPE_UNDEFINED
    assert zp.get_u32(bp.HDR_CMD_LINE_PTR) == bp.CMDLINE_ADDR


def test_non_relocatable_bzimage_loads_at_code32_start(mem: GuestMemory) -> None:
    info = load_linux(mem, make_bzimage(relocatable=0), "")
    assert info.entry == 0x100000 + 0x200


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"version": 0x0205}, "too old"),
        ({"xloadflags": 0}, "32-bit kernel"),
        ({"loadflags": 0}, "zImage"),
    ],
)
def test_unsupported_bzimage_is_refused(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(KernelImageError, match=match):
        parse_bzimage(make_bzimage(**kwargs))


def test_truncated_bzimage_is_refused() -> None:
    img = make_bzimage()
    with pytest.raises(KernelImageError, match="truncated"):
        parse_bzimage(img[: 5 * 512])
    with pytest.raises(KernelImageError, match="truncated"):
        parse_bzimage(img[:0x100])


def test_bzimage_that_needs_more_ram_is_refused() -> None:
    small = GuestMemory.allocate(16 << 20, check_available=False)
    with pytest.raises(KernelImageError, match="give more --mem"):
        load_linux(small, make_bzimage(init_size=32 << 20), "")


# --- zero page, e820, command line, initrd -------------------------------------------------------
def test_e820_reserves_ebda_and_bios_area(mem: GuestMemory) -> None:
    load_linux(mem, make_elf(), "")
    e820 = zero_page(mem).e820()
    assert e820[0] == bp.E820Entry(0, bp.EBDA_START, bp.E820_RAM)
    assert e820[1].type == bp.E820_RESERVED and e820[1].addr == bp.EBDA_START
    assert e820[2] == bp.E820Entry(0x100000, (64 << 20) - 0x100000, bp.E820_RAM)


def test_e820_describes_ram_above_4g() -> None:
    big = GuestMemory.allocate(5 << 30, check_available=False)
    e820 = bp.e820_map(big)
    assert e820[-1] == bp.E820Entry(0x1_0000_0000, (5 << 30) - 0xC000_0000, bp.E820_RAM)
    assert e820[-2] == bp.E820Entry(0x100000, 0xC000_0000 - 0x100000, bp.E820_RAM)


def test_cmdline_written_nul_terminated(mem: GuestMemory) -> None:
    load_linux(mem, make_elf(), "console=ttyS0 root=/dev/vda")
    assert mem.read(bp.CMDLINE_ADDR, 28) == b"console=ttyS0 root=/dev/vda\0"


def test_cmdline_longer_than_kernel_accepts_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="command line"):
        load_linux(mem, make_bzimage(), "x" * 3000)


def test_initrd_placed_at_top_of_ram_page_aligned(mem: GuestMemory) -> None:
    initrd = b"INITRD" * 1000
    info = load_linux(mem, make_elf(), "", initrd)
    assert info.initrd is not None
    addr, size = info.initrd
    assert size == len(initrd) and addr % 4096 == 0 and addr + size <= 64 << 20
    assert mem.read(addr, 6) == b"INITRD"
    zp = zero_page(mem)
    assert zp.get_u32(bp.HDR_RAMDISK_IMAGE) == addr and zp.get_u32(bp.HDR_RAMDISK_SIZE) == size


def test_initrd_respects_initrd_addr_max(mem: GuestMemory) -> None:
    img = bytearray(make_bzimage())
    struct.pack_into("<I", img, bp.HDR_INITRD_ADDR_MAX, 0x1FFFFFF)  # 32 MiB - 1
    info = load_linux(mem, bytes(img), "", b"x" * 8192)
    assert info.initrd is not None and info.initrd[0] + 8192 <= 0x2000000


def test_initrd_that_does_not_fit_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="initrd"):
        load_linux(mem, make_elf(), "", b"x" * (63 << 20))


# --- the real guest kernel ----------------------------------------------------------------------
@pytest.mark.kvm
def test_real_bzimage_entered_through_its_own_decompressor(kernel_dir: Path) -> None:
    image = (kernel_dir / "bzImage").read_bytes()
    mem = GuestMemory.allocate(256 << 20, check_available=False)
    bz = load_linux(mem, image, "console=ttyS0", bzimage_decompressor=True)
    hdr = parse_bzimage(image)
    assert hdr.version >= 0x020F
    # boot.rst: a non-relocatable kernel runs at code32_start (1 MiB), a relocatable one
    # at pref_address; the 64-bit entry is 0x200 bytes in.
    assert bz.kind == "bzImage" and bz.entry == (hdr.load_addr if hdr.relocatable else 0x100000) + 0x200
    assert mem.read(hdr.load_addr, 64) == image[hdr.pm_offset : hdr.pm_offset + 64]


@pytest.mark.kvm
def test_real_bzimage_payload_loads_as_its_vmlinux_does(kernel_dir: Path) -> None:
    # The host-decompressed payload puts every PT_LOAD segment where the vmlinux of the
    # same build puts it, byte for byte, and is entered at the same startup_64.
    vmlinux = (kernel_dir / "vmlinux").read_bytes()
    mem = GuestMemory.allocate(256 << 20, check_available=False)
    info = load_linux(mem, vmlinux, "console=ttyS0")
    assert info.kind == "vmlinux" and info.entry == 0x1000000  # phys_startup_64
    mem2 = GuestMemory.allocate(256 << 20, check_available=False)
    bz = load_linux(mem2, (kernel_dir / "bzImage").read_bytes(), "console=ttyS0")
    assert (bz.kind, bz.entry, bz.kernel_end) == ("bzImage", info.entry, info.kernel_end)
    for seg in parse_elf(vmlinux).segments:
        assert mem2.read(seg.paddr, seg.memsz) == mem.read(seg.paddr, seg.memsz), hex(seg.paddr)


def test_flat_image_is_loaded_at_1000_0000(mem: GuestMemory) -> None:
    from kvmm.loader import FLAT_LOAD_ADDR, load_flat

    info = load_flat(mem, b"\xfa\xf4" * 100)
    assert (info.kind, info.entry, FLAT_LOAD_ADDR) == ("flat", 0x10000, 0x10000)
    assert mem.read(0x10000, 200) == b"\xfa\xf4" * 100


@pytest.mark.parametrize("image,match", [(b"", "empty"), (bytes(0x90001), "must fit in 576 KiB")])
def test_flat_image_too_large_or_empty_is_refused(mem: GuestMemory, image: bytes, match: str) -> None:
    from kvmm.loader import load_flat

    with pytest.raises(KernelImageError, match=match):
        load_flat(mem, image)
