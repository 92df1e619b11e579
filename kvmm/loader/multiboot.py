"""Multiboot (version 1) kernels: header, loading, boot modules and ``multiboot_info``.

Everything here follows the Multiboot Specification 0.6.96 (section numbers below are
that document's): the header (3.1) is found in the first 8 KiB of the image, 32-bit
aligned; the kernel is loaded from its ELF32 program headers or, when header flag 16 is
set, from the header's own addresses (the "a.out kludge", 3.1.3); the boot information
(3.3) carries the memory sizes and map (from kvmm's e820 map), the command line, the
boot modules and the boot loader's name. The vCPU is then entered in 32-bit protected
mode as 3.2 "Machine state" says (kvmm.x86.setup_protected_mode).

Where kvmm puts things (guest-physical), decided here and checked before anything is
written: the kernel's segments where its headers say (inside RAM, clear of the reserved
area below 1 MiB that holds kvmm's MP table, not overlapping each other); then, from the
first page after the kernel, the boot information area (a GDT with flat 32-bit code and
data descriptors, the ``multiboot_info``, the memory map, the strings and the module
list), then each module on its own page, in order (as GRUB and QEMU place them). An area
that does not fit below a memory hole moves to the next RAM range.

The command line a kernel sees is its file name, a space and the user's arguments, as
GRUB and QEMU pass it (kvm-unit-tests take the first word as argv[0]). A module's command
line is its whole specification: its path, then any arguments.
"""

from __future__ import annotations

import logging
import struct
from typing import NamedTuple, Sequence

from ..errors import GuestMemoryError, KernelImageError
from ..memory import GuestMemory
from . import bootparams as bp
from . import find_multiboot_header

LOG = logging.getLogger(__name__)

HEADER_MAGIC = 0x1BADB002  # 3.1.2
BOOTLOADER_MAGIC = 0x2BADB002  # 3.2: EAX on entry
HEADER_SEARCH = 8192  # 3.1.1: "contained completely within the first 8192 bytes"
MAX_MODULES = 64  # kvmm's bound: the module list and strings stay within one small area

# Header flags (3.1.2). Bits 0-15 are requirements: one that kvmm does not understand
# or cannot satisfy must fail the load. Bits 16-31 are optional.
HF_PAGE_ALIGN = 1 << 0  # modules on 4 KiB boundaries (kvmm always does that)
HF_MEMORY_INFO = 1 << 1  # mem_* (and mmap_*) wanted (kvmm always gives both)
HF_VIDEO_MODE = 1 << 2  # a video mode table: kvmm has no display
HF_ADDRESSES = 1 << 16  # the header's address fields are valid (the a.out kludge)
HF_UNDERSTOOD = HF_PAGE_ALIGN | HF_MEMORY_INFO

# multiboot_info flags (3.3).
MBI_MEMORY = 1 << 0
MBI_CMDLINE = 1 << 2
MBI_MODS = 1 << 3
MBI_MMAP = 1 << 6
MBI_LOADER_NAME = 1 << 9
MBI_SIZE = 88  # up to and including the APM table field; kvmm sets no flag past bit 10

_HEADER = struct.Struct("<III")
_ADDRESSES = struct.Struct("<IIIII")
_MODULE = struct.Struct("<IIII")  # mod_start, mod_end, string, reserved
_MMAP = struct.Struct("<IQQI")  # size (of the rest: 20), base_addr, length, type
_ELF32_EHDR = struct.Struct("<16sHHIIIIIHHHHHH")
_ELF32_PHDR = struct.Struct("<IIIIIIII")
ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
EM_386 = 3
# null; 0x08: 32-bit code, execute/read; 0x10: data, read/write; base 0, limit 4 GiB, both
# marked accessed, as a CPU leaves a descriptor it loaded (VMX requires it of CS).
GDT_FLAT = (0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF)
CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
PAGE = 0x1000
LOADER_NAME = "kvmm"
# Below 1 MiB, the e820 map reserves the EBDA and BIOS area: kvmm's MP table lives there.
RESERVED_LOW = (bp.EBDA_START, bp.HIMEM_START)


