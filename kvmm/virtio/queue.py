"""Split virtqueues on guest memory (virtio 0.9.5, "Appendix A: virtio_ring.h"; the
same ring is section 2.6 of virtio 1.x).

Everything in the rings is written by the guest and untrusted. Following rust-vmm's
virtio-queue, each descriptor is read once into an immutable :class:`Descriptor`, then
validated; a chain is walked with a time-to-live so a cyclic chain ends; indirect tables
may not nest. Two tiers of error, as Firecracker:

- :class:`ChainError`: one malformed request (bad ``next``, a loop, a buffer outside RAM,
  a length overflow, nested indirect). The device completes it with an error and goes on.
- :class:`QueueError`: the ring itself is impossible (an available index that moved by
  more than the queue size, a head index out of range). The driver is broken or hostile;
  the device stops the queue and sets DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import KvmmError, SnapshotError
from ..memory import GuestMemory
from ..state import check_range

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29

LEGACY_VRING_ALIGN = 4096
MAX_QUEUE_SIZE = 32768  # virtio: queue sizes are powers of two up to 32768
DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class QueueError(KvmmError):
    """The ring state is impossible: the queue must stop until the driver resets it."""


class ChainError(KvmmError):
    """One descriptor chain is malformed; it is completed with an error."""

    def __init__(self, head: int, reason: str) -> None:
        self.head = head
        super().__init__(f"descriptor chain {head}: {reason}")


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One split-ring descriptor as read from guest memory, once (virtio 0.9.5, 2.3.2)."""

    addr: int
    length: int
    flags: int
    next: int

    @property
    def is_write_only(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_WRITE)


@dataclass(frozen=True, slots=True)
class Chain:
    """A validated descriptor chain: ``head`` goes back in the used ring when it is done."""

    head: int
    descriptors: tuple[Descriptor, ...]

    @property
    def readable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if not d.is_write_only]

    @property
    def writable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if d.is_write_only]


def legacy_layout(pfn_addr: int, size: int) -> tuple[int, int, int, int]:
    """(desc, avail, used, total bytes) of a legacy ring at ``pfn_addr`` (0.9.5 2.3)."""
    desc = pfn_addr
    avail = desc + DESC_SIZE * size
    avail_end = avail + 2 * (3 + size)
    used = (avail_end + LEGACY_VRING_ALIGN - 1) & ~(LEGACY_VRING_ALIGN - 1)
    used_end = used + 2 * 3 + 8 * size
    return desc, avail, used, used_end - pfn_addr


@dataclass
class QueueState:
    """One queue as the driver set it up and the device has served it (snapshot format)."""

    size: int
    pfn: int
    ready: bool
    broken: bool
    last_avail_idx: int
    used_idx: int
    signalled_used: int | None


