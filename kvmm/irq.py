"""Interrupts and queue notifies between devices and KVM.

A device gets its interrupts as an :class:`InterruptGroup` (cloud-hypervisor's
``InterruptSourceGroup``) when it is built: INTx is a group of one level-triggered line,
MSI-X a group of vectors. Both have :meth:`~InterruptGroup.fire` and a count, so neither
the device nor the machine's report cares which it is.

- :class:`IrqfdLine`: INTx through a KVM irqfd with a resample fd (no ioctl per interrupt);
  :class:`LineInterrupt`: INTx through a callable (KVM_IRQ_LINE, or a test's recorder).
- :class:`MsiVectors`: one GSI with an irqfd per vector, routed through :class:`GsiRouter`;
  :class:`MsiCallbacks`: vectors through callables (tests, fuzzing).
- :class:`KvmInterrupts`: makes the above for one VM and closes what it made.
- :class:`IoEventNotifier`: a queue notify (a 16-bit port write of the queue index) as a
  KVM ioeventfd, served on the I/O thread instead of exiting a vCPU to kvmm.

KVM_SET_GSI_ROUTING replaces the whole table, so the router keeps KVM's default routes
(GSI 0-15 to both 8259s and the IOAPIC, 16-23 to the IOAPIC; arch/x86/kvm/irq_comm.c)
and adds one MSI route per allocated GSI.

Teardown: closing an eventfd here does not deassign it from KVM (each deassign waits for
an SRCU grace period, milliseconds on some hosts); KVM holds its own reference to the
eventfd file and drops it when the VM is destroyed.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Protocol

from .errors import KvmError
from .eventloop import EventLoop, drain_eventfd, make_eventfd
from .kvm import ioctls as K
from .kvm.structs import ffi
from .kvm.system import Vm, ioctl_buf
from .layout import FIRST_MSI_GSI, IOAPIC_PINS
from .ratelimit import RateLimitedLog

LOG = logging.getLogger(__name__)
_LOG = RateLimitedLog(LOG)  # ioeventfds come and go as the guest places queues and moves BARs

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
MAX_GSI = 1024


class InterruptGroup(Protocol):
    """A device's interrupt sources: one INTx line (index 0) or MSI-X vectors 0..n-1."""

    @property
    def fired(self) -> int:
        """Interrupts delivered so far (asserts of the line, messages sent)."""

    def fire(self, index: int = 0) -> None:
        """Assert the INTx line (it stays asserted until :meth:`clear`), or send vector ``index``."""

    def clear(self, index: int = 0) -> None:
        """De-assert the INTx line (the guest acknowledged it); nothing for a vector."""

    def route(self, index: int, address: int, data: int) -> None:
        """Where vector ``index`` delivers (MSI address and data; address 0: nowhere);
        nothing for INTx."""

    def close(self) -> None: ...


class LineInterrupt:
    """INTx through ``set_level(level)``: KVM_IRQ_LINE for a machine without irqfds, or a
    test's recorder."""

    def __init__(self, set_level: Callable[[int], None]) -> None:
        self.set_level = set_level
        self.fired = 0

    def fire(self, index: int = 0) -> None:
        self.fired += 1
        self.set_level(1)

    def clear(self, index: int = 0) -> None:
        self.set_level(0)

    def route(self, index: int, address: int, data: int) -> None:
        pass

    def close(self) -> None:
        pass


class IrqfdLine:
    """A level-triggered INTx line driven through a KVM irqfd with a resample fd.

    Writing the irqfd asserts the line without an ioctl. KVM de-asserts it when the guest
    EOIs the interrupt and signals the resample fd; if the line is still asserted by the
    device (no :meth:`clear` since), it is asserted again: level semantics, as INTx needs."""

    def __init__(self, vm: Vm, gsi: int, loop: EventLoop) -> None:
        self.gsi = gsi
        self.loop = loop
        self.fd = make_eventfd()
        try:
            self.resample_fd = make_eventfd()
        except OSError:
            os.close(self.fd)
            raise
        self.level = 0
        self.fired = 0
        try:
            vm.irqfd(self.fd, gsi, flags=K.KVM_IRQFD_FLAG_RESAMPLE, resamplefd=self.resample_fd)
        except BaseException:
            self.close()
            raise
        loop.add_reader(self.resample_fd, self._resample)

    @property
    def asserts(self) -> int:  # the name this count had before interrupt groups
        return self.fired

    def fire(self, index: int = 0) -> None:
        self.level = 1
        self.fired += 1
        os.eventfd_write(self.fd, 1)

    def clear(self, index: int = 0) -> None:
        self.level = 0  # KVM lowers the line at the guest's EOI (then _resample runs)

    def route(self, index: int, address: int, data: int) -> None:
        pass

    def _resample(self) -> None:
        if drain_eventfd(self.resample_fd) and self.level:
            os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.loop.remove_reader(self.resample_fd)
        os.close(self.fd)
        os.close(self.resample_fd)
        self.fd = self.resample_fd = -1


