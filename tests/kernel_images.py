"""Kernel images built in tests: minimal ELF vmlinux files, bzImages around them with a
real setup header, and payloads compressed the way Linux's build compresses them
(arch/x86/boot/compressed/Makefile, scripts/Makefile.lib). Shared by the loader tests
and the fuzz targets' seed corpus (fuzz/targets.py)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from kvmm.loader import bootparams as bp

ROOT = Path(__file__).resolve().parents[1]

# Setup headers (boot.rst, 0x1F1 up to the end the jump at 0x200 skips to) of two real
# kernels, so the synthetic bzImages carry every field a real one has:
# - the project's guest kernel (kernels/build.sh: 6.1 tinyconfig + kernels/config.fragment):
#   protocol 2.15, 31 setup sectors, not relocatable, code32_start 1 MiB, pref_address
#   16 MiB, init_size 0xFF3000, an xz payload;
# - Debian 12's linux-image-6.1.0-57-amd64 /boot/vmlinuz: protocol 2.15, 39 setup
#   sectors, relocatable, xloadflags 0x7F, init_size 0x3F98000, an xz payload.
PROJECT_SETUP_HEADER = bytes.fromhex(
    "1f010040b001000000ffff000055aaeb6a486472530f0200000000001020370001008000001000000000000000000000"
    "0000002050000000000000ffffff7f0000200000156100ff070000000000000000000000000000a3020000f09b1a0000"
    "0000000000000000000001000000000030ff000000000010ef1a00"
)
DEBIAN_SETUP_HEADER = bytes.fromhex(
    "27010020d807000000ffff000055aaeb6a486472530f02000000000010c0420001008000001000000000000000000000"
    "000000e05b000000000000ffffff7f0000200001157f00ff070000000000000000000000000000cc020000e4ef7b0000"
    "0000000000000000000001000000000080f903208d7c00fc567d00"
)
# The bytes before the payload in the protected-mode part (the decompressor's code in a
# real bzImage: startup_32 is entered at 0, startup_64 at 0x200).
PM_HEAD = b"\xf4" * 0x400
PM_TAIL = b"\xcc" * 0x100

COMPRESSORS = ("gzip", "bzip2", "lzma", "xz", "lzo", "lz4", "zstd")
# The Debian packages of the command-line tools Linux's build uses.
TOOL_PACKAGES = {"gzip": "gzip", "bzip2": "bzip2", "lzma": "xz-utils", "xz": "xz-utils", "lzop": "lzop",
                 "lz4": "lz4", "zstd": "zstd"}


def make_elf(entry: int = 0x200000, segments: list[tuple[int, bytes, int]] | None = None, ei_class: int = 2,
             machine: int = 62, e_type: int = 2) -> bytes:
    """A minimal ELF64 executable: ``segments`` is [(paddr, data, memsz)]."""
    segments = segments if segments is not None else [(0x200000, b"\xf4" * 16, 32)]
    phoff = 64
    data_off = phoff + 56 * len(segments)
    phdrs, blobs = b"", b""
    for paddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, data_off + len(blobs), paddr, paddr, len(data), memsz, 0x200000)
        blobs += data
    ident = b"\x7fELF" + bytes([ei_class, 1, 1]) + b"\0" * 9
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, e_type, machine, 1, entry, phoff, 0, 0, 64, 56, len(segments), 64, 0, 0)
    return ehdr + phdrs + blobs


def make_bzimage(version: int = 0x020F, xloadflags: int = 1, loadflags: int = 1, setup_sects: int = 4,
                 payload: bytes = b"\x90" * 1024, relocatable: int = 1, pref: int = 0x1000000, init_size: int = 0x100000) -> bytes:
    """A bzImage from scratch (no payload fields): ``payload`` is the whole protected-mode part."""
    img = bytearray((setup_sects + 1) * 512)
    img[bp.HDR_SETUP_SECTS] = setup_sects
    struct.pack_into("<H", img, bp.HDR_BOOT_FLAG, 0xAA55)
    img[bp.HDR_JUMP] = 0xEB
    img[bp.HDR_JUMP + 1] = 0x66  # header runs to 0x268
    struct.pack_into("<I", img, bp.HDR_HEADER, bp.HDRS_MAGIC)
    struct.pack_into("<H", img, bp.HDR_VERSION, version)
    img[bp.HDR_LOADFLAGS] = loadflags
    struct.pack_into("<I", img, bp.HDR_CODE32_START, 0x100000)
    struct.pack_into("<I", img, bp.HDR_INITRD_ADDR_MAX, 0x7FFFFFFF)
    img[bp.HDR_RELOCATABLE] = relocatable
    struct.pack_into("<H", img, bp.HDR_XLOADFLAGS, xloadflags)
    struct.pack_into("<I", img, bp.HDR_CMDLINE_SIZE, 2047)
    struct.pack_into("<Q", img, bp.HDR_PREF_ADDRESS, pref)
    struct.pack_into("<I", img, bp.HDR_INIT_SIZE, init_size)
    return bytes(img) + payload


def wrap_payload(payload: bytes, header: bytes = PROJECT_SETUP_HEADER, version: int | None = None,
                 init_size: int | None = None, payload_length: int | None = None) -> bytes:
    """A bzImage with a real setup header whose payload fields point at ``payload``,
    placed as Linux places it: after the decompressor's head in the protected-mode part."""
    setup_sects = header[0]
    img = bytearray((setup_sects + 1) * 512)
    img[bp.HDR_SETUP_SECTS : bp.HDR_SETUP_SECTS + len(header)] = header
    if version is not None:
        struct.pack_into("<H", img, bp.HDR_VERSION, version)
    if init_size is not None:
        struct.pack_into("<I", img, bp.HDR_INIT_SIZE, init_size)
    struct.pack_into("<I", img, bp.HDR_PAYLOAD_OFFSET, len(PM_HEAD))
    struct.pack_into("<I", img, bp.HDR_PAYLOAD_LENGTH, len(payload) if payload_length is None else payload_length)
    return bytes(img) + PM_HEAD + payload + PM_TAIL


