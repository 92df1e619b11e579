"""The multiboot loader (kvmm/loader/multiboot.py) against the Multiboot 0.6.96 rules:
header (3.1), a.out kludge (3.1.3), ELF32 loading, boot information (3.3); and where
kvmm refuses, with status 10 (KernelImageError)."""

from __future__ import annotations

import struct

import pytest

from kvmm.errors import KernelImageError
from kvmm.loader import bootparams as bp
from kvmm.loader import find_multiboot_header, is_multiboot
from kvmm.loader import multiboot as mb
from kvmm.memory import GuestMemory

MAGIC = 0x1BADB002


def header(flags: int = 0, checksum: int | None = None, addresses: tuple[int, ...] | None = None) -> bytes:
    csum = (-(MAGIC + flags)) & 0xFFFF_FFFF if checksum is None else checksum
    out = struct.pack("<III", MAGIC, flags, csum)
    if addresses is not None:
        out += struct.pack("<5I", *addresses)
    return out


def elf32(segments: list[tuple[int, int, bytes, int]], entry: int, mb_header: bytes | None = None,
          ei_class: int = 1, machine: int = 3) -> bytes:
    """An ELF32 executable: ``segments`` is [(vaddr, paddr, data, memsz)]; the multiboot
    header right after the program headers (as a linker puts it at the start of .text)."""
    mb_header = header() if mb_header is None else mb_header
    phoff = 52
    head_end = phoff + 32 * len(segments)
    hdr_at = (head_end + 3) & ~3
    data_off = hdr_at + len(mb_header)
    phdrs, blobs = b"", b""
    for vaddr, paddr, data, memsz in segments:
        phdrs += struct.pack("<IIIIIIII", 1, data_off + len(blobs), vaddr, paddr, len(data), memsz, 5, 4)
        blobs += data
    ident = b"\x7fELF" + bytes([ei_class, 1, 1]) + b"\0" * 9
    ehdr = struct.pack("<16sHHIIIIIHHHHHH", ident, 2, machine, 1, entry, phoff, 0, 0, 52, 32, len(segments), 40, 0, 0)
    return (ehdr + phdrs).ljust(hdr_at, b"\0") + mb_header + blobs


def aout(load_addr: int = 0x100000, text: bytes = b"\xf4" * 64, bss: int = 0x100, entry_off: int = 0x20,
         load_end: int | None = None) -> bytes:
    """A flat image with the a.out-kludge header first: loaded at ``load_addr``."""
    hdr = header(mb.HF_ADDRESSES | mb.HF_MEMORY_INFO, addresses=(
        load_addr, load_addr, load_addr + 32 + len(text) if load_end is None else load_end,
        load_addr + 32 + len(text) + bss, load_addr + entry_off))
    return hdr + text


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.allocate(32 << 20, check_available=False)


def modules(*specs: tuple[bytes, str]) -> list[mb.Module]:
    return [mb.Module(data, cmdline) for data, cmdline in specs]


# --- the header (3.1) ---------------------------------------------------------------------
def test_header_is_found_32bit_aligned_within_8k() -> None:
    image = bytes(100) + header() + bytes(100)
    assert find_multiboot_header(image) == 100 and is_multiboot(image)
    assert find_multiboot_header(bytes(8180) + header()) == 8180  # ends exactly at 8 KiB


def test_header_must_lie_completely_within_first_8192_bytes() -> None:
    assert find_multiboot_header(bytes(8184) + header()) is None


def test_regression_header_cut_short_by_the_end_of_the_image_is_no_header() -> None:
    # Found by the multiboot fuzz target: a magic 4 bytes before the end of a 12-byte
    # image, whose truncated words happened to sum to zero, was taken for a header and
    # its parse raised struct.error instead of KernelImageError.
    image = bytes.fromhex("0402b0ad1b02b0ad1bfe4f52e4")[1:]
    assert find_multiboot_header(image) is None
    with pytest.raises(KernelImageError, match="no multiboot header"):
        mb.parse_header(image)


