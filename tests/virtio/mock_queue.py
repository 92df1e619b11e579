"""The driver side of a split virtqueue, for device tests (as rust-vmm's MockSplitQueue
and Firecracker's VirtQueue helper): build descriptor chains in guest memory, publish
them in the available ring, and read back the used ring."""

from __future__ import annotations

import struct

from kvmm.memory import GuestMemory
from kvmm.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    legacy_layout,
)

Buffer = tuple[int, int, bool]  # (guest address, length, device-writable)


class MockQueue:
    def __init__(self, mem: GuestMemory, pfn: int, size: int, data_base: int) -> None:
        self.mem = mem
        self.pfn = pfn
        self.size = size
        self.desc, self.avail, self.used, self.ring_bytes = legacy_layout(pfn << 12, size)
        self.next_desc = 0
        self.avail_idx = 0
        self.used_seen = 0
        self.data_next = data_base

    # --- memory for buffers ---------------------------------------------------------
    def alloc(self, n: int, fill: bytes = b"") -> int:
        addr = self.data_next
        self.data_next = (addr + n + 15) & ~15
        if fill:
            self.mem.write(addr, fill)
        return addr

    # --- descriptors ----------------------------------------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0, table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, next_))

    def build_chain(self, buffers: list[Buffer]) -> int:
        """Consecutive descriptors linked with NEXT; returns the head index."""
        head = self.next_desc
        for i, (addr, length, writable) in enumerate(buffers):
            index = (head + i) % self.size
            last = i == len(buffers) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(index, addr, length, flags, (index + 1) % self.size)
        self.next_desc = (head + len(buffers)) % self.size
        return head

    def build_indirect_chain(self, buffers: list[Buffer]) -> int:
        """One descriptor pointing at an indirect table holding ``buffers``."""
        table = self.alloc(16 * len(buffers))
        for i, (addr, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(i, addr, length, flags, i + 1, table=table)
        head = self.next_desc
        self.write_desc(head, table, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT)
        self.next_desc = (head + 1) % self.size
        return head

    # --- available ring ---------------------------------------------------------------
    def publish(self, *heads: int) -> None:
        for head in heads:
            self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value)

    def start_indices_at(self, idx: int) -> None:
        """Pretend the ring has already wrapped this far (device must agree on its side)."""
        self.avail_idx = idx
        self.used_seen = idx
        self.mem.write_u16(self.avail + 2, idx)
        self.mem.write_u16(self.used + 2, idx)

    # --- used ring ------------------------------------------------------------------
    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def take_used(self) -> list[tuple[int, int]]:
        """(id, len) of every used element added since the last call."""
        out = []
        end = self.used_idx()
        while self.used_seen != end:
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (self.used_seen % self.size), 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def check_used(self, head: int, length: int) -> None:
        used = self.take_used()
        assert used == [(head, length)], f"used ring holds {used}, expected [({head}, {length})]"
