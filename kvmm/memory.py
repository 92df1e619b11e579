"""Guest RAM: allocation (anonymous mmap, optional hugepages) and :class:`GuestMemory`.

:class:`GuestMemory` is the only way into guest RAM (as rust-vmm's vm-memory): every
access checks the whole ``[gpa, gpa+n)`` against one region, rejecting negative and
overflowing values, and raises :class:`~kvmm.errors.GuestMemoryError`. Python slicing
silently truncates and wraps negative indices, so no other code slices the mapping.
"""

from __future__ import annotations

import errno
import logging
import os
import mmap
import struct
from typing import Any, NamedTuple

from .errors import ConfigError, GuestMemoryError, MemoryConfigError, SnapshotError
from .kvm.structs import ffi

LOG = logging.getLogger(__name__)

MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

# x86 layout: RAM below the 32-bit PCI/MMIO hole, the rest above 4 GiB (kvmm/layout.py).
from .layout import HIGH_RAM_START, LOW_RAM_END  # noqa: E402

_SIZE_SUFFIXES = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse a memory size such as ``256M``, ``2G``, ``512`` (MiB) or ``1048576K``."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, suffix = (t[:-1], t[-1]) if t and t[-1] in "KMGT" else (t, "")
    if not num.isdigit() or int(num) == 0:
        raise ConfigError(f"invalid memory size {text!r}: expected a positive number with an optional K/M/G suffix, e.g. 256M or 2G")
    size = int(num) * _SIZE_SUFFIXES[suffix]
    check_page_multiple(size, repr(text))
    return size


PAGE_SIZE = 4096


def check_page_multiple(size: int, shown: str) -> None:
    """Guest RAM comes in whole pages: KVM_SET_USER_MEMORY_REGION refuses a size that is
    not a multiple of the page size (EINVAL; api.rst), so it is a usage error here."""
    if size % PAGE_SIZE:
        raise ConfigError(f"invalid memory size {shown}: not a multiple of 4 KiB (the page size), "
                          f"e.g. {-(-size // PAGE_SIZE) * PAGE_SIZE // 1024}K")


class Region(NamedTuple):
    """``size`` bytes of guest-physical memory at ``gpa``, at ``offset`` in the mapping."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def x86_regions(size: int) -> list[Region]:
    """Split ``size`` bytes of RAM around the 32-bit MMIO hole."""
    if size <= LOW_RAM_END:
        return [Region(0, size, 0)]
    return [Region(0, LOW_RAM_END, 0), Region(HIGH_RAM_START, size - LOW_RAM_END, LOW_RAM_END)]


def available_memory() -> int:
    """Bytes the host can give without swapping: the kernel's MemAvailable, read directly
    (what psutil reads on Linux, without its 2 MiB of resident modules at every start);
    psutil where /proc/meminfo lacks it (kernels before 3.14)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


SPARSE_CHUNK = 1 << 16  # the unit of holes in a snapshot's memory file


def _digest_chunk(digest: Any, off: int, data: bytes) -> None:
    """The snapshot memory digest's unit: a nonzero chunk, preceded by its offset."""
    digest.update(off.to_bytes(8, "little"))
    digest.update(data)


