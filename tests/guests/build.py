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


# Guests built from another guest's source with extra flags.
VARIANTS = {"virtio_notify_msix": ("virtio_notify", ["-DUSE_MSIX"])}


def build_guest(name: str, outdir: Path) -> Path:
    base, extra = VARIANTS.get(name, (name, []))
    src = HERE / f"{base}.c"
    out = outdir / f"{name}.elf"
    if not out.exists() or out.stat().st_mtime < max(p.stat().st_mtime for p in (src, *HERE.glob("*.h"))):
        subprocess.run(["gcc", *CFLAGS, *extra, "-o", str(out), str(src)], check=True)
    return out
