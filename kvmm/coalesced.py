"""Coalesced port writes: guest writes that queue in a ring instead of exiting.

With KVM_CAP_COALESCED_PIO, KVM appends a guest's write to a registered port range to a
ring shared with kvmm (one page of every vCPU's mapping, at the page number the
capability returns) and lets the vCPU run on; only when the ring is full does the write
exit as usual. kvmm replays the queued writes, in order, through the port bus:

- on a vCPU thread before it handles any exit, so a later access of that vCPU (an LSR
  read, an LCR write) always sees the effect of its earlier queued writes;
- on the I/O thread at each turn of its loop (at most 50 ms apart), for a guest that
  writes and then stays inside the guest;
- when the VM pauses or stops, so a snapshot or the console sees every write.

kvmm queues only writes that need no answer at once: the 8250's transmit register while
its THR-empty interrupt is disabled (a polling driver, as Linux's console write is);
enabling the interrupt stops the coalescing, since the interrupt must follow each write
and a guest waiting for it in HLT (handled in the kernel) would never exit to drain it.
"""

from __future__ import annotations

import logging
import struct
import threading

from .devices.bus import PioBus
from .kvm.system import Vm
from .ratelimit import RateLimitedLog

LOG = logging.getLogger(__name__)
_LOG = RateLimitedLog(LOG)  # the ring is written as the guest writes the port: never a flood of lines

_HEADER = struct.Struct("<II")  # first, last (kvm_coalesced_mmio_ring)
_ENTRY = struct.Struct("<QII8s")  # phys_addr (the port), len, pio, data


class CoalescedPio:
    def __init__(self, vm: Vm, ring: memoryview, pio: PioBus) -> None:
        self.vm = vm
        self.ring = ring
        self.pio = pio
        self.capacity = (len(ring) - _HEADER.size) // _ENTRY.size  # KVM_COALESCED_MMIO_MAX
        self.lock = threading.Lock()
        self.replayed = 0

    def set_zone(self, port: int, size: int, enabled: bool) -> None:
        """Queue (or stop queueing) writes to ``[port, port+size)``; the ring is drained
        first, so nothing queued is replayed after a later, exiting write."""
        if ((port, size) in self.vm.coalesced_pio) == enabled:  # e.g. registered with the VM (x86.create_vm)
            return
        self.drain()
        self.vm.coalesce_pio(port, size, enabled)

    def pending(self) -> bool:
        first, last = _HEADER.unpack_from(self.ring, 0)
        return first != last

    def drain(self) -> int:
        """Replay every queued write through the port bus; returns how many."""
        with self.lock:
            first, last = _HEADER.unpack_from(self.ring, 0)
            if not (first < self.capacity and last < self.capacity):  # KVM's to keep right; never trust a shared page
                _LOG.error("coalesced ring indices %d/%d outside its %d entries: dropped", first, last, self.capacity)
                _HEADER.pack_into(self.ring, 0, last % self.capacity, last % self.capacity)
                return 0
            n = 0
            while first != last:
                port, length, _pio, data = _ENTRY.unpack_from(self.ring, _HEADER.size + first * _ENTRY.size)
                if 1 <= length <= 4:
                    self.pio.write(port, length, int.from_bytes(data[:length], "little"))
                first = (first + 1) % self.capacity
                n += 1
            struct.pack_into("<I", self.ring, 0, first)  # consumed: KVM may reuse the slots
            self.replayed += n
            return n

    def close(self) -> None:
        """Let go of the ring; the zones go with the VM. (Unregistering them here cost
        3-8 ms of every exit: each KVM I/O-bus change waits for an SRCU grace period.)"""
        self.ring.release()