class Queue:
    """Device side of one split virtqueue."""

    def __init__(self, max_size: int) -> None:
        if max_size <= 0 or max_size > MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.mem: GuestMemory | None = None
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.broken = False
        self.desc = self.avail = self.used = 0
        self.pfn = 0
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used: int | None = None  # used idx at the last interrupt (event idx)
        self.event_idx = False
        self.notify_on_empty = False

    # --- set-up ---------------------------------------------------------------------------
    def activate_legacy(self, mem: GuestMemory, pfn: int) -> bool:
        """Place the rings at ``pfn << 12`` (legacy QUEUE_PFN); False if they do not fit."""
        desc, avail, used, total = legacy_layout(pfn << 12, self.size)
        if not mem.contains(desc, total):
            return False
        self.mem = mem
        self.pfn = pfn
        self.desc, self.avail, self.used = desc, avail, used
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = None
        self.broken = False
        self.ready = True
        return True

    def save_state(self) -> QueueState:
        return QueueState(self.size, self.pfn, self.ready, self.broken, self.last_avail_idx, self.used_idx,
                          self.signalled_used)

    def load_state(self, mem: GuestMemory, st: QueueState, where: str) -> None:
        """Re-place the queue as saved. The geometry goes through the same check as the
        driver's QUEUE_PFN write; indices must be 16-bit ring positions."""
        self.reset()
        if st.size != self.max_size:
            raise SnapshotError(f"{where}: size {st.size}, the device's queue has {self.max_size}")
        for name in ("last_avail_idx", "used_idx"):
            check_range(f"{where}.{name}", getattr(st, name), 0, 0xFFFF)
        if st.signalled_used is not None:
            check_range(f"{where}.signalled_used", st.signalled_used, 0, 0xFFFF)
        if not st.ready:
            return
        check_range(f"{where}.pfn", st.pfn, 1, 0xFFFF_FFFF)
        if not self.activate_legacy(mem, st.pfn):  # the QUEUE_PFN check
            raise SnapshotError(f"{where}: rings at PFN {st.pfn:#x} lie outside guest RAM")
        self.last_avail_idx, self.used_idx, self.signalled_used = st.last_avail_idx, st.used_idx, st.signalled_used
        self.broken = st.broken

    # --- available ring -----------------------------------------------------------------
    def _avail_idx(self) -> int:
        assert self.mem is not None
        return self.mem.read_u16(self.avail + 2)

    def has_available(self) -> bool:
        return self.ready and not self.broken and self._avail_idx() != self.last_avail_idx

    def pop(self) -> Chain | None:
        """The next available chain, or None. Raises QueueError or ChainError."""
        if not self.ready or self.broken:
            return None
        mem = self.mem
        assert mem is not None
        avail_idx = mem.read_u16(self.avail + 2)
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            # 2.4.9.2 (1.x): the driver never has more than queue-size buffers outstanding;
            # a larger jump is a broken or hostile driver, and would make us spin.
            self.broken = True
            raise QueueError(f"available index moved by {pending}, more than the queue size {self.size}")
        head = mem.read_u16(self.avail + 4 + 2 * (self.last_avail_idx % self.size))
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            # Ask to be notified when the driver adds the next buffer (avail_event).
            mem.write_u16(self.used + 4 + 8 * self.size, self.last_avail_idx)
        if head >= self.size:
            self.broken = True
            raise QueueError(f"available ring entry {head} is outside the queue of {self.size}")
        return Chain(head, self._walk(head))

    def undo_pop(self) -> None:
        """Give the last popped chain back (the device could not use it yet)."""
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF

    def _read_desc(self, addr: int) -> Descriptor:
        assert self.mem is not None
        return Descriptor(*self.mem.read_struct(addr, _DESC))

    def _walk(self, head: int) -> tuple[Descriptor, ...]:
        """Follow ``next`` (and at most one level of indirection) from ``head``."""
        mem = self.mem
        assert mem is not None
        out: list[Descriptor] = []
        total = 0
        table, table_len = self.desc, self.size
        index = head
        ttl = self.size  # a chain longer than its table must loop
        indirect = False
        while True:
            if index >= table_len:
                raise ChainError(head, f"next index {index} is outside a table of {table_len}")
            if ttl == 0:
                raise ChainError(head, "chain is longer than its descriptor table (a loop)")
            ttl -= 1
            d = self._read_desc(table + DESC_SIZE * index)
            if d.flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise ChainError(head, "indirect descriptor inside an indirect table")
                if d.flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(head, "indirect descriptor with NEXT set")
                if out:
                    raise ChainError(head, "indirect descriptor after direct ones")
                if d.length == 0 or d.length % DESC_SIZE or d.length // DESC_SIZE > MAX_QUEUE_SIZE:
                    raise ChainError(head, f"indirect table of {d.length} bytes")
                if not mem.contains(d.addr, d.length):
                    raise ChainError(head, f"indirect table at {d.addr:#x} is outside guest RAM")
                indirect = True
                table, table_len = d.addr, d.length // DESC_SIZE
                ttl = table_len
                index = 0
                continue
            if not mem.contains(d.addr, d.length):
                raise ChainError(head, f"buffer [{d.addr:#x}, +{d.length:#x}) is outside guest RAM")
            total += d.length
            if total > 0xFFFF_FFFF:
                raise ChainError(head, "total chain length overflows 32 bits")
            out.append(d)
            if not d.flags & VIRTQ_DESC_F_NEXT:
                return tuple(out)
            index = d.next

    # --- used ring ----------------------------------------------------------------------
    def push_used(self, head: int, length: int) -> None:
        """Return ``head`` to the driver; the element is written before the index (2.4.8)."""
        mem = self.mem
        assert mem is not None
        mem.write_struct(self.used + 4 + 8 * (self.used_idx % self.size), _USED_ELEM, head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        mem.write_u16(self.used + 2, self.used_idx)

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the used entries pushed so far."""
        mem = self.mem
        assert mem is not None
        new = self.used_idx
        if self.event_idx:
            old = self.signalled_used
            self.signalled_used = new
            if old is None:
                return True
            used_event = mem.read_u16(self.avail + 4 + 2 * self.size)
            # vring_need_event(): interrupt if used_event lies in (old, new].
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        if self.notify_on_empty and not self.has_available():
            return True  # VIRTIO_F_NOTIFY_ON_EMPTY: ran out of buffers, interrupt anyway
        return not mem.read_u16(self.avail) & VRING_AVAIL_F_NO_INTERRUPT

    def set_notify_suppressed(self, suppressed: bool) -> None:
        """VRING_USED_F_NO_NOTIFY: ask the driver not to kick while we are processing."""
        if self.ready and not self.event_idx and self.mem is not None:
            self.mem.write_u16(self.used, VRING_USED_F_NO_NOTIFY if suppressed else 0)
