"""GuestMemory: every access is checked as a whole range (rust-vmm vm-memory semantics)."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvmm.errors import ConfigError, GuestMemoryError, MemoryConfigError
from kvmm.memory import HIGH_RAM_START, LOW_RAM_END, GuestMemory, Region, parse_size, x86_regions


@pytest.fixture
def mem() -> GuestMemory:
    m = mmap.mmap(-1, 0x3000)
    return GuestMemory(m, [Region(0, 0x1000, 0), Region(0x10000, 0x2000, 0x1000)])


def test_read_write_round_trip(mem: GuestMemory) -> None:
    mem.write(0x10, b"abc")
    assert mem.read(0x10, 3) == b"abc"
    mem.write_u64(0x10008, 0x1122334455667788)
    assert mem.read_u64(0x10008) == 0x1122334455667788
    assert mem.read_u32(0x10008) == 0x55667788
    assert mem.read_u16(0x1000C) == 0x3344
    assert mem.read_u8(0x1000F) == 0x11


@pytest.mark.parametrize(
    "gpa,n",
    [
        (-1, 1),  # negative address must not wrap to the end of the mapping
        (0, -1),  # negative length
        (0xFFF, 2),  # straddles the end of region 0
        (0x1000, 1),  # the hole between regions
        (0x11FFF, 2),  # past the end of RAM
        (0xFFFF, 2),  # starts in the hole, ends in region 1
        (2**64 - 1, 2),  # overflowing
        (0x10000, 2**64),
    ],
)
def test_access_outside_ram_raises_typed_error(mem: GuestMemory, gpa: int, n: int) -> None:
    with pytest.raises(GuestMemoryError) as exc:
        mem.read(gpa, n)
    assert exc.value.gpa == gpa and exc.value.length == n
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, n)
    if 0 <= n <= 16:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, b"\0" * n)


def test_write_of_data_past_end_is_refused_not_truncated(mem: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        mem.write(0xFFE, b"1234")
    assert mem.read(0xFFE, 2) == b"\0\0"


def test_view_is_zero_copy(mem: GuestMemory) -> None:
    v = mem.view(0x10100, 4)
    v[:] = b"wxyz"
    assert mem.read(0x10100, 4) == b"wxyz"


def test_struct_access(mem: GuestMemory) -> None:
    fmt = struct.Struct("<HIQ")
    mem.write_struct(0x20, fmt, 1, 2, 3)
    assert mem.read_struct(0x20, fmt) == (1, 2, 3)
    with pytest.raises(GuestMemoryError):
        mem.read_struct(0xFF8, fmt)


def test_overlapping_regions_are_rejected() -> None:
    with pytest.raises(ValueError):
        GuestMemory(mmap.mmap(-1, 0x2000), [Region(0, 0x1000, 0), Region(0x800, 0x1000, 0x1000)])


def test_region_beyond_mapping_is_rejected() -> None:
    with pytest.raises(ValueError):
        GuestMemory(mmap.mmap(-1, 0x1000), [Region(0, 0x2000, 0)])


def test_x86_layout_splits_around_mmio_hole() -> None:
    assert x86_regions(1 << 30) == [Region(0, 1 << 30, 0)]
    regions = x86_regions(4 << 30)
    assert regions[0] == Region(0, LOW_RAM_END, 0)
    assert regions[1] == Region(HIGH_RAM_START, (4 << 30) - LOW_RAM_END, LOW_RAM_END)


@pytest.mark.parametrize("text,size", [("256M", 256 << 20), ("2G", 2 << 30), ("512", 512 << 20), ("64k", 64 << 10), ("1GiB", 1 << 30)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-1G", "12X", "M", "1.5G", "abc"])
def test_parse_size_rejects_bad_syntax(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_allocate_more_than_available_is_refused() -> None:
    with pytest.raises(MemoryConfigError, match="more than"):
        GuestMemory.allocate(1 << 50)


def test_allocate_maps_anonymous_memory() -> None:
    m = GuestMemory.allocate(16 << 20)
    m.write_u32(0x123456, 7)
    assert m.read_u32(0x123456) == 7
    assert m.size == 16 << 20
    m.close()


def test_available_memory_agrees_with_psutil() -> None:
    import psutil

    from kvmm.memory import available_memory

    # Both read MemAvailable; allow for the host's memory moving between the two reads.
    assert abs(available_memory() - psutil.virtual_memory().available) < 256 << 20


def test_sparse_save_stores_touched_chunks_and_its_digest_matches_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import hashlib
    import os

    from kvmm.memory import SPARSE_CHUNK, sparse_digest

    mem = GuestMemory.allocate(8 << 20, check_available=False)
    mem.write(0x1234, b"boot")
    mem.write(5 << 20, b"\xff" * 3 * SPARSE_CHUNK)  # three whole chunks
    path = tmp_path / "memory.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    written, digest = mem.save_sparse(fd)
    os.close(fd)
    assert written == 4 * SPARSE_CHUNK and path.stat().st_size == 8 << 20
    assert path.stat().st_blocks * 512 <= 8 * SPARSE_CHUNK  # holes where the guest never wrote
    expected = hashlib.sha256()
    for off in (0, 5 << 20, (5 << 20) + SPARSE_CHUNK, (5 << 20) + 2 * SPARSE_CHUNK):
        expected.update(off.to_bytes(8, "little") + mem.read(off, SPARSE_CHUNK))
    assert digest == expected.hexdigest()
    with open(path, "rb") as f:
        assert sparse_digest(f.fileno(), 8 << 20) == digest
    with open(path, "r+b") as f:  # one byte changed, in a hole: the digest sees it
        f.seek(7 << 20)
        f.write(b"\x01")
    with open(path, "rb") as f:
        assert sparse_digest(f.fileno(), 8 << 20) != digest
    restored = GuestMemory.from_file(str(path), 8 << 20)
    assert restored.read(0x1234, 4) == b"boot" and restored.read(7 << 20, 1) == b"\x01"


# --- the snapshot memory digest and the file's hole layout (issue 19, defect 1) -----------
SPARSE_SIZE = 1 << 20
# Data that does not start or end on a 64 KiB chunk: a copy can put a 4 KiB hole in
# front of it inside its chunk, which is what made the first digest loop forever.
SPARSE_DATA = [(0x1_2000, b"\xab" * 0x1000), (0x3_F000, b"\xcd" * 0x2000), (0xF_F000, b"\xef" * 0x1000)]


def _layout_explicit(path) -> None:  # type: ignore[no-untyped-def]
    """Every byte written, zeros included: no holes at all."""
    image = bytearray(SPARSE_SIZE)
    for off, data in SPARSE_DATA:
        image[off : off + len(data)] = data
    path.write_bytes(bytes(image))


def _layout_truncated(path) -> None:  # type: ignore[no-untyped-def]
    """ftruncate, then only the data: holes at the file system's block size around it."""
    with open(path, "wb") as f:
        f.truncate(SPARSE_SIZE)
        for off, data in SPARSE_DATA:
            f.seek(off)
            f.write(data)


