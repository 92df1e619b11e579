"""The compressed kernel inside a bzImage (its *payload*), decompressed on the host.

Documentation/x86/boot.rst (``payload_offset``/``payload_length``, protocol 2.08+): the
payload's format is told by its magic number, and what it holds is an ELF ``vmlinux``.
How Linux builds it (arch/x86/boot/compressed/Makefile, scripts/Makefile.lib):

- ``vmlinux.bin`` (vmlinux stripped by objcopy), followed by ``vmlinux.relocs`` on a
  relocatable kernel, is compressed as one stream;
- gzip is plain ``gzip -9`` (its trailer's ISIZE is the uncompressed size); every other
  format has the uncompressed size appended as 4 little-endian bytes (``*_with_size``);
  mkpiggy reads those last 4 bytes as ``output_len`` for all of them;
- xz uses the x86 BCJ filter and CRC32 checks (scripts/xz_wrap.sh), which liblzma
  undoes; lz4 is the *legacy* frame format (``lz4 -l``: 8 MiB blocks, no frame header
  beyond the magic); lzo is the ``lzop`` container; zstd is one frame (``zstd -22``).

The payload comes from whoever built the kernel file, so it is treated as hostile: the
output is bounded before anything is allocated for it (:func:`decompress`), every
decoder's own memory is capped, and any truncation or corruption is a
:class:`~kvmm.errors.KernelImageError` with one line of explanation. A payload kvmm
cannot read (an unknown magic, or LZO without the optional ``python-lzo``) raises
:class:`UnreadablePayload`, which the bzImage loader answers by entering the kernel's
own decompressor instead.

``lz4``, ``zstandard`` and ``lzo`` are imported only when a payload needs them (start-up
time: tests/test_startup.py).
"""

from __future__ import annotations

import struct
import zlib
from typing import Callable, NamedTuple

from ..errors import KernelImageError

# Magic numbers (boot.rst, payload_offset; lzop's from lib/decompress_unlzo.c). The ELF
# magic is an uncompressed payload.
MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
    ("xz", b"\xfd7zXZ\x00"),
    ("lzo", b"\x89LZO\x00\r\n\x1a\n"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("uncompressed", b"\x7fELF"),
)

# The largest kernel image x86-64 Linux can map for itself: KERNEL_IMAGE_SIZE, 1 GiB
# with CONFIG_RANDOMIZE_BASE (arch/x86/include/asm/page_64_types.h). No bootable payload
# decompresses to more (its relocation table is a few MiB at most), so this is the
# absolute cap whatever the guest RAM.
MAX_OUTPUT = 1 << 30
# Decoder memory caps. liblzma's dictionary: the kernel's xz uses 32 MiB
# (scripts/xz_wrap.sh), `lzma -9` 64 MiB. zstd's window: 2^27 is libzstd's default
# limit and the most `zstd -22 --ultra` uses (ZSTD_WINDOWLOG_LIMIT_DEFAULT).
LZMA_MEMLIMIT = 256 << 20
ZSTD_MAX_WINDOW = 1 << 27
# lib/decompress_unlz4.c: legacy-format blocks decompress to 8 MiB each (the last less).
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20
# lib/decompress_unlzo.c: the kernel accepts lzop blocks of at most 256 KiB.
LZO_BLOCK_MAX = 256 << 10
SIZE_TRAILER = 4


class UnreadablePayload(KernelImageError):
    """A payload kvmm cannot decompress (not a corrupt one): the kernel's own
    decompressor can still boot it."""


class Payload(NamedTuple):
    """A decompressed payload: what it was compressed with and the ``vmlinux`` bytes."""

    format: str
    compressed_size: int
    data: bytes


def identify(payload: bytes | memoryview) -> str | None:
    """The compressor of ``payload`` by its magic number, or None for an unknown one."""
    head = bytes(payload[:16])
    for fmt, magic in MAGICS:
        if head.startswith(magic):
            return fmt
    return None


def declared_size(payload: bytes | memoryview) -> int:
    """The uncompressed size in the payload's last 4 bytes (mkpiggy's ``output_len``)."""
    return int.from_bytes(payload[-SIZE_TRAILER:], "little")


