"""A legacy virtio-PCI driver in miniature: negotiates, places queues, kicks, reads ISR."""

from __future__ import annotations

from kvmm.irq import LineInterrupt
from kvmm.memory import GuestMemory
from kvmm.virtio import device as vd
from kvmm.virtio import pci_legacy as L
from kvmm.virtio.device import VirtioDevice

from .mock_queue import MockQueue


class LegacyDriver:
    def __init__(self, device: VirtioDevice, mem: GuestMemory, first_pfn: int = 0x10) -> None:
        self.irq_levels: list[int] = []
        self.transport = L.VirtioPciLegacy(device, mem, LineInterrupt(self.irq_levels.append))
        self.mem = mem
        self.queues: list[MockQueue] = []
        self.first_pfn = first_pfn

    def r(self, offset: int, size: int) -> int:
        return self.transport.pio_read(offset, size)

    def w(self, offset: int, size: int, value: int) -> None:
        self.transport.pio_write(offset, size, value)

    def init(self, features: int | None = None) -> int:
        """Linux's legacy probe sequence; returns the negotiated features."""
        self.w(L.STATUS, 1, 0)
        self.w(L.STATUS, 1, vd.STATUS_ACKNOWLEDGE)
        self.w(L.STATUS, 1, vd.STATUS_ACKNOWLEDGE | vd.STATUS_DRIVER)
        offered = self.r(L.HOST_FEATURES, 4)
        self.w(L.GUEST_FEATURES, 4, offered if features is None else features)
        pfn = self.first_pfn
        index = 0
        while True:
            self.w(L.QUEUE_SEL, 2, index)
            size = self.r(L.QUEUE_NUM, 2)
            if size == 0:
                break
            q = MockQueue(self.mem, pfn, size, data_base=0x100000 + index * 0x100000)
            self.w(L.QUEUE_PFN, 4, pfn)
            self.queues.append(q)
            pfn += (q.ring_bytes + 4095) >> 12
            index += 1
        self.w(L.STATUS, 1, vd.STATUS_ACKNOWLEDGE | vd.STATUS_DRIVER | vd.STATUS_DRIVER_OK)
        return self.r(L.GUEST_FEATURES, 4)

    def kick(self, index: int = 0) -> None:
        self.w(L.QUEUE_NOTIFY, 2, index)

    def isr(self) -> int:
        return self.r(L.ISR, 1)

    @property
    def irq(self) -> int:
        return self.transport.irq_level
