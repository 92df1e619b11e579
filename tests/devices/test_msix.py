"""MSI-X table, PBA and masking (PCI 3.0 6.8.2), and legacy virtio's MSI-X registers."""

from __future__ import annotations

import pytest

from kvmm.devices import msix as M
from kvmm.irq import LineInterrupt, MsiCallbacks
from kvmm.memory import GuestMemory
from kvmm.virtio import pci_legacy as L

from virtio.test_pci_legacy import EchoDevice


class Table:
    def __init__(self, nvec: int = 3) -> None:
        self.fired: list[int] = []
        self.routes: list[tuple[int, int, int]] = []
        self.t = M.MsixTable(nvec, 1, self.fired.append, lambda v, a, d: self.routes.append((v, a, d)))

    def program(self, vec: int, address: int, data: int, masked: bool = False) -> None:
        base = vec * M.ENTRY_SIZE
        self.t.mmio_write(base, 4, address & 0xFFFF_FFFF)
        self.t.mmio_write(base + 4, 4, address >> 32)
        self.t.mmio_write(base + 8, 4, data)
        self.t.mmio_write(base + 12, 4, 1 if masked else 0)


def test_capability_layout() -> None:
    t = Table(3).t
    cap = t.capability(next_ptr=0x50)
    assert cap[0] == M.PCI_CAP_ID_MSIX and cap[1] == 0x50
    assert int.from_bytes(cap[2:4], "little") == 2  # table size N-1
    assert int.from_bytes(cap[4:8], "little") == M.TABLE_OFFSET | 1
    assert int.from_bytes(cap[8:12], "little") == M.PBA_OFFSET | 1


def test_vectors_start_masked_and_signal_needs_enable() -> None:
    x = Table()
    assert x.t.mmio_read(12, 4) == M.VECTOR_MASKED
    x.program(0, 0xFEE00000, 0x41)
    assert not x.t.signal(0) and x.fired == []  # MSI-X disabled
    x.t.set_control(M.MSIX_ENABLE)
    assert x.t.signal(0) and x.fired == [0]
    assert (0, 0xFEE00000, 0x41) in x.routes


def test_masked_vector_sets_pending_and_fires_on_unmask() -> None:
    x = Table()
    x.t.set_control(M.MSIX_ENABLE)
    x.program(1, 0xFEE00000, 0x42, masked=True)
    x.t.signal(1)
    assert x.fired == [] and x.t.mmio_read(M.PBA_OFFSET, 8) == 0b10
    x.t.mmio_write(1 * M.ENTRY_SIZE + 12, 4, 0)  # unmask
    assert x.fired == [1] and x.t.mmio_read(M.PBA_OFFSET, 8) == 0


def test_function_mask_holds_every_vector() -> None:
    x = Table()
    x.program(0, 0xFEE00000, 0x41)
    x.t.set_control(M.MSIX_ENABLE | M.MSIX_FUNCTION_MASK)
    x.t.signal(0)
    assert x.fired == []
    x.t.set_control(M.MSIX_ENABLE)
    assert x.fired == [0]


def test_out_of_range_vector_and_accesses_are_harmless() -> None:
    x = Table(2)
    x.t.set_control(M.MSIX_ENABLE)
    assert not x.t.signal(2) and not x.t.signal(-1)
    x.t.mmio_write(0x700, 4, 0xFFFF_FFFF)  # beyond the table: ignored
    x.t.mmio_write(M.PBA_OFFSET, 4, 0xFFFF_FFFF)  # PBA is read-only
    assert x.t.mmio_read(M.PBA_OFFSET, 4) == 0 and x.t.mmio_read(0x700, 4) == 0


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.allocate(8 << 20, check_available=False)


def test_virtio_config_moves_to_24_with_msix(mem: GuestMemory) -> None:
    real = L.VirtioPciLegacy(EchoDevice(), mem, LineInterrupt(lambda level: None), MsiCallbacks())
    assert real.config_read(0x34, 1) == M.MSIX_CAP_OFFSET  # capability list points at MSI-X
    assert real.config_read(0x06, 2) & 0x10
    assert real.pio_read(L.CONFIG, 1) == 0x11
    real.config_write(M.MSIX_CAP_OFFSET + 2, 2, M.MSIX_ENABLE)
    assert real.pio_read(L.CONFIG_MSIX, 1) == 0x11
    assert real.pio_read(L.MSI_CONFIG_VECTOR, 2) == L.VIRTIO_MSI_NO_VECTOR


def test_queue_vector_register_and_no_vector_for_unknown(mem: GuestMemory) -> None:
    real = L.VirtioPciLegacy(EchoDevice(), mem, LineInterrupt(lambda level: None), MsiCallbacks())
    real.config_write(M.MSIX_CAP_OFFSET + 2, 2, M.MSIX_ENABLE)
    real.pio_write(L.QUEUE_SEL, 2, 1)
    real.pio_write(L.MSI_QUEUE_VECTOR, 2, 2)
    assert real.pio_read(L.MSI_QUEUE_VECTOR, 2) == 2
    real.pio_write(L.MSI_QUEUE_VECTOR, 2, 7)  # the table has 3 vectors
    assert real.pio_read(L.MSI_QUEUE_VECTOR, 2) == L.VIRTIO_MSI_NO_VECTOR


def test_used_buffers_signal_the_queue_vector_not_intx(mem: GuestMemory) -> None:
    levels: list[int] = []
    fired: list[int] = []
    real = L.VirtioPciLegacy(EchoDevice(), mem, LineInterrupt(levels.append), MsiCallbacks(fired.append))
    real.config_write(M.MSIX_CAP_OFFSET + 2, 2, M.MSIX_ENABLE)
    real.msix.mmio_write(2 * M.ENTRY_SIZE + 12, 4, 0)  # type: ignore[union-attr]  # unmask vector 2
    real.pio_write(L.QUEUE_SEL, 2, 0)
    real.pio_write(L.MSI_QUEUE_VECTOR, 2, 2)
    real.signal_used(0)
    assert fired == [2] and levels == []
    real.signal_used(1)  # queue 1 has NO_VECTOR: nothing at all
    assert fired == [2] and levels == []