def test_header_must_be_32bit_aligned() -> None:
    assert find_multiboot_header(bytes(102) + header()) is None


def test_header_checksum_must_make_the_sum_zero() -> None:
    assert find_multiboot_header(header(checksum=0x1234)) is None
    # A bad candidate does not hide a good one after it.
    assert find_multiboot_header(header(checksum=0) + header()) == 12


def test_required_flag_the_loader_does_not_understand_fails_the_load() -> None:
    # 3.1.2: bits 0-15 are requirements; an unknown one must fail the load.
    with pytest.raises(KernelImageError, match=r"requires features kvmm does not know \(flags 0x8\)"):
        mb.parse_header(header(flags=0x8))


def test_required_video_mode_fails_the_load() -> None:
    with pytest.raises(KernelImageError, match="video mode"):
        mb.parse_header(header(flags=mb.HF_VIDEO_MODE))


def test_unknown_optional_flags_are_ignored() -> None:
    # 3.1.2: bits 16-31 are optional; unknown ones may be ignored.
    h = mb.parse_header(elf32([(0x100000, 0x100000, b"\xf4", 1)], 0x100000, header(flags=0x0002_0003))[:200])
    assert h.flags == 0x0002_0003


def test_missing_header_is_refused() -> None:
    with pytest.raises(KernelImageError, match="no multiboot header"):
        mb.parse_header(bytes(9000))


def test_truncated_address_fields_are_refused() -> None:
    with pytest.raises(KernelImageError, match="address fields .* truncated"):
        mb.parse_header(header(mb.HF_ADDRESSES) + bytes(8))


# --- the a.out kludge (3.1.3) -------------------------------------------------------------
def test_aout_kludge_loads_text_at_load_addr_and_zeroes_bss(mem: GuestMemory) -> None:
    mem.write(0x100000, b"\xaa" * 0x200)
    image = aout(text=b"\x90" * 64, bss=0x100)
    boot = mb.load_multiboot(mem, image, "k", [])
    assert mem.read(0x100000, len(image)) == image
    assert mem.read(0x100000 + len(image), 0x100) == bytes(0x100)
    assert boot.entry == 0x100020 and boot.kernel_end == 0x100000 + len(image) + 0x100


def test_aout_kludge_load_end_zero_loads_the_rest_of_the_file(mem: GuestMemory) -> None:
    image = aout(load_end=0, bss=0) + b"tail"
    hdr = mb.parse_header(image)
    layout = mb.kernel_layout(image, hdr._replace(bss_end_addr=0))
    assert layout.segments[0].filesz == len(image)


@pytest.mark.parametrize("addresses,match", [
    ((0x100000, 0x100010, 0x100040, 0, 0x100010), "load_addr .* above header_addr"),
    ((0x100010, 0x100000, 0x100040, 0, 0x100010), "before the start of the file"),
    ((0x100000, 0x100000, 0x100000, 0, 0x100000), "load_end_addr .* not above load_addr"),
    ((0x100000, 0x100000, 0x200000, 0, 0x100000), "past the end of the file"),
    ((0x100000, 0x100000, 0x100020, 0x100010, 0x100000), "bss_end_addr .* below the end"),
])
def test_inconsistent_aout_addresses_are_refused(addresses: tuple[int, ...], match: str) -> None:
    image = header(mb.HF_ADDRESSES, addresses=addresses) + bytes(32)
    with pytest.raises(KernelImageError, match=match):
        mb.kernel_layout(image, mb.parse_header(image))


# --- ELF32 ---------------------------------------------------------------------------------
def test_elf32_segments_load_at_physical_addresses_and_entry_is_translated(mem: GuestMemory) -> None:
    # Linked at 3 GiB virtual, loaded at 1 MiB physical (a higher-half kernel).
    image = elf32([(0xC010_0000, 0x10_0000, b"code", 0x1000)], entry=0xC010_0002)
    boot = mb.load_multiboot(mem, image, "k", [])
    assert mem.read(0x100000, 4) == b"code" and mem.read(0x100004, 0xFFC) == bytes(0xFFC)
    assert boot.entry == 0x100002 and boot.kernel_end == 0x101000


