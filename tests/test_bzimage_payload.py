"""bzImage payloads decompressed on the host (kvmm/loader/payload.py, bzimage.py).

The bzImages are built here around a small ELF with a real kernel's setup header
(tests/kernel_images.py), their payloads compressed by the command-line tools Linux's
build uses, framed as arch/x86/boot/compressed/Makefile frames them."""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import struct
import sys
from pathlib import Path

import pytest

from conftest import run_kvmm
from kernel_images import (
    COMPRESSORS,
    DEBIAN_SETUP_HEADER,
    PM_HEAD,
    PROJECT_SETUP_HEADER,
    ensure_tools,
    linux_payload,
    make_elf,
    size_append,
    wrap_payload,
)
from kvmm.errors import KernelImageError
from kvmm.loader import bootparams as bp
from kvmm.loader import load_linux
from kvmm.loader import payload as P
from kvmm.loader.bzimage import extract_vmlinux, output_limit, parse_bzimage
from kvmm.memory import GuestMemory

KERNEL_PADDR = 0x1000000  # LOAD_PHYSICAL_ADDR of both real headers' kernels
TEXT = bytes(range(256)) * 64  # 16 KiB that compresses, but not to nothing
VMLINUX = make_elf(entry=KERNEL_PADDR + 0x40, segments=[(KERNEL_PADDR, TEXT, 0x8000), (KERNEL_PADDR + 0x200000, b"DATA" * 64, 0x1000)])
# vmlinux.relocs as misc.c's handle_relocations reads it backwards from the end: 32-bit
# relocations, a zero, inverse 32-bit ones, a zero, 64-bit ones, a zero terminator first.
RELOCS = struct.pack("<7i", 0, -0x7F000000, 0, -0x7EFFF000, 0, -0x7EFFE000, -0x7EFFD000)
LOG_NAME = "kvmm.loader.bzimage"


@pytest.fixture(scope="module")
def payloads() -> dict[str, bytes]:
    """VMLINUX compressed with every format as Linux's Makefile does it."""
    ensure_tools()
    return {fmt: linux_payload(fmt, VMLINUX) for fmt in COMPRESSORS}


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.allocate(64 << 20, check_available=False)


def needs_decoder(fmt: str) -> None:
    """LZO is an optional extra (python-lzo, built from source by scripts/setup.sh)."""
    if fmt == "lzo":
        pytest.importorskip("lzo", reason="python-lzo (kvmm's lzo extra) is not installed: LZO payloads take the "
                            "kernel's own decompressor, tested by test_lzo_without_python_lzo_falls_back_...")


def zero_page(mem: GuestMemory) -> bp.ZeroPage:
    zp = bp.ZeroPage()
    zp.buf[:] = mem.read(bp.BOOT_PARAMS_ADDR, bp.ZERO_PAGE_SIZE)
    return zp


def assert_vmlinux_loaded(mem: GuestMemory) -> None:
    assert mem.read(KERNEL_PADDR, len(TEXT)) == TEXT
    assert mem.read(KERNEL_PADDR + len(TEXT), 0x8000 - len(TEXT)) == bytes(0x8000 - len(TEXT))  # bss zeroed
    assert mem.read(KERNEL_PADDR + 0x200000, 256) == b"DATA" * 64


