"""virtio-rng (0.9.5 Appendix F) and virtio-console port 0 (Appendix E)."""

from __future__ import annotations

import pytest

from kvmm.memory import GuestMemory
from kvmm.virtio import console as C
from kvmm.virtio import pci_legacy as L
from kvmm.virtio import rng as R
from kvmm.virtio.queue import VIRTQ_DESC_F_NEXT

from .harness import LegacyDriver


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.allocate(16 << 20, check_available=False)


def test_rng_fills_writable_buffers(mem: GuestMemory) -> None:
    dev = R.VirtioRng(mem)
    drv = LegacyDriver(dev, mem)
    drv.init()
    q = drv.queues[0]
    a, b = q.alloc(16), q.alloc(48)
    head = q.build_chain([(a, 16, True), (b, 48, True)])
    q.publish(head)
    drv.kick()
    q.check_used(head, 64)
    data = mem.read(a, 16) + mem.read(b, 48)
    assert data != bytes(64) and len(set(data)) > 16
    assert drv.isr() == L.ISR_QUEUE


def test_rng_caps_a_request_at_64k(mem: GuestMemory) -> None:
    # Overlapping descriptors may claim far more than guest RAM holds; the cap bounds it.
    dev = R.VirtioRng(mem)
    drv = LegacyDriver(dev, mem)
    drv.init()
    q = drv.queues[0]
    buf = q.alloc(1 << 20)
    head = q.build_chain([(buf, 1 << 20, True)] * 8)  # 8 MiB claimed over one 1 MiB buffer
    q.publish(head)
    drv.kick()
    q.check_used(head, R.MAX_REQUEST)
    assert dev.bytes_served == R.MAX_REQUEST


def test_rng_ignores_readable_buffers_and_survives_bad_chain(mem: GuestMemory) -> None:
    dev = R.VirtioRng(mem)
    drv = LegacyDriver(dev, mem)
    drv.init()
    q = drv.queues[0]
    q.write_desc(0, q.alloc(8), 8, VIRTQ_DESC_F_NEXT, 0)  # loop
    q.next_desc = 1
    head = q.build_chain([(q.alloc(8), 8, False)])
    q.publish(0, head)
    drv.kick()
    assert q.take_used() == [(0, 0), (head, 0)]


def make_console(mem: GuestMemory) -> tuple[LegacyDriver, C.VirtioConsole, bytearray]:
    out = bytearray()
    dev = C.VirtioConsole(mem, out.extend)
    drv = LegacyDriver(dev, mem)
    drv.init()
    return drv, dev, out


def test_console_transmit_goes_to_sink(mem: GuestMemory) -> None:
    drv, _, out = make_console(mem)
    tx = drv.queues[C.TX_QUEUE]
    head = tx.build_chain([(tx.alloc(6, b"hello "), 6, False), (tx.alloc(6, b"world\n"), 6, False)])
    tx.publish(head)
    drv.kick(C.TX_QUEUE)
    tx.check_used(head, 0)
    assert bytes(out) == b"hello world\n"


def test_console_input_waits_for_buffers_then_arrives_in_order(mem: GuestMemory) -> None:
    drv, dev, _ = make_console(mem)
    assert dev.receive(b"abc") == 3  # no receive buffers yet: held back
    rx = drv.queues[C.RX_QUEUE]
    a = rx.alloc(2)
    b = rx.alloc(8)
    h1 = rx.build_chain([(a, 2, True)])
    h2 = rx.build_chain([(b, 8, True)])
    rx.publish(h1, h2)
    drv.kick(C.RX_QUEUE)
    assert rx.take_used() == [(h1, 2), (h2, 1)]
    assert mem.read(a, 2) == b"ab" and mem.read(b, 1) == b"c"
    assert drv.isr() == L.ISR_QUEUE


def test_console_input_backlog_is_bounded(mem: GuestMemory) -> None:
    _, dev, _ = make_console(mem)
    assert dev.receive(b"x" * (C.INPUT_BACKLOG_LIMIT + 10)) == C.INPUT_BACKLOG_LIMIT
    assert dev.rx_room() == 0 and dev.receive(b"y") == 0