def size_append(n: int) -> bytes:
    """scripts/Makefile.lib's size_append: the uncompressed size, 4 bytes little-endian."""
    return struct.pack("<I", n)


def tool_command(fmt: str) -> list[str]:
    """The command scripts/Makefile.lib runs for ``fmt`` (cmd_gzip, cmd_bzip2_with_size, ...,
    scripts/xz_wrap.sh for xz), stdin to stdout."""
    return {
        "gzip": ["gzip", "-n", "-f", "-9"],
        "bzip2": ["bzip2", "-9"],
        "lzma": ["lzma", "-9"],
        "xz": ["xz", "--check=crc32", "--x86", "--lzma2=,dict=32MiB"],
        "lzo": ["lzop", "-9"],
        "lz4": ["lz4", "-l", "-9", "-", "-"],
        "zstd": ["zstd", "-22", "--ultra"],
    }[fmt]


def ensure_tools() -> None:
    """Install the compressors' Debian packages that are missing (scripts/ensure-packages.sh)."""
    missing = sorted({pkg for tool, pkg in TOOL_PACKAGES.items() if shutil.which(tool) is None})
    if missing:
        subprocess.run([str(ROOT / "scripts" / "ensure-packages.sh"), *missing], check=True, capture_output=True)


def linux_payload(fmt: str, data: bytes) -> bytes:
    """``data`` compressed as Linux's build compresses vmlinux.bin(+relocs) for ``fmt``: the
    command-line tool, then the size appended for every format but gzip (whose trailer
    already ends with it)."""
    out = subprocess.run(tool_command(fmt), input=data, capture_output=True, check=True).stdout
    return out if fmt == "gzip" else out + size_append(len(data))