def decompress(payload: bytes | memoryview, limit: int, what: str = "bzImage payload") -> Payload:
    """Decompress a bzImage payload into at most ``limit`` bytes (and never more than
    :data:`MAX_OUTPUT`).

    The size the payload declares is checked against the bound before decompression
    starts, the decoder may produce at most one byte more than that size, and the
    output must be exactly that size. Raises :class:`KernelImageError` for a truncated,
    corrupt or oversized payload, :class:`UnreadablePayload` for one kvmm cannot read.
    """
    fmt = identify(payload)
    if fmt is None:
        raise UnreadablePayload(f"its payload has a format kvmm does not know (magic {bytes(payload[:4]).hex(' ')})")
    if fmt == "uncompressed":
        return Payload(fmt, len(payload), bytes(payload))
    limit = min(limit, MAX_OUTPUT)
    if len(payload) < 2 * SIZE_TRAILER:  # the magic and the size trailer at least
        raise KernelImageError(f"{what} ({fmt}) is truncated: {len(payload)} bytes")
    size = declared_size(payload)
    if size > limit:
        raise KernelImageError(f"{what} ({fmt}) declares {size >> 20} MiB uncompressed, more than the "
                               f"{limit >> 20} MiB kvmm allows for it: refused as a decompression bomb")
    try:
        out = _DECODERS[fmt](payload, size)
    except _Bad as exc:
        raise KernelImageError(f"{what} ({fmt}) {exc}") from None
    except MemoryError:
        raise KernelImageError(f"{what} ({fmt}): out of host memory while decompressing") from None
    if len(out) > size:
        raise KernelImageError(f"{what} ({fmt}) decompresses to more than the {size} bytes its size trailer "
                               "declares: corrupt, or a decompression bomb")
    if len(out) < size:
        raise KernelImageError(f"{what} ({fmt}) is truncated or corrupt: it decompressed to {len(out)} of the "
                               f"{size} bytes its size trailer declares")
    return Payload(fmt, len(payload), out)


class _Bad(Exception):
    """A decoder's finding, the rest of a sentence that starts with the payload's name
    and format ("is truncated: ..."): :func:`decompress` makes it a KernelImageError."""


def _corrupt(exc: BaseException) -> _Bad:
    """A decoder library's own error (zlib.error, LZMAError, ZstdError, ...) as one line."""
    text = str(exc).strip().splitlines()
    return _Bad(f"is corrupt: {text[0] if text else type(exc).__name__}")


# --- one decoder per format: (payload, declared size) -> at most declared size + 1 bytes ----------
def _gzip(payload: bytes | memoryview, size: int) -> bytes:
    # wbits 16+15: a gzip member with its header and CRC32/ISIZE trailer checked by zlib.
    dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = dec.decompress(payload, size + 1)
    except zlib.error as exc:
        raise _corrupt(exc) from None
    if len(out) <= size and not dec.eof:
        raise _Bad("is truncated: the stream does not end")
    return out


def _bzip2(payload: bytes | memoryview, size: int) -> bytes:
    import bz2

    dec = bz2.BZ2Decompressor()
    try:
        out = dec.decompress(payload, size + 1)
    except OSError as exc:  # "Invalid data stream"
        raise _corrupt(exc) from None
    if len(out) <= size and not dec.eof:
        raise _Bad("is truncated: the stream does not end")
    return out


def _lzma_format(payload: bytes | memoryview, size: int, fmt: str) -> bytes:
    import lzma

    dec = lzma.LZMADecompressor(lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE, memlimit=LZMA_MEMLIMIT)
    try:
        out = dec.decompress(payload, size + 1)
    except lzma.LZMAError as exc:  # corrupt data, a bad check, or more than LZMA_MEMLIMIT of dictionary
        raise _corrupt(exc) from None
    if len(out) <= size and not dec.eof:
        raise _Bad("is truncated: the stream does not end")
    return out


def _lzma(payload: bytes | memoryview, size: int) -> bytes:
    return _lzma_format(payload, size, "lzma")


def _xz(payload: bytes | memoryview, size: int) -> bytes:
    return _lzma_format(payload, size, "xz")


def _zstd(payload: bytes | memoryview, size: int) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise UnreadablePayload("its payload is zstd and the zstandard package is not installed") from None
    # One frame, then the size trailer (lib/decompress_unzstd.c cuts the frame out the
    # same way). A bounded reader: read(n) returns at most n bytes, whatever the frame claims.
    reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(
        memoryview(payload)[:-SIZE_TRAILER], read_across_frames=False)
    out = bytearray()
    try:
        while len(out) <= size:
            chunk = reader.read(min(size + 1 - len(out), 4 << 20))
            if not chunk:
                break
            out += chunk
    except zstandard.ZstdError as exc:  # corrupt data, or a window over ZSTD_MAX_WINDOW
        raise _corrupt(exc) from None
    return bytes(out)


