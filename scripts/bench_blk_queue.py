#!/usr/bin/env python3
"""Sequential-read throughput through kvmm's virtqueue + virtio-blk code, next to a plain
os.preadv of the same file (the physical limit of this host, page cache warm).

A mock driver (tests/virtio) reads the whole image in REQ-sized requests, QDEPTH at a
time, through the legacy virtio-PCI register block, exactly as a guest's notify would
drive it, minus the VM exit. Prints a table and the ratio.

    scripts/bench_blk_queue.py [--size-mib 256] [--req-kib 1024] [--qdepth 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from kvmm.memory import GuestMemory  # noqa: E402
from kvmm.virtio import blk as B  # noqa: E402
from virtio.harness import LegacyDriver  # noqa: E402


def bench_preadv(path: str, size: int, req: int, nbufs: int = 1) -> float:
    """Plain preadv into ``nbufs`` rotating buffers of an anonymous mapping (as the guest's)."""
    import mmap

    area = memoryview(mmap.mmap(-1, req * nbufs))
    bufs = [area[i * req : (i + 1) * req] for i in range(nbufs)]
    fd = os.open(path, os.O_RDONLY)
    t = time.perf_counter()
    off = i = 0
    while off < size:
        off += os.preadv(fd, [bufs[i % nbufs]], off)
        i += 1
    dt = time.perf_counter() - t
    os.close(fd)
    return size / dt


def bench_queue(path: str, size: int, req: int, qdepth: int) -> float:
    mem = GuestMemory.allocate((64 << 20) + qdepth * req, check_available=False)
    disk = B.RawDisk(path, read_only=True)
    drv = LegacyDriver(B.VirtioBlk(disk, mem), mem)
    drv.init()
    q = drv.queues[0]
    # Pre-build qdepth request slots (header, data, status), re-published as they complete.
    slots = []
    for _ in range(qdepth):
        hdr, data, status = q.alloc(16), q.alloc(req), q.alloc(1)
        head = q.build_chain([(hdr, 16, False), (data, req, True), (status, 1, True)])
        slots.append((head, hdr, status))
    sectors_per_req = req // 512
    nreq = size // req
    t = time.perf_counter()
    issued = done = 0
    free = list(slots)
    by_head = {s[0]: s for s in slots}
    while done < nreq:
        batch = []
        while free and issued < nreq:
            head, hdr, _ = free.pop()
            mem.write(hdr, struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, issued * sectors_per_req))
            batch.append(head)
            issued += 1
        q.publish(*batch)
        drv.kick()
        for head, length in q.take_used():
            assert length == req + 1 and mem.read_u8(by_head[head][2]) == B.VIRTIO_BLK_S_OK
            free.append(by_head[head])
            done += 1
        drv.isr()
    dt = time.perf_counter() - t
    disk.close()
    return size / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--req-kib", type=int, default=1024)
    ap.add_argument("--qdepth", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size, req = args.size_mib << 20, args.req_kib << 10
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.img")
        with open(path, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(args.size_mib):
                f.write(chunk)
        bench_preadv(path, size, req)  # warm the page cache
        host, host_q, kvmm = [], [], []
        for _ in range(args.runs):  # interleaved, so all see the same machine state
            host.append(bench_preadv(path, size, req))
            host_q.append(bench_preadv(path, size, req, args.qdepth))
            kvmm.append(bench_queue(path, size, req, args.qdepth))
    print_read_table(args, host, host_q, f"kvmm virtqueue+virtio-blk, qd {args.qdepth}", kvmm, width=40)


def print_read_table(args: argparse.Namespace, host: list[float], host_q: list[float], kvmm_name: str,
                     kvmm: list[float], width: int) -> None:
    """The sequential-read table (MiB/s) and kvmm's ratios to the host's preadv; the
    virtio-9p bench prints the same one."""
    mib = 1 << 20
    print(f"sequential read of {args.size_mib} MiB in {args.req_kib} KiB requests, {args.runs} runs (MiB/s)")
    print(f"{'path':<{width}}{'median':>10}{'min':>10}{'max':>10}")
    rows = (("host preadv, one hot buffer", host), (f"host preadv, {args.qdepth} buffers", host_q), (kvmm_name, kvmm))
    for name, vals in rows:
        print(f"{name:<{width}}{statistics.median(vals) / mib:>10.0f}{min(vals) / mib:>10.0f}{max(vals) / mib:>10.0f}")
    k = statistics.median(kvmm)
    print(f"ratio kvmm / host preadv (same {args.qdepth} buffers): {k / statistics.median(host_q):.2f}")
    print(f"ratio kvmm / host preadv (one hot buffer): {k / statistics.median(host):.2f}")


if __name__ == "__main__":
    main()