class Header(NamedTuple):
    """A multiboot header found at ``offset`` in the image (3.1)."""

    offset: int
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


class Segment(NamedTuple):
    """``filesz`` bytes of the image at ``offset`` go to ``addr``; zeros up to ``memsz``."""

    offset: int
    addr: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.addr + self.memsz


class KernelLayout(NamedTuple):
    entry: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)


class Module(NamedTuple):
    """A boot module: its bytes and its command line (path and arguments)."""

    data: bytes
    cmdline: str


class MultibootBoot(NamedTuple):
    """Where things went: ``info`` is EBX on entry, ``gdt`` a flat GDT of 3 descriptors."""

    entry: int
    info: int
    gdt: int
    kernel_end: int
    modules: tuple[tuple[int, int], ...]  # (start, end) of each module


def find_header(image: bytes | memoryview) -> int | None:
    """The offset of the multiboot header (kvmm.loader.find_multiboot_header), or None."""
    return find_multiboot_header(image)


def parse_header(image: bytes, name: str = "kernel") -> Header:
    """The image's multiboot header, validated: KernelImageError when it is absent or asks
    for what kvmm cannot give."""
    at = find_header(image)
    if at is None:
        raise KernelImageError(f"{name}: no multiboot header (magic {HEADER_MAGIC:#x} with a valid checksum, "
                               f"32-bit aligned) in the first {HEADER_SEARCH} bytes")
    _, flags, _ = _HEADER.unpack_from(image, at)
    unknown = flags & 0xFFFF & ~HF_UNDERSTOOD
    if unknown & HF_VIDEO_MODE:
        raise KernelImageError(f"{name}: the multiboot header requires a video mode (flag 2); kvmm has no display")
    if unknown:
        # 3.1.2: a required feature the boot loader does not understand must fail the load.
        raise KernelImageError(f"{name}: the multiboot header requires features kvmm does not know (flags {unknown:#x})")
    if not flags & HF_ADDRESSES:
        return Header(at, flags)
    if at + _HEADER.size + _ADDRESSES.size > len(image):
        raise KernelImageError(f"{name}: the multiboot header's address fields (flag 16) are truncated")
    return Header(at, flags, *_ADDRESSES.unpack_from(image, at + _HEADER.size))


def _aout_layout(image: bytes, h: Header, name: str) -> KernelLayout:
    """3.1.3: the header's physical addresses say what to load. The text starts at file
    offset ``header offset - (header_addr - load_addr)``; load_end_addr 0 means to the
    end of the file, bss_end_addr 0 means no bss."""
    if h.load_addr > h.header_addr:
        raise KernelImageError(f"{name}: multiboot load_addr {h.load_addr:#x} lies above header_addr {h.header_addr:#x} "
                               "(3.1.3: the header must be inside the loaded text)")
    offset = h.offset - (h.header_addr - h.load_addr)
    if offset < 0:
        raise KernelImageError(f"{name}: multiboot header_addr {h.header_addr:#x} - load_addr {h.load_addr:#x} "
                               f"points before the start of the file")
    if h.load_end_addr == 0:
        filesz = len(image) - offset
    elif h.load_end_addr <= h.load_addr:
        raise KernelImageError(f"{name}: multiboot load_end_addr {h.load_end_addr:#x} is not above load_addr {h.load_addr:#x}")
    else:
        filesz = h.load_end_addr - h.load_addr
        if offset + filesz > len(image):
            raise KernelImageError(f"{name}: multiboot load_end_addr {h.load_end_addr:#x} lies past the end of the file "
                                   "(truncated image?)")
    memsz = filesz
    if h.bss_end_addr:
        if h.bss_end_addr < h.load_addr + filesz:
            raise KernelImageError(f"{name}: multiboot bss_end_addr {h.bss_end_addr:#x} lies below the end of the "
                                   f"loaded text {h.load_addr + filesz:#x}")
        memsz = h.bss_end_addr - h.load_addr
    if memsz == 0:
        raise KernelImageError(f"{name}: the multiboot header loads nothing")
    return KernelLayout(h.entry_addr, (Segment(offset, h.load_addr, filesz, memsz),))