@pytest.mark.parametrize("kwargs,match", [
    ({"ei_class": 2}, "must be 32-bit"),
    ({"machine": 62}, "must be for i386"),
])
def test_wrong_elf_kind_is_refused(kwargs: dict[str, int], match: str) -> None:
    image = elf32([(0x100000, 0x100000, b"x", 1)], 0x100000, **kwargs)
    with pytest.raises(KernelImageError, match=match):
        mb.kernel_layout(image, mb.parse_header(image))


def test_multiboot_header_without_addresses_needs_an_elf() -> None:
    image = header() + bytes(64)
    with pytest.raises(KernelImageError, match="must be an ELF file"):
        mb.kernel_layout(image, mb.parse_header(image))


def test_elf32_segment_past_end_of_file_is_refused() -> None:
    image = bytearray(elf32([(0x100000, 0x100000, b"abcd", 4)], 0x100000))
    with pytest.raises(KernelImageError, match="outside the file"):
        mb.kernel_layout(bytes(image[:-2]), mb.parse_header(bytes(image)))


# --- placement: RAM, kvmm's structures, overlaps -------------------------------------------
def test_load_address_outside_ram_is_refused(mem: GuestMemory) -> None:
    image = elf32([(0x4000000, 0x4000000, b"x", 1)], 0x4000000)  # 64 MiB, RAM is 32
    with pytest.raises(KernelImageError, match="outside guest RAM"):
        mb.load_multiboot(mem, image, "k", [])


def test_load_address_over_kvmms_reserved_area_is_refused(mem: GuestMemory) -> None:
    # The MP table lives at 0x9fc00 (the e820's reserved area up to 1 MiB).
    image = elf32([(0x9F000, 0x9F000, b"x" * 0x2000, 0x2000)], 0x9F000)
    with pytest.raises(KernelImageError, match="overlaps the reserved area 0x9fc00-0x100000"):
        mb.load_multiboot(mem, image, "k", [])


def test_overlapping_segments_are_refused(mem: GuestMemory) -> None:
    image = elf32([(0x100000, 0x100000, b"a" * 16, 0x1000), (0x100800, 0x100800, b"b", 16)], 0x100000)
    with pytest.raises(KernelImageError, match="segments at 0x100000 and 0x100800 overlap"):
        mb.load_multiboot(mem, image, "k", [])


def test_entry_outside_the_loaded_kernel_is_refused(mem: GuestMemory) -> None:
    image = elf32([(0x100000, 0x100000, b"a", 16)], 0x300000)
    with pytest.raises(KernelImageError, match="entry point 0x300000 is outside the loaded kernel"):
        mb.load_multiboot(mem, image, "k", [])


def test_placed_areas_that_overlap_are_refused() -> None:
    with pytest.raises(KernelImageError, match="module 1 at 0x101000-0x103000 overlaps module 0 at 0x100000-0x102000"):
        mb.check_disjoint([("module 0", 0x100000, 0x102000), ("module 1", 0x101000, 0x103000)])


def test_too_many_modules_are_refused() -> None:
    with pytest.raises(KernelImageError, match="65 multiboot modules: kvmm loads at most 64"):
        mb.parse_modules(",".join(["m"] * 65))


def test_too_many_modules_given_to_the_loader_are_refused(mem: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="at most 64"):
        mb.load_multiboot(mem, aout(), "k", modules(*[(b"m", "m")] * 65))


def test_module_that_does_not_fit_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match=r"multiboot module 0 \(big\) .* does not fit in guest RAM"):
        mb.load_multiboot(mem, aout(), "k", modules((bytes(40 << 20), "big arg")))


def test_nothing_is_written_when_placement_fails(mem: GuestMemory) -> None:
    with pytest.raises(KernelImageError):
        mb.load_multiboot(mem, aout(text=b"\x90" * 64), "k", modules((bytes(40 << 20), "big")))
    assert mem.read(0x100000, 64) == bytes(64)  # parse and place first, then write


