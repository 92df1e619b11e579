"""Compile the freestanding test guests (tests/guests/*.c) into ELF images kvmm boots."""

from __future__ import annotations

import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
CFLAGS = [
    "-O2", "-ffreestanding", "-fno-pic", "-fno-pie", "-no-pie", "-nostdlib", "-static",
    "-mno-red-zone", "-mgeneral-regs-only", "-fno-stack-protector", "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables", "-Wall", "-Werror",
    "-Wl,--build-id=none", "-Wl,-n", "-Wl,--no-warn-rwx-segments", f"-Wl,-T,{HERE / 'guest.ld'}",
]


# The 32-bit multiboot guests (mb_*.c): kvmm's multiboot loader enters them in 32-bit
# protected mode (tests/guests/multiboot.ld, mb.h). gcc's -m32 needs no 32-bit libraries
# for a freestanding program linked without them.
MB_CFLAGS = ["-m32", *(f for f in CFLAGS if f not in ("-mno-red-zone",) and not f.startswith("-Wl,-T")),
             f"-Wl,-T,{HERE / 'multiboot.ld'}"]

# Guests built from another guest's source with extra flags.
VARIANTS = {"virtio_notify_msix": ("virtio_notify", ["-DUSE_MSIX"]),
            "mb_info_aout": ("mb_info", ["-DAOUT_KLUDGE"]),
            "acpi_reset": ("acpi_poweroff", ["-DRESET"])}
# Variants shipped as a flat binary (objcopy -O binary): only the header's addresses
# (the a.out kludge, Multiboot 3.1.3) can load them.
FLAT_BINARY = {"mb_info_aout"}


def build_guest(name: str, outdir: Path) -> Path:
    base, extra = VARIANTS.get(name, (name, []))
    src = HERE / f"{base}.c"
    out = outdir / f"{name}.elf"
    flags = MB_CFLAGS if base.startswith("mb_") else CFLAGS
    deps = (src, *HERE.glob("*.h"), *HERE.glob("*.ld"))
    if not out.exists() or out.stat().st_mtime < max(p.stat().st_mtime for p in deps):
        subprocess.run(["gcc", *flags, *extra, "-o", str(out), str(src)], check=True)
    if name in FLAT_BINARY:
        flat = outdir / f"{name}.bin"
        if not flat.exists() or flat.stat().st_mtime < out.stat().st_mtime:
            subprocess.run(["objcopy", "-O", "binary", str(out), str(flat)], check=True)
        return flat
    return out