def _elf_layout(image: bytes, name: str) -> KernelLayout:
    """The PT_LOAD segments of an ELF32 image at their physical addresses; the entry
    point translated from virtual to physical through the segment that holds it."""
    if image[:4] != ELF_MAGIC:
        raise KernelImageError(f"{name}: a multiboot kernel without the header's address fields (flag 16) "
                               "must be an ELF file")
    if len(image) < _ELF32_EHDR.size:
        raise KernelImageError(f"{name}: truncated ELF header ({len(image)} bytes)")
    ident, _type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_ = _ELF32_EHDR.unpack_from(image)
    if ident[4] != 1 or ident[5] != 1:
        raise KernelImageError(f"{name}: a multiboot ELF kernel must be 32-bit little-endian (ELFCLASS32); "
                               "a 64-bit one needs the header's address fields (flag 16)")
    if machine != EM_386:
        raise KernelImageError(f"{name}: a multiboot ELF kernel must be for i386 (machine {machine})")
    if phentsize != _ELF32_PHDR.size or phnum == 0 or phoff + phnum * phentsize > len(image):
        raise KernelImageError(f"{name}: ELF program headers missing or truncated")
    segments = []
    physical_entry = None
    for i in range(phnum):
        p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _pflags, _align = _ELF32_PHDR.unpack_from(image, phoff + i * phentsize)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(image):
            raise KernelImageError(f"{name}: ELF segment {i} lies outside the file (truncated image?)")
        segments.append(Segment(p_offset, p_paddr, p_filesz, p_memsz))
        if physical_entry is None and p_vaddr <= entry < p_vaddr + p_memsz:
            physical_entry = p_paddr + (entry - p_vaddr)
    if not segments:
        raise KernelImageError(f"{name}: no loadable ELF segments")
    return KernelLayout(entry if physical_entry is None else physical_entry, tuple(segments))


def kernel_layout(image: bytes, header: Header, name: str = "kernel") -> KernelLayout:
    """Where the kernel's bytes go and where it starts (pure: nothing is written)."""
    if header.flags & HF_ADDRESSES:
        return _aout_layout(image, header, name)
    return _elf_layout(image, name)


def parse_modules(initrd: str | None, modules: Sequence[str] = ()) -> list[str]:
    """Module specifications in boot order: ``--initrd`` as QEMU's ``-initrd`` for a
    multiboot kernel (comma-separated ``PATH[ ARGS]``, ``,,`` for a comma in a name),
    then each ``--module PATH[ ARGS]`` as given."""
    specs: list[str] = []
    if initrd:
        current = ""
        i = 0
        while i < len(initrd):
            if initrd.startswith(",,", i):
                current += ","
                i += 2
            elif initrd[i] == ",":
                specs.append(current)
                current = ""
                i += 1
            else:
                current += initrd[i]
                i += 1
        specs.append(current)
    specs.extend(modules)
    for spec in specs:
        if not spec.split(" ", 1)[0]:
            raise KernelImageError(f"a multiboot module specification names no file: {spec!r}")
    if len(specs) > MAX_MODULES:
        raise KernelImageError(f"{len(specs)} multiboot modules: kvmm loads at most {MAX_MODULES}")
    return specs


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def usable_ranges(e820: Sequence[bp.E820Entry]) -> list[tuple[int, int]]:
    """RAM ranges of the e820 map, as (start, end), in address order."""
    return sorted((e.addr, e.addr + e.size) for e in e820 if e.type == bp.E820_RAM)


