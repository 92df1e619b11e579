"""Exitless I/O on /dev/kvm: queue notifies by ioeventfd, INTx by irqfd with resample."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmm.irq import IrqfdLine
from kvmm.vm import DiskConfig, Machine, Outcome, VmConfig

pytestmark = pytest.mark.kvm


def run_notify_guest(guests, tmp_path: Path, exitless: bool, guest: str = "virtio_notify"):  # type: ignore[no-untyped-def]
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    console = tmp_path / "console.log"
    cfg = VmConfig(kernel=str(guests(guest)), mem_size=64 << 20, console_path=str(console), stdin=False,
                   disks=[DiskConfig(str(disk), serial="exitless-0")], exitless=exitless)
    with Machine(cfg) as m:
        result = m.run(timeout=60)
        return result, console.read_text(), m.exit_report(), m.platform.transports[0].intx


def test_notify_by_ioeventfd_and_interrupt_by_irqfd(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result, console, report, line = run_notify_guest(guests, tmp_path, exitless=True)
    assert result.outcome is Outcome.DEBUG_EXIT and result.debug_value == 0x10, (result, console)
    assert console == "serial exitless-0 isr 1\n"  # the handler saw ISR bit 0 (queue interrupt)
    assert report["queue_notify_exits"] == 0
    assert report["queue_notify_ioeventfd"] == 1
    assert isinstance(line, IrqfdLine) and line.asserts == 1


def test_same_guest_through_vm_exits_for_comparison(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result, console, report, _ = run_notify_guest(guests, tmp_path, exitless=False)
    assert result.debug_value == 0x10 and console == "serial exitless-0 isr 1\n"
    assert report["queue_notify_exits"] == 1 and report["queue_notify_ioeventfd"] == 0


def test_msix_vector_through_irqfd(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The guest enables MSI-X, programs table entry 1 and binds queue 0 to it.
    result, console, report, line = run_notify_guest(guests, tmp_path, exitless=True, guest="virtio_notify_msix")
    assert result.debug_value == 0x10, (result, console)
    assert console == "serial exitless-0 msix\n"
    assert report["msi_interrupts"] == 1 and report["intx_interrupts"] == 0
    assert report["queue_notify_exits"] == 0 and report["queue_notify_ioeventfd"] == 1