# --- each compressor, framed as Linux frames it -------------------------------------------------
@pytest.mark.parametrize("fmt", COMPRESSORS)
def test_payload_of_each_compressor_is_loaded_as_its_vmlinux(fmt: str, payloads: dict[str, bytes], mem: GuestMemory,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    needs_decoder(fmt)
    caplog.set_level(logging.INFO, LOG_NAME)
    image = wrap_payload(payloads[fmt])
    assert P.identify(payloads[fmt]) == fmt
    info = load_linux(mem, image, "console=ttyS0 root=/dev/vda", b"INITRD" * 100)
    # Entered where the vmlinux itself would be: its ELF entry at the physical link address.
    assert (info.kind, info.entry, info.kernel_end) == ("bzImage", KERNEL_PADDR + 0x40, KERNEL_PADDR + 0x201000)
    assert_vmlinux_loaded(mem)
    # The decompressor's own code is not in guest memory: nothing was put at code32_start.
    assert mem.read(0x100000, len(PM_HEAD)) == bytes(len(PM_HEAD))
    zp = zero_page(mem)
    # The zero page carries the bzImage's own setup header (protocol 2.15, init_size,
    # root_flags...), with kvmm's loader fields, command line and initrd.
    assert zp.buf[bp.HDR_SETUP_SECTS] == PROJECT_SETUP_HEADER[0]
    assert struct.unpack_from("<H", zp.buf, bp.HDR_VERSION)[0] == 0x020F
    assert zp.get_u32(bp.HDR_INIT_SIZE) == 0xFF3000
    assert zp.get_u8(bp.HDR_TYPE_OF_LOADER) == bp.LOADER_TYPE_UNDEFINED
    assert zp.get_u32(bp.HDR_CMD_LINE_PTR) == bp.CMDLINE_ADDR
    assert mem.read(bp.CMDLINE_ADDR, 28) == b"console=ttyS0 root=/dev/vda\0"
    assert info.initrd is not None and zp.get_u32(bp.HDR_RAMDISK_IMAGE) == info.initrd[0]
    assert f"bzImage: {fmt} payload decompressed on the host" in caplog.text
    assert f"entering the kernel at {KERNEL_PADDR + 0x40:#x}" in caplog.text


def test_xz_payload_uses_the_x86_bcj_filter(payloads: dict[str, bytes]) -> None:
    # scripts/xz_wrap.sh: --x86 before LZMA2. The filter chain is in the block header
    # (filter id 0x04, BCJ x86), which liblzma undoes.
    xz = payloads["xz"]
    block_header = xz[12 : 12 + (xz[12] + 1) * 4]
    assert block_header[2] == 0x04
    assert P.decompress(xz, 1 << 20).data == VMLINUX


def test_relocations_appended_after_the_elf_are_not_loaded(mem: GuestMemory) -> None:
    # A relocatable kernel's payload is vmlinux.bin followed by vmlinux.relocs; at the
    # physical link address, without KASLR, x86-64 applies none of them (misc.c).
    data = VMLINUX + RELOCS
    load_linux(mem, wrap_payload(gzip.compress(data, mtime=0)), "")
    assert_vmlinux_loaded(mem)
    assert mem.read(KERNEL_PADDR + 0x200000 + 256, 0x1000 - 256) == bytes(0x1000 - 256)


def test_relocatable_kernel_header_loads_at_its_link_address(mem: GuestMemory) -> None:
    big = GuestMemory.allocate(128 << 20, check_available=False)
    info = load_linux(big, wrap_payload(lzma.compress(VMLINUX + RELOCS) + size_append(len(VMLINUX + RELOCS)),
                                        header=DEBIAN_SETUP_HEADER), "")
    assert info.entry == KERNEL_PADDR + 0x40
    assert_vmlinux_loaded(big)
    # misc.c: KASLR_FLAG is the decompressor's to set; the host path never randomises.
    assert not zero_page(big).get_u8(bp.HDR_LOADFLAGS) & bp.KASLR_FLAG


def test_uncompressed_elf_payload_is_loaded(mem: GuestMemory) -> None:
    # boot.rst: "The uncompressed payload is currently always ELF".
    info = load_linux(mem, wrap_payload(VMLINUX), "")
    assert info.entry == KERNEL_PADDR + 0x40
    assert_vmlinux_loaded(mem)


def test_protocol_2_08_payload_is_decompressed_without_init_size(mem: GuestMemory) -> None:
    # 2.08 and 2.09 have payload_offset but neither pref_address nor init_size: the bound
    # is the guest's RAM.
    image = wrap_payload(bz2.compress(VMLINUX) + size_append(len(VMLINUX)), version=0x0208)
    assert output_limit(parse_bzimage(image), mem.size) == mem.size
    assert load_linux(mem, image, "").entry == KERNEL_PADDR + 0x40


# --- the kernel's own decompressor: on request, and where kvmm cannot read the payload ------------
def assert_own_decompressor(mem: GuestMemory, info, image: bytes) -> None:  # type: ignore[no-untyped-def]
    hdr = parse_bzimage(image)
    assert info.entry == 0x100000 + 0x200  # code32_start + the 64-bit entry (not relocatable)
    assert mem.read(0x100000, 0x100) == image[hdr.pm_offset : hdr.pm_offset + 0x100]


def test_kernel_format_bzimage_enters_its_own_decompressor(payloads: dict[str, bytes], mem: GuestMemory,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG_NAME)
    image = wrap_payload(payloads["xz"])
    info = load_linux(mem, image, "", bzimage_decompressor=True)
    assert_own_decompressor(mem, info, image)
    assert mem.read(KERNEL_PADDR, 16) == bytes(16)  # nothing decompressed
    assert "bzImage: --kernel-format bzimage: entering its own decompressor at 0x100200" in caplog.text


@pytest.mark.parametrize("version", [0x0206, 0x0207])
def test_protocol_before_2_08_has_no_payload_fields_and_uses_its_own_decompressor(
        version: int, payloads: dict[str, bytes], mem: GuestMemory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG_NAME)
    image = wrap_payload(payloads["gzip"], version=version)
    info = load_linux(mem, image, "")
    assert_own_decompressor(mem, info, image)
    assert f"boot protocol 2.0{version & 0xF} does not locate its payload" in caplog.text
    assert "entering its own decompressor" in caplog.text


def test_unknown_compressor_falls_back_to_its_own_decompressor(mem: GuestMemory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG_NAME)
    image = wrap_payload(b"\x1f\x9e" + bytes(200) + size_append(4096))  # "old gzip": boot.rst lists it, zlib cannot
    info = load_linux(mem, image, "")
    assert_own_decompressor(mem, info, image)
    assert "format kvmm does not know (magic 1f 9e 00 00)" in caplog.text


def test_lzo_without_python_lzo_falls_back_to_its_own_decompressor(payloads: dict[str, bytes], mem: GuestMemory,
                                                                     caplog: pytest.LogCaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, LOG_NAME)
    monkeypatch.setitem(sys.modules, "lzo", None)  # import lzo -> ImportError
    image = wrap_payload(payloads["lzo"])
    info = load_linux(mem, image, "")
    assert_own_decompressor(mem, info, image)
    assert "its payload is LZO and python-lzo is not installed" in caplog.text


def test_kernel_format_bzimage_refuses_an_elf(mem: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="not a bzImage"):
        load_linux(mem, VMLINUX, "", bzimage_decompressor=True)


# --- hostile payloads: truncated, corrupt, bombs ---------------------------------------------------
@pytest.mark.parametrize("fmt", COMPRESSORS)
def test_truncated_payload_is_refused(fmt: str, payloads: dict[str, bytes], mem: GuestMemory) -> None:
    needs_decoder(fmt)
    # Cut in the middle, the size trailer kept (the payload fields still cover it all).
    p = payloads[fmt]
    with pytest.raises(KernelImageError, match="truncated|corrupt") as exc:
        load_linux(mem, wrap_payload(p[: len(p) // 2] + p[-4:]), "")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("fmt", COMPRESSORS)
def test_corrupt_payload_is_refused(fmt: str, payloads: dict[str, bytes], mem: GuestMemory) -> None:
    needs_decoder(fmt)
    # 32 bytes flipped in the middle of the stream. An lz4 legacy frame has no checksum
    # (a flipped literal decodes to wrong bytes, for the kernel's decompressor too), so
    # there its first block's length is what is damaged.
    p = bytearray(payloads[fmt])
    if fmt == "lz4":
        p[4:8] = (0x7FFF_FFFF).to_bytes(4, "little")
    else:
        middle = len(p) // 2
        p[middle - 16 : middle + 16] = bytes(b ^ 0x5A for b in p[middle - 16 : middle + 16])
    with pytest.raises(KernelImageError, match="truncated|corrupt|more than|not an ELF|checksum") as exc:
        load_linux(mem, wrap_payload(bytes(p)), "")
    assert "\n" not in str(exc.value)


def test_payload_past_the_end_of_the_file_is_refused(payloads: dict[str, bytes]) -> None:
    p = payloads["xz"]
    with pytest.raises(KernelImageError, match="truncated bzImage: its .* payload .* runs past the end"):
        parse_bzimage(wrap_payload(p, payload_length=len(p) + len(PM_HEAD) + 0x1000))


def test_payload_that_is_no_elf_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="gzip payload is not an ELF vmlinux"):
        load_linux(mem, wrap_payload(gzip.compress(b"MZ" + bytes(4096), mtime=0)), "")


def test_size_trailer_larger_than_the_stream_is_refused_as_truncated(mem: GuestMemory) -> None:
    p = bz2.compress(VMLINUX) + size_append(len(VMLINUX) + 4096)
    with pytest.raises(KernelImageError, match=r"truncated or corrupt: it decompressed to \d+ of the \d+ bytes"):
        load_linux(mem, wrap_payload(p), "")


def test_declared_size_over_the_bound_is_refused_before_decompressing(mem: GuestMemory) -> None:
    # The size trailer is checked against the bound first: no decompression starts.
    p = lzma.compress(b"\0" * 1024, format=lzma.FORMAT_XZ) + size_append(0xFFFF_FFF0)
    with pytest.raises(KernelImageError, match="declares 4095 MiB uncompressed, more than the 15 MiB .* decompression bomb"):
        load_linux(mem, wrap_payload(p), "")  # init_size 0xFF3000 is the tightest bound


def test_bound_is_the_smallest_of_ram_init_size_and_the_absolute_cap() -> None:
    hdr = parse_bzimage(wrap_payload(VMLINUX))
    assert output_limit(hdr, 8 << 20) == 8 << 20  # guest RAM
    assert output_limit(hdr, 1 << 30) == 0xFF3000  # init_size
    hdr = parse_bzimage(wrap_payload(VMLINUX, init_size=0xFFFF_FFFF))
    assert output_limit(hdr, 64 << 30) == P.MAX_OUTPUT == 1 << 30


@pytest.mark.parametrize("fmt", ["gzip", "bzip2", "xz", "zstd", "lz4"])
def test_decompression_bomb_with_a_lying_trailer_stops_at_the_declared_size(fmt: str) -> None:
    # 32 MiB of zeros compresses to kilobytes; the trailer claims 1 MiB. The decoder is
    # stopped one byte past the declared size: kvmm's peak allocation stays near 1 MiB.
    import tracemalloc

    import lz4.block
    import zstandard

    zeros = bytes(32 << 20)
    stream = {
        "gzip": lambda: gzip.compress(zeros, 1, mtime=0),
        "bzip2": lambda: bz2.compress(zeros, 1),
        "xz": lambda: lzma.compress(zeros, format=lzma.FORMAT_XZ, preset=0),
        "zstd": lambda: zstandard.ZstdCompressor(level=1).compress(zeros),
        "lz4": lambda: struct.pack("<I", P.LZ4_LEGACY_MAGIC) + b"".join(
            struct.pack("<I", len(b)) + b for b in [lz4.block.compress(bytes(P.LZ4_LEGACY_BLOCK), store_size=False)] * 4),
    }[fmt]()
    del zeros
    assert len(stream) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(KernelImageError, match="more than the 1048576 bytes its size trailer declares"):
            P.decompress(stream + size_append(1 << 20), 64 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_lzma_dictionary_over_the_decoder_memory_cap_is_refused() -> None:
    # The .lzma header's dictionary size (bytes 1-4) says what the decoder allocates:
    # 1 GiB is over LZMA_MEMLIMIT.
    p = bytearray(lzma.compress(VMLINUX, format=lzma.FORMAT_ALONE) + size_append(len(VMLINUX)))
    struct.pack_into("<I", p, 1, 1 << 30)
    with pytest.raises(KernelImageError, match=r"\(lzma\) is corrupt: Memory usage limit"):
        P.decompress(bytes(p), 64 << 20)


def test_zstd_window_over_the_cap_is_refused() -> None:
    import zstandard

    # Streamed (no content size), so the frame keeps the 1 GiB window it was made with.
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=30, write_content_size=False)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = stream.compress(VMLINUX) + stream.flush()
    assert zstandard.get_frame_parameters(frame).window_size == 1 << 30
    with pytest.raises(KernelImageError, match=r"\(zstd\) is corrupt: .*(window|memory)"):
        P.decompress(frame + size_append(len(VMLINUX)), 64 << 20)


def test_lz4_block_length_past_the_payload_is_refused() -> None:
    p = struct.pack("<II", P.LZ4_LEGACY_MAGIC, 1 << 20) + b"\0" * 64 + size_append(4096)
    with pytest.raises(KernelImageError, match=r"\(lz4\) is truncated: a block of 1048576 bytes"):
        P.decompress(p, 64 << 20)


def test_lzo_block_larger_than_the_kernel_accepts_is_refused(payloads: dict[str, bytes]) -> None:
    needs_decoder("lzo")
    # lib/decompress_unlzo.c: "dest len longer than block size" (256 KiB).
    lzop = payloads["lzo"]
    header_end = lzop.index(struct.pack(">I", len(VMLINUX)))  # the first block's uncompressed length
    p = lzop[:header_end] + struct.pack(">I", (256 << 10) + 1) + lzop[header_end + 4 :]
    with pytest.raises(KernelImageError, match=r"\(lzo\) has a block of 262145 bytes: more than the kernel accepts"):
        P.decompress(p, 64 << 20)


def test_every_seed_of_the_fuzz_corpus_is_a_payload_kvmm_reads() -> None:
    # fuzz/corpus/bzimage_payload: one seed per compressor (see fuzz/targets.py).
    seeds = sorted((Path(__file__).resolve().parents[1] / "fuzz" / "corpus" / "bzimage_payload").glob("*"))
    formats = {P.identify(s.read_bytes()[4:]) for s in seeds}
    assert formats >= set(COMPRESSORS)


# --- the command line: one line, status 10 -----------------------------------------------------------
def test_corrupt_bzimage_payload_is_one_error_line_with_status_10(payloads: dict[str, bytes], tmp_path: Path) -> None:
    p = payloads["xz"]
    bad = tmp_path / "bzImage"
    bad.write_bytes(wrap_payload(p[: len(p) // 2] + p[-4:]))
    res = run_kvmm("--kernel", str(bad), "--mem", "64M")
    err = [line for line in res.stderr.decode().splitlines() if line.strip()]
    assert res.returncode == 10, res.stderr
    assert len(err) == 1 and err[0].startswith(f"kvmm: error: {bad}: bzImage payload (xz) is"), err
    assert "Traceback" not in res.stderr.decode()


def test_kernel_format_bzimage_reaches_the_loader_from_the_command_line(tmp_path: Path) -> None:
    elf = tmp_path / "vmlinux"
    elf.write_bytes(VMLINUX)
    res = run_kvmm("--kernel", str(elf), "--kernel-format", "bzimage", "--mem", "64M")
    assert res.returncode == 10, res.stderr
    assert "--kernel-format bzimage, but this is an ELF vmlinux, not a bzImage" in res.stderr.decode()


@pytest.mark.kvm
@pytest.mark.parametrize("kernel_format,entry", [("auto", KERNEL_PADDR + 0x40), ("bzimage", 0x100000 + 0x200)])
def test_the_vcpu_starts_at_the_chosen_entry_in_64bit_mode(kernel_format: str, entry: int, payloads: dict[str, bytes],
                                                           tmp_path: Path, kvmm_machine) -> None:  # type: ignore[no-untyped-def]
    # boot.rst, 64-bit boot protocol: long mode, paging on, rsi = boot_params, rip = the
    # vmlinux's startup_64 (auto) or the bzImage's 64-bit entry, 0x200 into the
    # protected-mode kernel (bzimage). Not run: only the plumbing from the option on.
    image = tmp_path / "bzImage"
    image.write_bytes(wrap_payload(payloads["xz"]))
    m = kvmm_machine(kernel=image, mem="64M", kernel_format=kernel_format, launch=False)
    regs, sregs = m.platform.vm.vcpus[0].get_regs(), m.platform.vm.vcpus[0].get_sregs()
    assert (m.platform.boot.kind, m.platform.boot.entry, regs.rip, regs.rsi) == ("bzImage", entry, entry, bp.BOOT_PARAMS_ADDR)
    assert sregs.efer & (1 << 10) and sregs.cr0 & (1 << 31) and sregs.cs.l == 1  # LMA, PG, 64-bit code


def test_unknown_kernel_format_is_a_usage_error(tmp_path: Path) -> None:
    res = run_kvmm("--kernel", str(tmp_path / "k"), "--kernel-format", "zimage")
    assert res.returncode == 2
    assert "invalid choice: 'zimage' (choose from 'auto', 'bzimage', 'flat', 'multiboot')" in res.stderr.decode()