def _lz4(payload: bytes | memoryview, size: int) -> bytes:
    try:
        import lz4.block
    except ImportError:
        raise UnreadablePayload("its payload is lz4 and the lz4 package is not installed") from None
    # The legacy frame (lib/decompress_unlz4.c): the magic, then blocks of a 4-byte
    # little-endian compressed length and an LZ4 block; a repeated magic starts another
    # archive; the input ends at the size trailer (or at a zero length).
    data = memoryview(payload)[:-SIZE_TRAILER]
    pos, out = 4, bytearray()
    while len(data) - pos >= 4:
        n = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if n == LZ4_LEGACY_MAGIC:
            continue
        if n == 0:
            break
        if n > len(data) - pos:
            raise _Bad(f"is truncated: a block of {n} bytes at offset {pos} "
                                   f"has only {len(data) - pos}")
        # The safe decoder into a bounded destination: one block's worth, or what is left of
        # the declared size, as the kernel's decoder sizes it (dest_len in unlz4, PREBOOT).
        room = min(LZ4_LEGACY_BLOCK, size - len(out))
        if room == 0:
            raise _Bad(f"has blocks beyond the {size} bytes its size trailer declares")
        try:
            out += lz4.block.decompress(data[pos : pos + n], uncompressed_size=room)
        except lz4.block.LZ4BlockError as exc:
            if room < LZ4_LEGACY_BLOCK:
                raise _Bad(f"is corrupt, or decompresses to more than the {size} "
                                       "bytes its size trailer declares") from None
            raise _corrupt(exc) from None
        pos += n
    # Fewer than 4 bytes left is the end of the input, as for the kernel ("empty or end-of-file").
    return bytes(out)


# lzop's header flags (lzop's conf.h; the kernel's parse_header reads the same fields).
_F_ADLER32_D, _F_ADLER32_C, _F_H_EXTRA_FIELD = 0x1, 0x2, 0x40
_F_CRC32_D, _F_CRC32_C, _F_H_FILTER = 0x100, 0x200, 0x800
_LZO1X_METHODS = (1, 2, 3)  # M_LZO1X_1, M_LZO1X_1_15, M_LZO1X_999: all decoded by lzo1x


def _lzo(payload: bytes | memoryview, size: int) -> bytes:
    try:
        import lzo
    except ImportError:
        raise UnreadablePayload("its payload is LZO and python-lzo is not installed "
                                "(pip install 'kvmm[lzo]', which needs Debian's liblzo2-dev)") from None
    data = memoryview(payload)
    pos = len(MAGICS[4][1])

    def take(n: int) -> memoryview:
        nonlocal pos
        if len(data) - pos < n:
            raise _Bad("is truncated")
        pos += n
        return data[pos - n : pos]

    def be(n: int) -> int:
        return int.from_bytes(take(n), "big")

    version = be(2)
    take(2)  # library version
    if version >= 0x0940:
        take(2)  # version needed to extract
    method = be(1)
    if version >= 0x0940:
        take(1)  # level
    flags = be(4)
    if flags & _F_H_FILTER:
        take(4)
    take(8)  # mode, mtime (low)
    if version >= 0x0940:
        take(4)  # mtime (high)
    take(be(1) + 4)  # file name, header checksum
    if method not in _LZO1X_METHODS:
        raise _Bad(f"uses method {method}, not LZO1X")
    if flags & _F_H_EXTRA_FIELD:
        raise _Bad("has an extra header field the kernel cannot read")
    out = bytearray()
    while True:
        dst_len = be(4)
        if dst_len == 0:  # the end marker
            break
        if dst_len > LZO_BLOCK_MAX or len(out) + dst_len > size:
            raise _Bad(f"has a block of {dst_len} bytes: more than "
                                   f"{'the kernel accepts' if dst_len > LZO_BLOCK_MAX else 'its size trailer declares'}")
        src_len = be(4)
        d_sum = be(4) if flags & (_F_ADLER32_D | _F_CRC32_D) else None
        c_sum = be(4) if flags & (_F_ADLER32_C | _F_CRC32_C) and src_len < dst_len else None
        if src_len == 0 or src_len > dst_len:
            raise _Bad(f"is corrupt: a block of {src_len} bytes for {dst_len}")
        block = take(src_len)
        if c_sum is not None and _checksum(block, flags & _F_CRC32_C) != c_sum:
            raise _Bad("is corrupt: a compressed block's checksum does not match")
        try:
            plain = bytes(block) if src_len == dst_len else lzo.decompress(bytes(block), False, dst_len)
        except lzo.error as exc:
            raise _corrupt(exc) from None
        if len(plain) != dst_len:
            raise _Bad(f"is corrupt: a block gave {len(plain)} of {dst_len} bytes")
        if d_sum is not None and _checksum(plain, flags & _F_CRC32_D) != d_sum:
            raise _Bad("is corrupt: a block's checksum does not match")
        out += plain
    return bytes(out)


def _checksum(data: bytes | memoryview, crc: int) -> int:
    return zlib.crc32(data) if crc else zlib.adler32(data)


_DECODERS: dict[str, Callable[[bytes | memoryview, int], bytes]] = {
    "gzip": _gzip, "bzip2": _bzip2, "lzma": _lzma, "xz": _xz, "lzo": _lzo, "lz4": _lz4, "zstd": _zstd,
}