def sparse_digest(fd: int, size: int) -> str:
    """SHA-256 over each nonzero :data:`SPARSE_CHUNK` of a memory file with its offset (8
    bytes, little-endian) before it: zero chunks are left out, so hashing costs what the
    guest touched, and the file's holes are skipped unread (SEEK_DATA).

    The digest is a function of the file's bytes alone, not of where its holes are: a
    copy (``cp -a``, ``cp --sparse=never``, rsync) may punch holes at the file system's
    block size (4 KiB) inside a chunk, or fill them. So holes only say where to look: a
    chunk is always read and hashed whole, and every step moves past at least one chunk.
    (The first version rounded a data offset down to its chunk, which could land in a
    hole; SEEK_HOLE from there answered the same offset, and the loop never advanced:
    issue 19.) Where the file system has no SEEK_DATA (EINVAL), every chunk is read."""
    import hashlib

    digest = hashlib.sha256()
    zero = bytes(SPARSE_CHUNK)
    off = 0  # the next chunk not yet hashed: always a multiple of SPARSE_CHUNK, only grows
    while off < size:
        try:
            data_at = os.lseek(fd, off, os.SEEK_DATA)  # >= off
            # The hole after that data; no hole before EOF means EOF (lseek(2)).
            data_end = os.lseek(fd, data_at, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after off: the rest is holes (zeros)
                break
            if exc.errno != errno.EINVAL:  # EINVAL: no SEEK_DATA here; else a real read error
                raise
            data_at, data_end = off, size
        start = data_at // SPARSE_CHUNK * SPARSE_CHUNK  # >= off, since off is chunk-aligned
        end = min(-(-max(data_end, data_at + 1) // SPARSE_CHUNK) * SPARSE_CHUNK, size)  # round up, past data_at
        for chunk in range(start, end, SPARSE_CHUNK):
            data = _pread_full(fd, min(SPARSE_CHUNK, size - chunk), chunk)
            if data != zero[: len(data)]:
                _digest_chunk(digest, chunk, data)
        off = max(end, start + SPARSE_CHUNK)
    return digest.hexdigest()


def _pread_full(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (pread may return fewer); past the end of the file,
    zeros (a file that shrank meanwhile: its digest then fails to match)."""
    parts = []
    while n > 0:
        data = os.pread(fd, n, offset)
        if not data:
            parts.append(bytes(n))
            break
        parts.append(data)
        n -= len(data)
        offset += len(data)
    return b"".join(parts)


def _hugepages_free() -> tuple[int, int]:
    """(free hugepages, hugepage size in bytes) from /proc/meminfo."""
    free = size_kb = 0
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                free = int(line.split()[1])
            elif line.startswith("Hugepagesize:"):
                size_kb = int(line.split()[1])
    return free, size_kb * 1024


class GuestMemory:
    """Bounds-checked access to guest RAM backed by one host mapping."""

    def __init__(self, mapping: Any, regions: list[Region]) -> None:
        ordered = sorted(regions, key=lambda r: r.gpa)
        for prev, nxt in zip(ordered, ordered[1:]):
            if prev.end > nxt.gpa:
                raise ValueError(f"guest memory regions overlap at {nxt.gpa:#x}")
        for r in ordered:
            if r.gpa < 0 or r.size <= 0 or r.offset < 0 or r.offset + r.size > len(mapping):
                raise ValueError(f"invalid guest memory region {r}")
        self._map = mapping
        self._view = memoryview(mapping)
        self.regions = tuple(ordered)
        self.size = sum(r.size for r in ordered)
        # (start, end, mapping offset) per region: the hot path of every access.
        self._spans = tuple((r.gpa, r.end, r.offset - r.gpa) for r in ordered)

    @classmethod
    def allocate(cls, size: int, hugepages: bool = False, check_available: bool = True) -> GuestMemory:
        """Anonymous private RAM of ``size`` bytes, laid out for x86."""
        if size < (1 << 20):
            raise MemoryConfigError(f"guest memory of {size} bytes is too small: give at least 1M")
        check_page_multiple(size, f"of {size} bytes")
        if check_available:
            avail = available_memory()
            if size > avail:
                raise MemoryConfigError(
                    f"guest memory of {size >> 20} MiB is more than the {avail >> 20} MiB this host has available"
                )
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
        if hugepages:
            free, page = _hugepages_free()
            if page == 0 or free * page < size:
                raise MemoryConfigError(
                    f"--hugepages needs {size >> 20} MiB of hugepages, the host has {free} free "
                    f"of {page >> 10} KiB (reserve more: echo N > /proc/sys/vm/nr_hugepages)"
                )
            if size % page:
                raise MemoryConfigError(f"with --hugepages the memory size must be a multiple of {page >> 10} KiB")
            flags |= MAP_HUGETLB
        try:
            mapping = mmap.mmap(-1, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise MemoryConfigError(f"cannot map {size >> 20} MiB of guest memory: {exc.strerror}") from None
        LOG.debug("guest RAM: %d MiB%s", size >> 20, " on hugepages" if hugepages else "")
        return cls(mapping, x86_regions(size))

    @classmethod
    def from_file(cls, path: str, size: int) -> GuestMemory:
        """RAM of ``size`` bytes mapped privately (copy-on-write) from a snapshot's memory
        file: nothing is read up front, pages fault in from the page cache as the guest
        touches them, and guest writes never reach the file."""
        from .files import open_input

        fd = open_input(path, "snapshot memory", SnapshotError)  # a FIFO or device: refused, not waited on
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise SnapshotError(f"snapshot memory {path} is {actual} bytes, the snapshot says {size}")
            mapping = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise MemoryConfigError(f"cannot map the snapshot memory {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return cls(mapping, x86_regions(size))

    def save_sparse(self, fd: int) -> tuple[int, str]:
        """Write all of RAM (in mapping order) to ``fd`` from offset 0, leaving holes where
        a chunk is all zero (never-touched memory costs no disk). Returns the bytes written
        and the snapshot memory digest (:func:`sparse_digest`) of what was written."""
        import hashlib

        digest = hashlib.sha256()
        zero = bytes(SPARSE_CHUNK)
        written = 0
        total = len(self._map)
        for off in range(0, total, SPARSE_CHUNK):
            data = self._map[off : min(off + SPARSE_CHUNK, total)]  # a copy: fast compare, no struct unpacking
            if data != zero[: len(data)]:
                os.pwrite(fd, data, off)
                _digest_chunk(digest, off, data)
                written += len(data)
        os.ftruncate(fd, total)
        return written, digest.hexdigest()

    def host_address(self, region: Region) -> int:
        """The host virtual address of ``region`` (for KVM_SET_USER_MEMORY_REGION)."""
        return int(ffi.cast("uintptr_t", ffi.from_buffer(self._map))) + region.offset

    def close(self) -> None:
        self._view.release()
        try:
            self._map.close()
        except BufferError:  # a view into it is still alive somewhere; it goes with the process
            pass

    # --- access ------------------------------------------------------------------------
    def _offset(self, gpa: int, n: int) -> int:
        """Mapping offset of ``[gpa, gpa+n)``, which must lie inside one region."""
        if gpa >= 0 and n >= 0:
            end = gpa + n
            for start, stop, delta in self._spans:
                if start <= gpa and end <= stop:
                    return gpa + delta
        raise GuestMemoryError(gpa, n)

    def contains(self, gpa: int, n: int) -> bool:
        try:
            self._offset(gpa, n)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, n: int) -> memoryview:
        """A zero-copy writable view of ``[gpa, gpa+n)`` (for preadv/pwritev)."""
        off = self._offset(gpa, n)
        return self._view[off : off + n]

    def read(self, gpa: int, n: int) -> bytes:
        off = self._offset(gpa, n)
        return self._view[off : off + n].tobytes()

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        off = self._offset(gpa, n)
        self._view[off : off + n] = data

    def fill(self, gpa: int, n: int, byte: int = 0) -> None:
        off = self._offset(gpa, n)
        self._map[off : off + n] = bytes([byte]) * n

    def read_struct(self, gpa: int, fmt: struct.Struct) -> tuple[Any, ...]:
        return fmt.unpack_from(self._view, self._offset(gpa, fmt.size))

    def write_struct(self, gpa: int, fmt: struct.Struct, *values: Any) -> None:
        fmt.pack_into(self._view, self._offset(gpa, fmt.size), *values)

    def read_u8(self, gpa: int) -> int:
        return self._view[self._offset(gpa, 1)]

    def read_u16(self, gpa: int) -> int:
        return int(_U16.unpack_from(self._view, self._offset(gpa, 2))[0])

    def read_u32(self, gpa: int) -> int:
        return int(_U32.unpack_from(self._view, self._offset(gpa, 4))[0])

    def read_u64(self, gpa: int) -> int:
        return int(_U64.unpack_from(self._view, self._offset(gpa, 8))[0])

    def write_u8(self, gpa: int, value: int) -> None:
        self._view[self._offset(gpa, 1)] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        _U16.pack_into(self._view, self._offset(gpa, 2), value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        _U32.pack_into(self._view, self._offset(gpa, 4), value & 0xFFFF_FFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        _U64.pack_into(self._view, self._offset(gpa, 8), value & 0xFFFF_FFFF_FFFF_FFFF)


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
