"""The VM's GSI routing table (KVM_SET_GSI_ROUTING) and MSI delivery through irqfds.

KVM_SET_GSI_ROUTING replaces the whole table, so the router keeps KVM's default routes
(GSI 0-15 to both 8259s and the IOAPIC, 16-23 to the IOAPIC; arch/x86/kvm/irq_comm.c)
and adds one MSI route per allocated GSI. Each MSI GSI has an irqfd: the device writes
the eventfd to interrupt, from any thread, without an ioctl.
"""

from __future__ import annotations

import logging
import os
import threading

from .eventloop import make_eventfd
from .kvm import ioctls as K
from .kvm.structs import ffi
from .kvm.system import Vm, ioctl_buf

LOG = logging.getLogger(__name__)

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
IOAPIC_PINS = 24
FIRST_MSI_GSI = IOAPIC_PINS
MAX_GSI = 1024


class GsiRouter:
    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.lock = threading.Lock()
        self.msi_routes: dict[int, tuple[int, int] | None] = {}  # gsi -> (address, data), None = unrouted
        self.next_gsi = FIRST_MSI_GSI
        self.updates = 0

    def allocate_msi(self) -> "MsiVector":
        with self.lock:
            if self.next_gsi >= MAX_GSI:
                raise RuntimeError("out of GSIs for MSI vectors")
            gsi = self.next_gsi
            self.next_gsi += 1
            self.msi_routes[gsi] = None
        return MsiVector(self, gsi)

    def set_msi(self, gsi: int, route: tuple[int, int] | None) -> None:
        with self.lock:
            if self.msi_routes.get(gsi, "absent") == route:
                return
            self.msi_routes[gsi] = route
            self._commit()

    def _entries(self) -> list[dict]:  # type: ignore[type-arg]
        entries = []
        for gsi in range(16):
            entries.append({"gsi": gsi, "type": KVM_IRQ_ROUTING_IRQCHIP,
                            "u": {"irqchip": {"irqchip": KVM_IRQCHIP_PIC_MASTER if gsi < 8 else KVM_IRQCHIP_PIC_SLAVE,
                                              "pin": gsi % 8}}})
        for gsi in range(IOAPIC_PINS):
            entries.append({"gsi": gsi, "type": KVM_IRQ_ROUTING_IRQCHIP,
                            "u": {"irqchip": {"irqchip": KVM_IRQCHIP_IOAPIC, "pin": gsi}}})
        for gsi, route in sorted(self.msi_routes.items()):
            if route is not None:
                address, data = route
                entries.append({"gsi": gsi, "type": KVM_IRQ_ROUTING_MSI,
                                "u": {"msi": {"address_lo": address & 0xFFFF_FFFF, "address_hi": address >> 32,
                                              "data": data}}})
        return entries

    def _commit(self) -> None:
        entries = self._entries()
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(entries), "entries": entries})
        size = ffi.sizeof("struct kvm_irq_routing") + len(entries) * ffi.sizeof("struct kvm_irq_routing_entry")
        ioctl_buf(self.vm.fd, K.KVM_SET_GSI_ROUTING, table, size)
        self.updates += 1


class MsiVector:
    """One MSI(-X) vector: a GSI with an irqfd; :meth:`fire` interrupts the guest."""

    def __init__(self, router: GsiRouter, gsi: int) -> None:
        self.router = router
        self.gsi = gsi
        self.fd = make_eventfd()
        router.vm.irqfd(self.fd, gsi)
        self.fired = 0

    def route(self, address: int, data: int) -> None:
        self.router.set_msi(self.gsi, (address, data))

    def unroute(self) -> None:
        self.router.set_msi(self.gsi, None)

    def fire(self) -> None:
        self.fired += 1
        os.eventfd_write(self.fd, 1)