def check_kernel_placement(layout: KernelLayout, ram: Sequence[tuple[int, int]], name: str = "kernel") -> None:
    """Every segment inside one RAM range of the map (so clear of the reserved area that
    holds kvmm's MP table and of the MMIO hole), no two segments overlapping, the entry
    point inside a segment."""
    for s in layout.segments:
        where = (s.addr, s.end)
        if s.end > 1 << 32:
            raise KernelImageError(f"{name}: segment at {s.addr:#x} (+{s.memsz:#x}) ends above 4 GiB")
        if _overlap(where, RESERVED_LOW):
            raise KernelImageError(f"{name}: segment at {s.addr:#x} (+{s.memsz:#x}) overlaps the reserved area "
                                   f"{RESERVED_LOW[0]:#x}-{RESERVED_LOW[1]:#x} (kvmm's MP table, the BIOS area)")
        if not any(lo <= s.addr and s.end <= hi for lo, hi in ram):
            raise KernelImageError(f"{name}: segment at {s.addr:#x} (+{s.memsz:#x}) is outside guest RAM: give more --mem")
    ordered = sorted(layout.segments, key=lambda s: s.addr)
    for a, b in zip(ordered, ordered[1:]):
        if _overlap((a.addr, a.end), (b.addr, b.end)):
            raise KernelImageError(f"{name}: segments at {a.addr:#x} and {b.addr:#x} overlap")
    if not any(s.addr <= layout.entry < s.end for s in layout.segments):
        raise KernelImageError(f"{name}: entry point {layout.entry:#x} is outside the loaded kernel")


class Allocator:
    """First-fit placement in RAM from a starting address upwards, skipping the holes of
    the memory map and everything placed so far."""

    def __init__(self, ram: Sequence[tuple[int, int]], start: int, taken: Sequence[tuple[int, int]] = ()) -> None:
        self.ram = list(ram)
        self.cursor = start
        self.taken = list(taken)

    def place(self, size: int, what: str) -> int:
        """A page-aligned address for ``size`` bytes: the first free one from the cursor
        up, else from 1 MiB up (below the kernel), else KernelImageError."""
        for start in (self.cursor, bp.HIMEM_START):
            for lo, hi in self.ram:
                addr = _align(max(lo, start), PAGE)
                while addr + size <= min(hi, 1 << 32):
                    clash = next((t for t in self.taken if _overlap((addr, addr + max(size, 1)), t)), None)
                    if clash is None:
                        self.taken.append((addr, addr + max(size, 1)))
                        self.cursor = addr + size
                        return addr
                    addr = _align(clash[1], PAGE)
        raise KernelImageError(f"{what} ({size} bytes) does not fit in guest RAM below 4 GiB: give more --mem")


def check_disjoint(placed: Sequence[tuple[str, int, int]]) -> None:
    """Nothing kvmm placed overlaps anything else: ``(what, start, end)`` triples."""
    ordered = sorted(placed, key=lambda p: p[1])
    for (wa, sa, ea), (wb, sb, eb) in zip(ordered, ordered[1:]):
        if sb < ea and sa < eb:
            raise KernelImageError(f"{wb} at {sb:#x}-{eb:#x} overlaps {wa} at {sa:#x}-{ea:#x}")


def _mmap(e820: Sequence[bp.E820Entry]) -> bytes:
    """3.3 memory map: each entry preceded by its size (20), in the e820's order."""
    return b"".join(_MMAP.pack(_MMAP.size - 4, e.addr, e.size, e.type) for e in e820)