def test_a_kernel_in_low_memory_gets_its_modules_above_1mib(mem: GuestMemory) -> None:
    # kvm-unit-tests' realmode.flat sits at 0x8000: a module larger than the room left
    # below the EBDA goes above 1 MiB.
    boot = mb.load_multiboot(mem, aout(load_addr=0x8000), "k", modules((bytes(0x100000), "big")))
    (start, end), = boot.modules
    assert start >= bp.HIMEM_START and end - start == 0x100000
    assert 0x8000 < boot.info < bp.EBDA_START  # the small info area fits right after the kernel


# --- the boot information (3.3) -----------------------------------------------------------
def read_info(mem: GuestMemory, addr: int) -> dict[str, object]:
    flags, lower, upper, _dev, cmdline, mods_count, mods_addr = struct.unpack("<7I", mem.read(addr, 28))
    mmap_length, mmap_addr = struct.unpack("<II", mem.read(addr + 44, 8))
    name = struct.unpack("<I", mem.read(addr + 64, 4))[0]

    def cstr(at: int) -> str:
        out = b""
        while (c := mem.read(at + len(out), 1)) != b"\0":
            out += c
        return out.decode()

    mmap, off = [], 0
    while off < mmap_length:
        size, base, length, kind = struct.unpack("<IQQI", mem.read(mmap_addr + off, 24))
        mmap.append(bp.E820Entry(base, length, kind))
        off += size + 4
    mods = []
    for i in range(mods_count):
        start, end, string, _ = struct.unpack("<4I", mem.read(mods_addr + 16 * i, 16))
        mods.append((start, end, cstr(string)))
    return {"flags": flags, "mem_lower": lower, "mem_upper": upper, "cmdline": cstr(cmdline), "mmap": mmap,
            "mods": mods, "loader": cstr(name)}


def test_info_memory_map_and_sizes_match_kvmms_e820(mem: GuestMemory) -> None:
    boot = mb.load_multiboot(mem, aout(), "kernel args", [])
    info = read_info(mem, boot.info)
    assert info["mmap"] == bp.e820_map(mem)
    assert info["mem_lower"] == bp.EBDA_START >> 10 == 639
    assert info["mem_upper"] == (32 << 20) - bp.HIMEM_START >> 10
    assert info["flags"] == mb.MBI_MEMORY | mb.MBI_CMDLINE | mb.MBI_MODS | mb.MBI_MMAP | mb.MBI_LOADER_NAME


def test_info_cmdline_modules_and_loader_name(mem: GuestMemory) -> None:
    mods = modules((b"first module", "/m/one a b"), (b"2" * 5000, "/m/two"))
    boot = mb.load_multiboot(mem, aout(), "/k/kernel x=1", mods)
    info = read_info(mem, boot.info)
    assert info["cmdline"] == "/k/kernel x=1" and info["loader"] == "kvmm"
    assert [(s, e) for s, e, _ in info["mods"]] == list(boot.modules)  # type: ignore[attr-defined]
    for (start, end, cmdline), m in zip(info["mods"], mods):  # type: ignore[call-overload]
        assert cmdline == m.cmdline and mem.read(start, end - start) == m.data
        assert start % 4096 == 0 and start >= boot.kernel_end  # page-aligned, after the kernel (flag 0)
    assert boot.modules[0][1] <= boot.modules[1][0]


def test_the_gdt_before_the_info_is_flat(mem: GuestMemory) -> None:
    boot = mb.load_multiboot(mem, aout(), "k", [])
    assert boot.gdt == boot.info - mb.INFO_OFFSET
    assert struct.unpack("<3Q", mem.read(boot.gdt, 24)) == mb.GDT_FLAT


def test_module_specs_follow_qemus_initrd_syntax() -> None:
    assert mb.parse_modules("a x y,b,c,,d", ["e f"]) == ["a x y", "b", "c,d", "e f"]
    assert mb.parse_modules(None, []) == []
    with pytest.raises(KernelImageError, match="names no file"):
        mb.parse_modules("a,,,", [])
