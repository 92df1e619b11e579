"""Legacy virtio-PCI transport (virtio 0.9.5, "Virtio Header" in the PCI appendix).

BAR0 is an I/O window holding the legacy register block, then the device's config space:

    0  HOST_FEATURES   u32  ro    device features offered
    4  GUEST_FEATURES  u32  rw    driver's features, masked to what was offered
    8  QUEUE_PFN       u32  rw    selected queue's ring address >> 12; 0 deactivates it
    12 QUEUE_NUM       u16  ro    selected queue's size (0: no such queue)
    14 QUEUE_SEL       u16  rw
    16 QUEUE_NOTIFY    u16  wo    queue index the driver kicks
    18 DEVICE_STATUS   u8   rw    0 resets the device
    19 ISR_STATUS      u8   ro    read-to-clear; bit 0 queue, bit 1 config; lowers INTx
    20 device config

The transport is the gatekeeper (as Firecracker's): guest values are range-checked here,
unknown registers and odd widths are ignored on write and read as zero, config reads past
the end read zero, and nothing a guest writes raises.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..devices import msix as M
from ..devices.pci import PciDevice
from ..errors import SnapshotError
from ..irq import InterruptGroup
from ..memory import GuestMemory
from ..ratelimit import RateLimitedLog
from ..state import check_length, check_range
from . import device as vd
from .queue import (
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Queue,
    QueueState,
)

LOG = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_LEGACY_DEVICE_BASE = 0x1000  # legacy device id = 0x1000 + virtio id - 1
VIRTIO_PCI_ABI_VERSION = 0  # revision 0: the legacy (0.9.5) interface

HOST_FEATURES = 0
GUEST_FEATURES = 4
QUEUE_PFN = 8
QUEUE_NUM = 12
QUEUE_SEL = 14
QUEUE_NOTIFY = 16
STATUS = 18
ISR = 19
CONFIG = 20  # device config without MSI-X
MSI_CONFIG_VECTOR = 20  # with MSI-X enabled
MSI_QUEUE_VECTOR = 22
CONFIG_MSIX = 24  # device config with MSI-X enabled
VIRTIO_MSI_NO_VECTOR = 0xFFFF
MSIX_BAR = 1

ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

TRANSPORT_FEATURES = (1 << VIRTIO_F_NOTIFY_ON_EMPTY) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)



@dataclass
class VirtioTransportState:
    """The legacy register block, the queues and the device's own state (snapshot format;
    the PCI config space, MSI-X enable included, is saved by the bus)."""

    guest_features: int
    queue_sel: int
    status: int
    isr: int
    activated: bool
    config_vector: int
    queue_vectors: list[int]
    queues: list[QueueState]
    msix: M.MsixState | None
    device: Any


class NotifyHost(Protocol):
    """Where the transport registers a queue's notify as a KVM ioeventfd (the machine)."""

    def add_ioeventfd(self, port: int, datamatch: int, callback: Callable[[], None]) -> int: ...

    def remove_ioeventfd(self, fd: int, port: int, datamatch: int) -> None: ...

    def defer(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the I/O thread after what is already waiting there."""


def msix_vector_count(device: vd.VirtioDevice) -> int:
    """MSI-X vectors the transport offers for ``device``: one per queue plus one for
    config changes (as QEMU offers)."""
    return len(device.queue_sizes) + 1


class VirtioPciLegacy(PciDevice):
    """One virtio device behind the legacy PCI register block.

    Built with its interrupts (``intx``, the slot's INTA line; ``msi``, the vectors of
    :func:`msix_vector_count`, or None for no MSI-X capability) and, for exitless
    notifies, the ``notifier`` that registers a queue's notify as an ioeventfd."""

    def __init__(self, device: vd.VirtioDevice, mem: GuestMemory, intx: InterruptGroup,
                 msi: InterruptGroup | None = None, notifier: NotifyHost | None = None) -> None:
        super().__init__(
            vendor=VIRTIO_PCI_VENDOR,
            device=VIRTIO_PCI_LEGACY_DEVICE_BASE + device.device_id - 1,
            class_code=device.pci_class_code,
            revision=VIRTIO_PCI_ABI_VERSION,
            subsystem_vendor=VIRTIO_PCI_VENDOR,
            subsystem=device.device_id,
        )
        self.device = device
        self.mem = mem
        self.intx = intx
        self.msi = msi
        self.lock = threading.RLock()
        self.queues = [Queue(size) for size in device.queue_sizes]
        self.notify_host = notifier
        self.log = RateLimitedLog(LOG)  # every line a guest can trigger (docs/security.md)
        self._ioeventfds: dict[int, tuple[int, int]] = {}  # queue -> (eventfd, port)
        self.notify_exits = 0  # QUEUE_NOTIFY writes that reached kvmm as VM exits
        self.notify_events = 0  # ... and as ioeventfd wake-ups (no exit)
        self.host_features = (device.features() | TRANSPORT_FEATURES) & 0xFFFF_FFFF
        window = CONFIG_MSIX + len(device.config())
        self.add_io_bar(0, max(64, 1 << (window - 1).bit_length()), self)
        self.msix: M.MsixTable | None = None
        if msi is not None:
            self.msix = M.MsixTable(msix_vector_count(device), MSIX_BAR, msi.fire, msi.route)
            self.add_mem_bar(MSIX_BAR, M.BAR_SIZE, self.msix)
            self.add_capability(M.MSIX_CAP_OFFSET, self.msix.capability(), {3: 0xC0})
        self._reset_state()

    def _reset_state(self) -> None:
        self._detach_notifies()
        self.guest_features = 0
        self.queue_sel = 0
        self.status = 0
        self.isr = 0
        self.irq_level = 0
        self.activated = False
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_vectors = [VIRTIO_MSI_NO_VECTOR] * len(self.queues)
        for q in self.queues:
            q.reset()

    # --- snapshots --------------------------------------------------------------------
    def save_state(self) -> VirtioTransportState:
        with self.lock:
            return VirtioTransportState(
                self.guest_features, self.queue_sel, self.status, self.isr, self.activated, self.config_vector,
                list(self.queue_vectors), [q.save_state() for q in self.queues],
                self.msix.save_state() if self.msix is not None else None, self.device.save_state(),
            )

    def load_state(self, st: VirtioTransportState, where: str) -> None:
        """Restore after the bus restored config space. Every value is checked as the
        matching guest write would be: features within those offered, vectors within the
        table, queue rings inside RAM (QUEUE_PFN's check)."""
        with self.lock:
            self._reset_state()
            if (st.msix is None) != (self.msix is None):
                raise SnapshotError(f"{where}: MSI-X {'absent' if st.msix is None else 'present'} in the snapshot, "
                                    f"{'offered' if self.msix is not None else 'not offered'} by this device")
            if self.msix is not None and st.msix is not None:
                self.msix.load_state(st.msix, f"{where}.msix")
            if st.guest_features & ~self.host_features:
                raise SnapshotError(f"{where}: acknowledged features {st.guest_features:#x} were never offered "
                                    f"({self.host_features:#x})")
            check_range(f"{where}.queue_sel", st.queue_sel, 0, 0xFFFF)
            check_range(f"{where}.status", st.status, 0, 0xFF)
            check_range(f"{where}.isr", st.isr, 0, ISR_QUEUE | ISR_CONFIG)
            check_length(f"{where}.queues", st.queues, len(self.queues))
            check_length(f"{where}.queue_vectors", st.queue_vectors, len(self.queues))
            if st.activated and not st.status & vd.STATUS_DRIVER_OK:
                raise SnapshotError(f"{where}: activated without DRIVER_OK in status {st.status:#x}")
            for vec in (st.config_vector, *st.queue_vectors):
                if vec != VIRTIO_MSI_NO_VECTOR and self._valid_vector(check_range(f"{where} vector", vec, 0, 0xFFFF)) != vec:
                    raise SnapshotError(f"{where}: MSI-X vector {vec} is not in the table")
            for i, (q, qs) in enumerate(zip(self.queues, st.queues)):
                q.load_state(self.mem, qs, f"{where}.queues[{i}]")
            self.guest_features, self.queue_sel, self.status = st.guest_features, st.queue_sel, st.status
            self.config_vector, self.queue_vectors = st.config_vector, list(st.queue_vectors)
            if st.activated:
                self._activate()
            self.device.load_state(st.device)
            for index, q in enumerate(self.queues):
                if q.ready:
                    self._attach_notify(index)
            if st.isr:
                self._raise(st.isr)  # the line is a level: asserted again while ISR is set

    def kick_ready_queues(self) -> None:
        """Serve every live queue once: a notify the guest sent just before a snapshot
        was taken is in no eventfd of the restored VM."""
        for index, q in enumerate(self.queues):
            if q.ready:
                self._notify_event(index, kicked=False)

    # --- interrupts (Interrupt protocol) ----------------------------------------------
    @property
    def msix_enabled(self) -> bool:
        return self.msix is not None and self.msix.enabled

    def config_written(self, offset: int, size: int) -> None:
        cap_control = M.MSIX_CAP_OFFSET + 2
        if self.msix is not None and offset <= cap_control + 1 and cap_control < offset + size:
            with self.lock:
                was = self.msix.enabled
                self.msix.set_control(int.from_bytes(self.config[cap_control : cap_control + 2], "little"))
                if self.msix.enabled != was:
                    self.log.info("virtio %s at %02x.0: guest %s MSI-X (%d vectors)", type(self.device).__name__, self.slot,
                             "enabled" if self.msix.enabled else "disabled", self.msix.nvec)
                if self.msix.enabled:
                    self.isr = 0
                    self._lower()  # MSI-X replaces INTx

    def signal_used(self, index: int) -> None:
        with self.lock:
            if self.msix_enabled:
                vec = self.queue_vectors[index] if index < len(self.queue_vectors) else VIRTIO_MSI_NO_VECTOR
                if vec != VIRTIO_MSI_NO_VECTOR:
                    self.msix.signal(vec)  # type: ignore[union-attr]
                return
            self._raise(ISR_QUEUE)

    def signal_config(self) -> None:
        with self.lock:
            if self.msix_enabled:
                if self.config_vector != VIRTIO_MSI_NO_VECTOR:
                    self.msix.signal(self.config_vector)  # type: ignore[union-attr]
                return
            self._raise(ISR_CONFIG)

    def needs_reset(self, reason: str) -> None:
        with self.lock:
            self.log.warning("virtio %s at %02x.0: %s; the device stops until the driver resets it",
                             type(self.device).__name__, self.slot, reason)
            self.status |= vd.STATUS_DEVICE_NEEDS_RESET
        self.signal_config()

    def _raise(self, bits: int) -> None:
        self.isr |= bits
        if not self.irq_level:
            self.irq_level = 1
            self.intx.fire()

    def _lower(self) -> None:
        if self.irq_level:
            self.irq_level = 0
            self.intx.clear()

    def counters(self) -> dict[str, int]:
        """How the driver's notifies arrived and the interrupts sent (summed over devices
        in the machine's report)."""
        return {"queue_notify_exits": self.notify_exits, "queue_notify_ioeventfd": self.notify_events,
                "msi_interrupts": self.msi.fired if self.msi is not None else 0, "intx_interrupts": self.intx.fired}

    # --- register block ---------------------------------------------------------------
    def _selected(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _config_offset(self) -> int:
        return CONFIG_MSIX if self.msix_enabled else CONFIG

    def _valid_vector(self, vec: int) -> int:
        """The vector as the device will use it: NO_VECTOR if the table lacks it (0.9.5)."""
        return vec if self.msix is not None and vec < self.msix.nvec else VIRTIO_MSI_NO_VECTOR

    def pio_read(self, offset: int, size: int) -> int:
        with self.lock:
            cfg = self._config_offset()
            if offset >= cfg:
                data = self.device.config()[offset - cfg : offset - cfg + size]
                return int.from_bytes(data.ljust(size, b"\0"), "little")  # zero past the end
            if cfg == CONFIG_MSIX and offset >= MSI_CONFIG_VECTOR:
                q_vec = self.queue_vectors[self.queue_sel] if self.queue_sel < len(self.queues) else VIRTIO_MSI_NO_VECTOR
                vecs = self.config_vector.to_bytes(2, "little") + q_vec.to_bytes(2, "little")
                o = offset - MSI_CONFIG_VECTOR
                return int.from_bytes(vecs[o : o + size].ljust(size, b"\0"), "little")
            q = self._selected()
            header = (
                self.host_features.to_bytes(4, "little")
                + self.guest_features.to_bytes(4, "little")
                + (q.pfn if q is not None and q.ready else 0).to_bytes(4, "little")
                + (q.max_size if q is not None else 0).to_bytes(2, "little")
                + self.queue_sel.to_bytes(2, "little")
                + b"\0\0"
                + bytes((self.status, self.isr))
            )
            value = int.from_bytes(header[offset : offset + size].ljust(size, b"\0"), "little")
            if offset <= ISR < offset + size:
                # Reading ISR acknowledges the interrupt (0.9.5 2.4.1 "ISR status").
                self.isr = 0
                self._lower()
            return value

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= (1 << (8 * size)) - 1
        with self.lock:
            cfg = self._config_offset()
            if offset >= cfg:
                if offset - cfg + size <= len(self.device.config()):
                    self.device.config_write(offset - cfg, value.to_bytes(size, "little"))
                return
            if cfg == CONFIG_MSIX and (offset, size) == (MSI_CONFIG_VECTOR, 2):
                self.config_vector = self._valid_vector(value)
                return
            if cfg == CONFIG_MSIX and (offset, size) == (MSI_QUEUE_VECTOR, 2):
                if self.queue_sel < len(self.queues):
                    self.queue_vectors[self.queue_sel] = self._valid_vector(value)
                return
            if (offset, size) == (GUEST_FEATURES, 4):
                if not self.status & vd.STATUS_DRIVER_OK:
                    self.guest_features = value & self.host_features
            elif (offset, size) == (QUEUE_PFN, 4):
                self._set_queue_pfn(value)
            elif (offset, size) == (QUEUE_SEL, 2):
                self.queue_sel = value  # out of range: QUEUE_NUM reads 0 and writes are ignored
            elif (offset, size) == (QUEUE_NOTIFY, 2):
                self.notify_exits += 1
                self._notify(value)
            elif (offset, size) == (STATUS, 1):
                self._set_status(value)
            else:
                self.log.debug("virtio-pci: ignored write of %d bytes at offset %d", size, offset)

    def _set_queue_pfn(self, pfn: int) -> None:
        q = self._selected()
        if q is None or self.activated:
            return
        index = self.queue_sel
        if pfn == 0:
            self._detach_notify(index)
            q.reset()
            return
        if q.activate_legacy(self.mem, pfn):
            self._attach_notify(index)
        else:
            self.log.warning("virtqueue %d: rings at PFN %#x lie outside guest RAM: refused", index, pfn)

    # --- exitless notifies: one ioeventfd per live queue on QUEUE_NOTIFY -------------------
    def _attach_notify(self, index: int) -> None:
        base = self.bar_decoded[0]  # where the bus decodes BAR0, not a refused address the guest wrote
        if self.notify_host is None or index in self._ioeventfds or base == 0:
            return
        port = base + QUEUE_NOTIFY
        fd = self.notify_host.add_ioeventfd(port, index, lambda: self._notify_event(index))
        self._ioeventfds[index] = (fd, port)

    def _detach_notify(self, index: int) -> None:
        entry = self._ioeventfds.pop(index, None)
        if entry is not None and self.notify_host is not None:
            self.notify_host.remove_ioeventfd(entry[0], entry[1], index)

    def _detach_notifies(self) -> None:
        for index in list(self._ioeventfds):
            self._detach_notify(index)

    def bar_relocated(self, bar: int, address: int) -> None:
        if bar != 0:
            return
        with self.lock:
            self._detach_notifies()
            if address:
                for index, q in enumerate(self.queues):
                    if q.ready:
                        self._attach_notify(index)

    def _notify_event(self, index: int, kicked: bool = True) -> None:
        """An ioeventfd fired (the guest kicked queue ``index`` without a VM exit), or a
        deferred turn of a queue with work left."""
        with self.lock:
            if kicked:
                self.notify_events += 1
            self._notify(index)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.device.reset()
            self._reset_state()
            self._lower()
            return
        self.status = value & 0xFF
        if value & vd.STATUS_FAILED:
            self.log.info("virtio %s: the driver gave up on the device (status FAILED)", type(self.device).__name__)
        if value & vd.STATUS_DRIVER_OK and not self.activated:
            self._activate()

    def _activate(self) -> None:
        """DRIVER_OK (or a restored device that had it): the queues take the negotiated
        ring features and the device starts serving them."""
        features = self.guest_features
        for q in self.queues:
            q.event_idx = bool(features & (1 << VIRTIO_RING_F_EVENT_IDX))
            q.notify_on_empty = bool(features & (1 << VIRTIO_F_NOTIFY_ON_EMPTY))
        self.activated = True
        self.device.activate(self.queues, features, self)

    def _notify(self, index: int) -> None:
        if index >= len(self.queues):
            self.log.debug("virtio-pci: notify of queue %d, which does not exist", index)
            return
        if not self.activated or self.status & vd.STATUS_DEVICE_NEEDS_RESET or not self.queues[index].ready:
            return
        while self.device.process_queue(index):
            # The device stopped at its budget with work left: with an I/O thread, give
            # other devices a turn first; in a vCPU exit there is no one else to wait for.
            if self.notify_host is not None:
                self.notify_host.defer(lambda: self._notify_event(index, kicked=False))
                return