class GsiRouter:
    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.lock = threading.Lock()
        self.msi_routes: dict[int, tuple[int, int] | None] = {}  # gsi -> (address, data), None = unrouted
        self.next_gsi = FIRST_MSI_GSI
        self.updates = 0

    def allocate_gsi(self) -> int:
        with self.lock:
            if self.next_gsi >= MAX_GSI:
                raise KvmError("KVM_SET_GSI_ROUTING", 28, "out of GSIs for MSI vectors")  # ENOSPC
            gsi = self.next_gsi
            self.next_gsi += 1
            self.msi_routes[gsi] = None
        return gsi

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


class MsiVectors:
    """MSI(-X) vectors, each a GSI with an irqfd: :meth:`fire` interrupts the guest from
    any thread without an ioctl; :meth:`route` points the GSI at the vector's message."""

    def __init__(self, vm: Vm, router: GsiRouter, count: int) -> None:
        self.router = router
        self.gsis: list[int] = []
        self.fds: list[int] = []
        self.counts = [0] * count
        try:
            for _ in range(count):
                gsi = router.allocate_gsi()
                fd = make_eventfd()
                self.gsis.append(gsi)
                self.fds.append(fd)
                vm.irqfd(fd, gsi)
        except BaseException:
            self.close()
            raise

    @property
    def fired(self) -> int:
        return sum(self.counts)

    def fire(self, index: int = 0) -> None:
        self.counts[index] += 1
        os.eventfd_write(self.fds[index], 1)

    def clear(self, index: int = 0) -> None:
        pass

    def route(self, index: int, address: int, data: int) -> None:
        self.router.set_msi(self.gsis[index], (address, data) if address else None)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class MsiCallbacks:
    """Vectors delivered to ``fire(index)`` (and routed through ``route``): tests, fuzzing."""

    def __init__(self, fire: Callable[[int], None] | None = None,
                 route: Callable[[int, int, int], None] | None = None) -> None:
        self._fire = fire
        self._route = route
        self.fired = 0

    def fire(self, index: int = 0) -> None:
        self.fired += 1
        if self._fire is not None:
            self._fire(index)

    def clear(self, index: int = 0) -> None:
        pass

    def route(self, index: int, address: int, data: int) -> None:
        if self._route is not None:
            self._route(index, address, data)

    def close(self) -> None:
        pass


class KvmInterrupts:
    """The interrupt manager of one VM: INTx lines by irqfd (``exitless``) or KVM_IRQ_LINE,
    MSI-X vectors by irqfd; :meth:`close` releases every fd it made."""

    def __init__(self, vm: Vm, loop: EventLoop, exitless: bool) -> None:
        self.vm = vm
        self.loop = loop
        self.exitless = exitless
        self.router = GsiRouter(vm)
        self.groups: list[InterruptGroup] = []

    def intx(self, gsi: int) -> InterruptGroup:
        line: InterruptGroup = (IrqfdLine(self.vm, gsi, self.loop) if self.exitless
                                else LineInterrupt(lambda level: self.vm.irq_line(gsi, level)))
        self.groups.append(line)
        return line

    def msi(self, count: int) -> InterruptGroup:
        vectors = MsiVectors(self.vm, self.router, count)
        self.groups.append(vectors)
        return vectors

    def close(self) -> None:
        for group in self.groups:
            group.close()
        self.groups.clear()


class IoEventNotifier:
    """Queue notifies as KVM ioeventfds (the transport's ``NotifyHost``): a 16-bit write
    of ``datamatch`` to ``port`` signals an eventfd in KVM instead of exiting to kvmm, and
    the I/O thread runs the callback. :meth:`close` closes every eventfd still registered."""

    def __init__(self, vm: Vm, loop: EventLoop) -> None:
        self.vm = vm
        self.loop = loop
        self.fds: set[int] = set()

    def add_ioeventfd(self, port: int, datamatch: int, callback: Callable[[], None]) -> int:
        fd = make_eventfd()
        try:
            self.vm.ioeventfd(fd, port, 2, datamatch=datamatch)
        except BaseException:
            os.close(fd)
            raise
        self.fds.add(fd)

        def ready() -> None:
            if drain_eventfd(fd):
                callback()

        self.loop.call_soon(lambda: self.loop.add_reader(fd, ready) if fd in self.fds else None)
        return fd

    def remove_ioeventfd(self, fd: int, port: int, datamatch: int) -> None:
        try:
            self.vm.ioeventfd(fd, port, 2, datamatch=datamatch, deassign=True)
        except KvmError as exc:
            _LOG.debug("removing ioeventfd on port %#x: %s", port, exc)

        def drop() -> None:
            if fd in self.fds:
                self.fds.discard(fd)
                self.loop.remove_reader(fd)
                os.close(fd)

        self.loop.call_soon(drop)

    def defer(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the I/O thread after what is already waiting there."""
        self.loop.call_soon(callback)

    def close(self) -> None:
        for fd in self.fds:
            self.loop.remove_reader(fd)
            os.close(fd)
        self.fds.clear()