def _layout_punched(path) -> None:  # type: ignore[no-untyped-def]
    """Written in full, then every all-zero 4 KiB block punched out (what cp -a and
    fallocate --dig-holes make of a snapshot), and a hole at the very start."""
    _layout_explicit(path)
    data = path.read_bytes()
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDWR)
    try:
        for off in range(0, SPARSE_SIZE, 4096):
            if data[off : off + 4096] == bytes(4096):
                if libc.fallocate(fd, 3, ctypes.c_long(off), ctypes.c_long(4096)) != 0:  # PUNCH_HOLE|KEEP_SIZE
                    pytest.skip(f"fallocate(PUNCH_HOLE) is not supported here: errno {ctypes.get_errno()}")
    finally:
        os.close(fd)


def _layout_cp_sparse(path) -> None:  # type: ignore[no-untyped-def]
    """The explicit file copied with cp --sparse=always (as cp -a of a sparse file)."""
    src = path.with_suffix(".src")
    _layout_explicit(src)
    subprocess.run(["cp", "--sparse=always", str(src), str(path)], check=True)


def _digest_in_child(path) -> str:  # type: ignore[no-untyped-def]
    """sparse_digest of ``path`` in a child process, which must finish within 30 s (the
    defect was an endless loop: the test must fail, not hang)."""
    code = ("import os, sys; from kvmm.memory import sparse_digest; "
            "fd = os.open(sys.argv[1], os.O_RDONLY); print(sparse_digest(fd, os.fstat(fd).st_size))")
    try:
        res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30,
                             cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        pytest.fail(f"sparse_digest of {path} did not end within 30 s")
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_sparse_digest_does_not_depend_on_the_hole_layout_and_always_ends(tmp_path: Path) -> None:
    import hashlib

    from kvmm.memory import SPARSE_CHUNK

    # The digest's definition, over the bytes: each nonzero 64 KiB chunk after its offset.
    image = bytearray(SPARSE_SIZE)
    for off, data in SPARSE_DATA:
        image[off : off + len(data)] = data
    expected = hashlib.sha256()
    for off in range(0, SPARSE_SIZE, SPARSE_CHUNK):
        if any(image[off : off + SPARSE_CHUNK]):
            expected.update(off.to_bytes(8, "little") + image[off : off + SPARSE_CHUNK])
    digests = {}
    for layout in (_layout_explicit, _layout_truncated, _layout_punched, _layout_cp_sparse):
        path = tmp_path / layout.__name__
        layout(path)
        assert path.read_bytes() == image
        digests[layout.__name__] = _digest_in_child(path)
    assert set(digests.values()) == {expected.hexdigest()}, digests


def test_sparse_digest_matches_what_save_sparse_wrote(tmp_path: Path) -> None:
    m = GuestMemory.allocate(2 << 20, check_available=False)
    try:
        m.write(0x1_2345, b"guest")
        m.write(0x1F_FFFF, b"!")
        path = tmp_path / "memory.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _written, digest = m.save_sparse(fd)
        finally:
            os.close(fd)
    finally:
        m.close()
    assert _digest_in_child(path) == digest
