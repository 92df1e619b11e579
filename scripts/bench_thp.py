#!/usr/bin/env python3
"""Huge pages on guest RAM: measured, not assumed (docs/performance.md).

kvmm maps guest RAM as private anonymous memory and does not madvise(MADV_HUGEPAGE) it;
a host whose THP setting is "madvise" (Debian's default) then backs it with 4 KiB pages.
This measures what the advice would change, side by side in one run (interleaved, fresh
processes):

- the host's cost of touching guest RAM, as the ELF loader's zero fill does (64 and
  256 MiB written into 512 MiB of guest RAM), and the AnonHugePages it ends with;
- the start-up run of scripts/bench (flat image, 256 MiB): wall, CPU, peak RSS;

each with madvise(MADV_HUGEPAGE), with no advice (kvmm), and, when the host has enough
reserved huge pages (/proc/sys/vm/nr_hugepages: 512 MiB for the fills), with
``--hugepages`` (hugetlbfs, MAP_HUGETLB).

    scripts/bench_thp.py [--python PY] [--runs 15]

--python: the interpreter whose kvmm is measured (default: this one, importing this
checkout). The virtio-blk case of scripts/bench has its own MADV_HUGEPAGE row.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["PYTHONPATH"] = str(ROOT)

# Guest RAM allocated as kvmm allocates it, advised or not before anything touches it.
ALLOCATE = """
import mmap
from kvmm.memory import GuestMemory
mem = GuestMemory.allocate({size}, hugepages={hugetlb}, check_available=False)
if {advise}:
    mem._map.madvise(mmap.MADV_HUGEPAGE)
"""

FILL = ALLOCATE + """
import time
t = time.perf_counter()
mem.fill(0x100000, {mib} << 20)
dt = time.perf_counter() - t
huge = next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))
print(dt, huge)
"""

# The kvmm command's run with guest RAM advised: GuestMemory.allocate wrapped before the
# command imports the rest (kvmm.cli's main allocates RAM first).
START = """
import mmap, sys
from kvmm.memory import GuestMemory
allocate = GuestMemory.allocate
def advised(*a, **kw):
    mem = allocate(*a, **kw)
    if {advise}:
        mem._map.madvise(mmap.MADV_HUGEPAGE)
    return mem
GuestMemory.allocate = advised
sys.argv[0] = "kvmm"
from kvmm.cli import run
sys.exit(run())
"""


def fill(python: str, advise: bool, mib: int, hugetlb: bool = False) -> tuple[float, float]:
    out = subprocess.run([python, "-c", FILL.format(size=512 << 20, advise=advise, mib=mib, hugetlb=hugetlb)], env=ENV,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1]) / 1024


def start(python: str, advise: bool, image: Path, hugetlb: bool = False) -> tuple[float, float, float]:
    rss = tempfile.NamedTemporaryFile()
    cmd = ["/usr/bin/time", "-q", "-f", "%M", "-o", rss.name, python, "-c", START.format(advise=advise),
           "-q", "--kernel", str(image), "--mem", "256M", "--console", "file:/dev/null", "--kernel-format", "flat",
           "--no-rng", *(["--hugepages"] if hugetlb else [])]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit("bench_thp: the kvmm run failed")
    return wall, usage.ru_utime + usage.ru_stime, int(open(rss.name).read().split()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmm-thp-") as tmp:
        subprocess.run([str(ROOT / "scripts" / "bench_guests" / "build.sh"), tmp], check=True, capture_output=True)
        image = Path(tmp) / "flat_reset.bin"
        fill_cols, start_cols = ("s", "AnonHuge MiB"), ("wall s", "CPU s", "RSS MiB")
        cases: dict[str, tuple[Callable[[], tuple[float, ...]], tuple[str, ...]]] = {}
        free = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("HugePages_Free"))
        if free * 2 >= 512:  # 2 MiB pages: the fills' 512 MiB of guest RAM
            cases["fill 64 MiB, --hugepages"] = (functools.partial(fill, args.python, False, 64, True), fill_cols)
            cases["fill 256 MiB, --hugepages"] = (functools.partial(fill, args.python, False, 256, True), fill_cols)
            cases["start-up, --hugepages"] = (functools.partial(start, args.python, False, image, True), start_cols)
        else:
            print(f"bench_thp: {free} huge pages free, 256 needed: no --hugepages rows", file=sys.stderr)
        for advise in (True, False):
            how = "MADV_HUGEPAGE" if advise else "no advice (kvmm)"
            cases[f"fill 64 MiB, {how}"] = (functools.partial(fill, args.python, advise, 64), fill_cols)
            cases[f"fill 256 MiB, {how}"] = (functools.partial(fill, args.python, advise, 256), fill_cols)
            cases[f"start-up, {how}"] = (functools.partial(start, args.python, advise, image), start_cols)
        results: dict[str, list[tuple[float, ...]]] = {name: [] for name in cases}
        order = list(cases)
        for name in order:  # warm-up
            cases[name][0]()
        for _ in range(args.runs):
            random.shuffle(order)
            for name in order:
                results[name].append(cases[name][0]())
    print(f"median (min-max) of {args.runs} runs each, interleaved")
    for name, runs in sorted(results.items()):
        cols = zip(cases[name][1], zip(*runs))
        print(f"{name:<34}" + "   ".join(f"{label} {statistics.median(c):.3f} ({min(c):.3f}-{max(c):.3f})"
                                         for label, c in cols))


if __name__ == "__main__":
    main()
