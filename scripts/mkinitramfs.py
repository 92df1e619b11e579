#!/usr/bin/env python3
"""Build a gzip'd initramfs (cpio "newc") without root: device nodes are written into the
archive, never created on the host.

    scripts/mkinitramfs.py -o initramfs.cpio.gz --init busybox   # /init: busybox shell
    scripts/mkinitramfs.py -o initramfs.cpio.gz --init spin      # /init: spins, no syscalls

``busybox`` takes Debian's busybox-static (/bin/busybox). ``spin`` is a static program
that loops on ``pause`` without making a system call, which keeps a kernel alive where
guest user space cannot make system calls (software-nested KVM, see the host notes).
"""

from __future__ import annotations

import argparse
import gzip
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUSYBOX = Path("/bin/busybox")

BUSYBOX_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s
echo "kvmm-guest: user space is up; exit the shell to reset the VM"
setsid cttyhack sh
reboot -f
"""


class Cpio:
    """A minimal writer of the SVR4 "newc" format the kernel unpacks (initramfs-buffer-format.rst)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        namez = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0]
        self.ino += 1
        self.out += b"070701" + b"".join(b"%08X" % f for f in fields) + namez
        self.out += b"\0" * (-len(self.out) % 4)
        self.out += data
        self.out += b"\0" * (-len(self.out) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.out)


def build_spin_init(out: Path) -> None:
    """Compile scripts/spin-init.S into a static program with no system calls."""
    subprocess.run(
        ["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none", "-o", str(out), str(HERE / "spin-init.S")],
        check=True,
    )


def initramfs(init: str, compress: bool = True) -> bytes:
    c = Cpio()
    for d in ("dev", "proc", "sys", "tmp", "bin", "sbin"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    if init == "busybox":
        if not BUSYBOX.exists():
            sys.exit("mkinitramfs: /bin/busybox is missing: apt-get install busybox-static")
        c.file("bin/busybox", BUSYBOX.read_bytes())
        c.symlink("bin/sh", "busybox")
        c.file("init", BUSYBOX_INIT.encode())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            exe = Path(tmp) / "init"
            build_spin_init(exe)
            c.file("init", exe.read_bytes())
    archive = c.finish()
    return gzip.compress(archive, mtime=0) if compress else archive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--init", choices=("busybox", "spin"), default="busybox")
    ap.add_argument("--compress", choices=("gzip", "none"), default="gzip",
                    help="none saves the guest's inflate, which is slow where KVM emulates guest code")
    args = ap.parse_args()
    data = initramfs(args.init, args.compress == "gzip")
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, args.output)
    print(args.output)


if __name__ == "__main__":
    main()