def build_info(base: int, e820: Sequence[bp.E820Entry], cmdline: str, modules: Sequence[tuple[int, int, str]],
               loader_name: str = LOADER_NAME) -> bytes:
    """The boot information area to be written at ``base``: the flat GDT, then
    ``multiboot_info`` (at ``base + 24``), the memory map, the module list and the
    strings. ``modules``: (start, end, cmdline) of each module (3.3, "mods_*")."""
    gdt = struct.pack("<3Q", *GDT_FLAT)
    info_at = base + len(gdt)
    tail = bytearray()
    tail_at = info_at + MBI_SIZE

    def put(data: bytes, align: int = 1) -> int:
        tail.extend(bytes(_align(len(tail), align) - len(tail)))
        addr = tail_at + len(tail)
        tail.extend(data)
        return addr

    mmap = _mmap(e820)
    mmap_addr = put(mmap, 8)
    mods_addr = put(bytes(_MODULE.size * len(modules)), 4)
    mod_list = bytearray()
    for start, end, mod_cmdline in modules:
        mod_list += _MODULE.pack(start, end, put(mod_cmdline.encode() + b"\0"), 0)
    tail[mods_addr - tail_at : mods_addr - tail_at + len(mod_list)] = mod_list
    cmdline_addr = put(cmdline.encode() + b"\0")
    name_addr = put(loader_name.encode() + b"\0")
    low_kib = next((e.size for e in e820 if e.addr == 0 and e.type == bp.E820_RAM), 0) >> 10
    upper = next((e for e in e820 if e.addr == bp.HIMEM_START and e.type == bp.E820_RAM), None)
    flags = MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME
    info = bytearray(MBI_SIZE)
    struct.pack_into("<IIII", info, 0, flags, min(low_kib, 640), (upper.size >> 10) if upper else 0, 0)
    struct.pack_into("<III", info, 16, cmdline_addr, len(modules), mods_addr if modules else 0)
    struct.pack_into("<II", info, 44, len(mmap), mmap_addr)
    struct.pack_into("<I", info, 64, name_addr)
    return gdt + bytes(info) + bytes(tail)


INFO_OFFSET = 24  # multiboot_info's offset in the area build_info makes (after the GDT)


def load_multiboot(mem: GuestMemory, image: bytes, cmdline: str, modules: Sequence[Module],
                   name: str = "kernel", e820: Sequence[bp.E820Entry] | None = None) -> MultibootBoot:
    """Validate and place everything, then write the kernel, the modules and the boot
    information to guest RAM. ``cmdline`` is what the kernel sees (its name and
    arguments). Raises KernelImageError for anything that cannot be booted."""
    header = parse_header(image, name)
    layout = kernel_layout(image, header, name)
    e820 = bp.e820_map(mem) if e820 is None else e820
    ram = usable_ranges(e820)
    check_kernel_placement(layout, ram, name)
    if len(modules) > MAX_MODULES:
        raise KernelImageError(f"{len(modules)} multiboot modules: kvmm loads at most {MAX_MODULES}")
    kernel_ranges = [(s.addr, s.end) for s in layout.segments]
    alloc = Allocator(ram, layout.end, [*kernel_ranges, RESERVED_LOW])
    # The information area's size does not depend on where it goes or where modules go.
    area_size = len(build_info(0, e820, cmdline, [(0, 0, m.cmdline) for m in modules]))
    base = alloc.place(area_size, "the multiboot information")
    placed = [(f"kernel segment {i}", s.addr, s.end) for i, s in enumerate(layout.segments)]
    placed.append(("the multiboot information", base, base + area_size))
    mod_ranges = []
    for i, m in enumerate(modules):
        start = alloc.place(len(m.data), f"multiboot module {i} ({m.cmdline.split(' ', 1)[0]})")
        mod_ranges.append((start, start + len(m.data)))
        placed.append((f"module {i}", start, start + max(len(m.data), 1)))
    check_disjoint(placed)
    area = build_info(base, e820, cmdline, [(s, e, m.cmdline) for (s, e), m in zip(mod_ranges, modules)])
    assert len(area) == area_size
    view = memoryview(image)
    try:
        for s in layout.segments:
            mem.write(s.addr, view[s.offset : s.offset + s.filesz])
            if s.memsz > s.filesz:
                mem.fill(s.addr + s.filesz, s.memsz - s.filesz)
        mem.write(base, area)
        for (start, _end), m in zip(mod_ranges, modules):
            mem.write(start, m.data)
    except GuestMemoryError as exc:  # placement checked every range: this is a kvmm bug
        raise KernelImageError(f"{name}: {exc}") from None
    LOG.debug("multiboot %s: entry %#x, segments %s, info at %#x, modules %s", name, layout.entry,
              [(hex(s.addr), hex(s.memsz)) for s in layout.segments], base + INFO_OFFSET, mod_ranges)
    return MultibootBoot(layout.entry, base + INFO_OFFSET, base, layout.end, tuple(mod_ranges))
