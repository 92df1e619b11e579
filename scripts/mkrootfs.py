#!/usr/bin/env python3
"""Build an ext4 root file system image without root or loop mounts (mkfs.ext4 -d).

    scripts/mkrootfs.py -o root.img [--size 64M] [--init busybox|spin]

/sbin/init is a busybox shell script (``busybox``) or a static program that spins without
system calls (``spin``, for hosts where guest user space cannot make system calls).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mkinitramfs import BUSYBOX, BUSYBOX_INIT, build_spin_init  # noqa: E402


def populate(root: Path, init: str) -> None:
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "root"):
        (root / d).mkdir()
    (root / "etc" / "hostname").write_text("kvmm-guest\n")
    if init == "busybox":
        if not BUSYBOX.exists():
            sys.exit("mkrootfs: /bin/busybox is missing: apt-get install busybox-static")
        shutil.copy(BUSYBOX, root / "bin" / "busybox")
        os.symlink("busybox", root / "bin" / "sh")
        (root / "sbin" / "init").write_text(BUSYBOX_INIT)
        (root / "sbin" / "init").chmod(0o755)
    else:
        build_spin_init(root / "sbin" / "init")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--size", default="64M", help="image size for mkfs.ext4 (default 64M)")
    ap.add_argument("--init", choices=("busybox", "spin"), default="busybox")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        populate(root, args.init)
        out = args.output + ".tmp"
        if os.path.exists(out):
            os.unlink(out)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "kvmm-root", "-E", "root_owner=0:0", "-d", str(root), out, args.size],
                       check=True, stdout=subprocess.DEVNULL)
        os.replace(out, args.output)
    print(args.output)


if __name__ == "__main__":
    main()
