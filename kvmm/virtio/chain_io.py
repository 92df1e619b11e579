"""Reading and writing a descriptor chain's buffers as one stream (rust-vmm virtio-queue's
``descriptor_utils::Reader``/``Writer``).

A :class:`Reader` walks a chain's device-readable buffers, a :class:`Writer` its
device-writable ones, in order, across descriptor boundaries. Both are capped at a byte
``limit``: overlapping descriptors can claim more bytes than the guest has, so a device
caps what it takes before the host allocates anything (Firecracker caps rng requests at
64 KiB). Every access goes through :class:`~kvmm.memory.GuestMemory`; the chain's buffers
were bounds-checked when it was popped (queue.py), and are checked again on each access.

``views(n)`` gives the next ``n`` bytes as memoryviews of guest RAM for zero-copy
``preadv``/``pwritev``/``readv``/``writev`` without consuming them; ``consume(n)``
then advances past what the system call moved.
"""

from __future__ import annotations

import struct
from typing import Any, Iterable

from ..memory import GuestMemory
from .queue import Descriptor


class _Cursor:
    """A position in a list of guest buffers, with at most ``limit`` bytes left."""

    def __init__(self, mem: GuestMemory, descriptors: Iterable[Descriptor], limit: int | None = None) -> None:
        self.mem = mem
        self._buffers = [(d.addr, d.length) for d in descriptors if d.length]
        self._index = 0  # the buffer the cursor is in
        self._offset = 0  # bytes of it already consumed
        total = sum(n for _, n in self._buffers)
        self._left = total if limit is None else min(total, max(limit, 0))
        self.done = 0  # bytes consumed so far

    @property
    def available(self) -> int:
        """Bytes left to read or write (within the limit)."""
        return self._left

    def _spans(self, n: int) -> list[tuple[int, int]]:
        """(address, length) pieces of the next ``min(n, available)`` bytes."""
        n = min(n, self._left)
        out = []
        index, offset = self._index, self._offset
        while n > 0:
            addr, length = self._buffers[index]
            take = min(length - offset, n)
            out.append((addr + offset, take))
            n -= take
            index, offset = index + 1, 0
        return out

    def consume(self, n: int) -> None:
        """Advance past ``n`` bytes (at most what is available)."""
        n = min(n, self._left)
        self._left -= n
        self.done += n
        while n > 0:
            _addr, length = self._buffers[self._index]
            take = min(length - self._offset, n)
            n -= take
            self._offset += take
            if self._offset == length:
                self._index, self._offset = self._index + 1, 0

    def views(self, n: int) -> list[memoryview]:
        """The next ``min(n, available)`` bytes as views of guest RAM (not consumed)."""
        return [self.mem.view(addr, length) for addr, length in self._spans(n)]


class Reader(_Cursor):
    """The device-readable buffers of a chain, as a stream."""

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the buffers or the limit)."""
        data = b"".join(self.mem.read(addr, length) for addr, length in self._spans(n))
        self.consume(len(data))
        return data

    def read_exact(self, n: int) -> bytes | None:
        """Exactly ``n`` bytes, or None (and nothing consumed) if fewer are left."""
        return self.read(n) if self.available >= n else None

    def read_struct(self, fmt: struct.Struct) -> tuple[Any, ...] | None:
        """One ``fmt``-sized record, or None if the buffers hold less."""
        data = self.read_exact(fmt.size)
        return None if data is None else fmt.unpack(data)


class Writer(_Cursor):
    """The device-writable buffers of a chain, as a stream. :attr:`done` is the number
    of bytes written: the used element's length."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write as much of ``data`` as fits; returns the bytes written."""
        view = memoryview(data).cast("B")
        written = 0
        for addr, length in self._spans(len(view)):
            self.mem.write(addr, view[written : written + length])
            written += length
        self.consume(written)
        return written

    def write_all(self, data: bytes | bytearray | memoryview) -> bool:
        """Write all of ``data``, or nothing (False) if it does not fit."""
        if len(data) > self.available:
            return False
        self.write(data)
        return True

    def reserve(self, n: int) -> list[tuple[int, int]] | None:
        """Skip ``n`` bytes to fill in later with :meth:`write_at` (a header whose
        contents depend on what follows); None, with nothing consumed, if fewer are left."""
        if n > self.available:
            return None
        spans = self._spans(n)
        self.consume(n)
        return spans

    def write_at(self, spans: list[tuple[int, int]], data: bytes, offset: int = 0) -> None:
        """Write ``data`` at ``offset`` into bytes set aside by :meth:`reserve`."""
        view = memoryview(data)
        for addr, length in spans:
            if not view:
                return
            if offset >= length:
                offset -= length
                continue
            take = min(length - offset, len(view))
            self.mem.write(addr + offset, view[:take])
            view = view[take:]
            offset = 0
