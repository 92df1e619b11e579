"""ELF64 ``vmlinux`` loader: PT_LOAD segments at their physical addresses, 64-bit entry."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import GuestMemoryError, KernelImageError
from ..memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD program header: where its bytes are in the file and in guest memory."""

    offset: int
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    """A parsed vmlinux: the 64-bit entry and the segments to load."""

    entry: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def parse_elf(image: bytes, name: str = "kernel") -> ElfImage:
    """Validate an x86-64 ELF executable and return its entry and PT_LOAD segments."""
    if len(image) < _EHDR.size:
        raise KernelImageError(f"{name}: truncated ELF header ({len(image)} bytes)")
    ident, e_type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_ = _EHDR.unpack_from(image)
    if ident[:4] != ELF_MAGIC:
        raise KernelImageError(f"{name}: not an ELF file")
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise KernelImageError(f"{name}: not a 64-bit little-endian ELF (a 32-bit vmlinux cannot be booted; "
                               "a 32-bit kernel needs a multiboot header)")
    if e_type != ET_EXEC or machine != EM_X86_64:
        raise KernelImageError(f"{name}: not an x86-64 executable (type {e_type}, machine {machine})")
    if phentsize != _PHDR.size or phnum == 0 or phoff + phnum * phentsize > len(image):
        raise KernelImageError(f"{name}: program headers missing or truncated")
    segments = []
    for i in range(phnum):
        p_type, _pflags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = _PHDR.unpack_from(image, phoff + i * phentsize)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(image):
            raise KernelImageError(f"{name}: segment {i} lies outside the file (truncated image?)")
        segments.append(Segment(p_offset, p_paddr, p_filesz, p_memsz))
    if not segments:
        raise KernelImageError(f"{name}: no loadable segments")
    return ElfImage(entry, tuple(segments))


def load_elf(mem: GuestMemory, image: bytes, name: str = "kernel") -> ElfImage:
    elf = parse_elf(image, name)
    view = memoryview(image)
    try:
        for s in elf.segments:
            mem.write(s.paddr, view[s.offset : s.offset + s.filesz])
            if s.memsz > s.filesz:
                mem.fill(s.paddr + s.filesz, s.memsz - s.filesz)
    except GuestMemoryError as exc:
        raise KernelImageError(f"{name}: a segment at {exc.gpa:#x} (+{exc.length:#x}) does not fit in guest RAM: give more --mem") from None
    if not mem.contains(elf.entry, 1):
        raise KernelImageError(f"{name}: entry point {elf.entry:#x} is outside guest RAM")
    return elf
