#!/usr/bin/env python3
"""Sequential-read throughput through kvmm's virtqueue + virtio-9p + 9P2000.L server,
next to a plain os.preadv of the same file (the physical limit of this host), in one run.

A mock driver (tests/virtio) reads the whole file in REQ-sized Tread requests, QDEPTH at a
time, laid out as Linux's zero-copy path lays them out (the 23-byte Tread in one buffer;
the 11-byte Rread header and the data in buffers of their own), through the legacy
virtio-PCI register block exactly as a guest's notify would drive it, minus the VM exit.

It also measures how long one request holds the I/O thread, with the page cache warm
and cold (the file's pages dropped with posix_fadvise(DONTNEED) first): the I/O thread
serves at most kvmm.virtio.p9.BUDGET requests per turn before other devices get theirs,
so a turn lasts at most BUDGET times that (docs/performance.md).

    scripts/bench_9p_queue.py [--size-mib 256] [--req-kib 512] [--qdepth 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_blk_queue import bench_preadv, print_read_table  # noqa: E402
from kvmm.memory import GuestMemory  # noqa: E402
from kvmm.p9 import wire as W  # noqa: E402
from kvmm.p9.server import FileServer, Limits  # noqa: E402
from kvmm.virtio import p9 as P  # noqa: E402
from virtio.harness import LegacyDriver  # noqa: E402

MIB = 1 << 20


class Mock9p:
    """A driver with QDEPTH zero-copy Tread slots on one open fid."""

    def __init__(self, path: str, req: int, qdepth: int) -> None:
        self.mem = GuestMemory.allocate((64 << 20) + qdepth * (req + 8192), check_available=False)
        self.server = FileServer(os.path.dirname(path), read_only=True, name="bench", limits=Limits())
        self.device = P.Virtio9p(self.server, self.mem, "bench")
        self.drv = LegacyDriver(self.device, self.mem)
        self.drv.init()
        self.q = self.drv.queues[0]
        self.req = req
        msize = req + 4096
        self._rpc(W.encode(W.TVERSION, W.NOTAG, "ds", msize, W.VERSION))
        self._rpc(W.encode(W.TATTACH, 1, "ddssd", 0, W.NOFID, b"bench", b"", 0))
        self._rpc(W.encode(W.TWALK, 2, "ddws", 0, 1, 1, os.path.basename(path).encode()))
        self._rpc(W.encode(W.TLOPEN, 3, "dd", 1, 0))
        self.slots = []  # (head, request buffer, reply header buffer)
        for _ in range(qdepth):
            tread, rhdr, data = self.q.alloc(23), self.q.alloc(11), self.q.alloc(req)
            head = self.q.build_chain([(tread, 23, False), (rhdr, 11, True), (data, req, True)])
            self.slots.append((head, tread, rhdr))
        self.by_head = {s[0]: s for s in self.slots}

    def _rpc(self, message: bytes) -> None:
        buf, reply = self.q.alloc(len(message), message), self.q.alloc(8192)
        head = self.q.build_chain([(buf, len(message), False), (reply, 8192, True)])
        self.q.publish(head)
        self.drv.kick()
        (used,) = self.q.take_used()
        assert self.mem.read_u8(reply + 4) == W.HEADER.unpack(message[:7])[1] + 1, "setup request failed"

    def read_all(self, size: int, latencies: list[float] | None = None) -> float:
        """Read ``size`` bytes; MiB/s. With ``latencies``: one request at a time, each timed."""
        nreq = size // self.req
        issued = done = 0
        free = list(self.slots) if latencies is None else self.slots[:1]
        t = time.perf_counter()
        while done < nreq:
            batch = []
            while free and issued < nreq:
                head, tread, _ = free.pop()
                self.mem.write(tread, W.encode(W.TREAD, issued & 0x7FFF, "dqd", 1, issued * self.req, self.req))
                batch.append(head)
                issued += 1
            self.q.publish(*batch)
            started = time.perf_counter()
            self.drv.kick()
            if latencies is not None:
                latencies.append(time.perf_counter() - started)
            for head, length in self.q.take_used():
                assert length == 11 + self.req, f"short read: {length}"
                free.append(self.by_head[head])
                done += 1
            self.drv.isr()
        return size / (time.perf_counter() - t)

    def close(self) -> None:
        self.device.close()


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--req-kib", type=int, default=512)
    ap.add_argument("--qdepth", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to make the file (default: a temporary directory)")
    args = ap.parse_args()
    size, req = args.size_mib * MIB, args.req_kib << 10
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "file.bin")
        with open(path, "wb") as f:
            chunk = os.urandom(MIB)
            for _ in range(args.size_mib):
                f.write(chunk)
        bench_preadv(path, size, req)  # warm the page cache
        host, host_q, kvmm = [], [], []
        for _ in range(args.runs):  # interleaved, so all see the same machine state
            host.append(bench_preadv(path, size, req))
            host_q.append(bench_preadv(path, size, req, args.qdepth))
            m = Mock9p(path, req, args.qdepth)
            kvmm.append(m.read_all(size))
            m.close()
        warm: list[float] = []
        m = Mock9p(path, req, 1)
        m.read_all(size, warm)
        drop_cache(path)
        cold: list[float] = []
        m.read_all(size, cold)
        m.close()
    print_read_table(args, host, host_q, f"kvmm virtqueue+virtio-9p Tread, qd {args.qdepth}", kvmm, width=44)
    print(f"one {args.req_kib} KiB Tread on the I/O thread (ms): page cache warm p50 {pct(warm, .5) * 1e3:.2f} "
          f"p99 {pct(warm, .99) * 1e3:.2f}; cold p50 {pct(cold, .5) * 1e3:.2f} p99 {pct(cold, .99) * 1e3:.2f} "
          f"max {max(cold) * 1e3:.1f}")
    print(f"longest I/O-thread turn at budget {P.BUDGET} (budget x cold p99): {P.BUDGET * pct(cold, .99) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
