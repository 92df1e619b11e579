"""The legacy virtio-PCI register block as the gatekeeper (virtio 0.9.5, PCI appendix)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmm.memory import GuestMemory
from kvmm.virtio import device as vd
from kvmm.virtio import pci_legacy as L
from kvmm.virtio.queue import VIRTIO_RING_F_EVENT_IDX, Queue

from .harness import LegacyDriver


class EchoDevice:
    """A test device: two queues; completes every chain with its readable length, through
    :func:`kvmm.virtio.device.serve_queue` as every real device does (so ring and chain
    errors take the path they take in kvmm)."""

    device_id = 0x7F
    queue_sizes = (8, 16)
    pci_class_code = 0xFF0000
    name = "echo"

    def __init__(self) -> None:
        self.cfg = bytearray(b"\x11\x22\x33\x44\x55\x66")
        self.queues: list[Queue] = []
        self.activations = 0
        self.resets = 0
        self.interrupt = None

    def features(self) -> int:
        return 0b101

    def config(self) -> bytes:
        return bytes(self.cfg)

    def config_write(self, offset: int, data: bytes) -> None:
        self.cfg[offset : offset + len(data)] = data

    def activate(self, queues, features, interrupt) -> None:  # type: ignore[no-untyped-def]
        self.queues, self.interrupt = queues, interrupt
        self.activations += 1

    def process_queue(self, index: int) -> bool:
        return vd.serve_queue(self.queues[index], index, self.interrupt, "echo",
                              lambda chain: sum(d.length for d in chain.readable))

    def reset(self) -> None:
        self.resets += 1

    def save_state(self) -> object:
        return {"cfg": self.cfg.hex()}

    def load_state(self, data: object) -> None:
        assert isinstance(data, dict)
        self.cfg = bytearray.fromhex(data["cfg"])

    def counters(self) -> dict[str, int]:
        return {"activations": self.activations}

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.allocate(8 << 20, check_available=False)


@pytest.fixture
def drv(mem: GuestMemory) -> LegacyDriver:
    return LegacyDriver(EchoDevice(), mem)


def test_pci_identity_is_legacy_virtio(drv: LegacyDriver) -> None:
    t = drv.transport
    assert t.config_read(0, 2) == 0x1AF4 and t.config_read(2, 2) == 0x1000 + 0x7F - 1
    assert t.config_read(0x08, 1) == 0  # revision 0: legacy ABI
    assert t.config_read(0x2E, 2) == 0x7F  # subsystem id = virtio device id
    assert t.bar_sizes[0] >= L.CONFIG + 6


def test_host_features_include_ring_features_and_are_read_only(drv: LegacyDriver) -> None:
    host = drv.r(L.HOST_FEATURES, 4)
    assert host == 0b101 | L.TRANSPORT_FEATURES
    drv.w(L.HOST_FEATURES, 4, 0)
    assert drv.r(L.HOST_FEATURES, 4) == host


def test_guest_features_are_masked_to_offered(drv: LegacyDriver) -> None:
    drv.w(L.GUEST_FEATURES, 4, 0xFFFF_FFFF)
    assert drv.r(L.GUEST_FEATURES, 4) == drv.r(L.HOST_FEATURES, 4)


def test_probe_sequence_activates_device_with_features(drv: LegacyDriver) -> None:
    feats = drv.init()
    dev = drv.transport.device
    assert dev.activations == 1 and len(drv.queues) == 2
    assert [q.max_size for q in drv.transport.queues] == [8, 16]
    assert all(q.ready for q in drv.transport.queues)
    assert drv.transport.queues[0].event_idx == bool(feats & (1 << VIRTIO_RING_F_EVENT_IDX))


def test_queue_sel_out_of_range_reads_size_0_and_ignores_pfn(drv: LegacyDriver) -> None:
    drv.w(L.QUEUE_SEL, 2, 5)
    assert drv.r(L.QUEUE_NUM, 2) == 0
    drv.w(L.QUEUE_PFN, 4, 0x20)
    assert drv.r(L.QUEUE_PFN, 4) == 0
    assert not any(q.ready for q in drv.transport.queues)


def test_queue_pfn_outside_ram_is_refused(drv: LegacyDriver) -> None:
    drv.w(L.QUEUE_SEL, 2, 0)
    drv.w(L.QUEUE_PFN, 4, (8 << 20) >> 12)
    assert drv.r(L.QUEUE_PFN, 4) == 0 and not drv.transport.queues[0].ready


def test_notify_processes_queue_and_raises_isr(drv: LegacyDriver) -> None:
    drv.init()
    q = drv.queues[1]
    head = q.build_chain([(q.alloc(12), 12, False), (q.alloc(4), 4, True)])
    q.publish(head)
    drv.kick(1)
    q.check_used(head, 12)
    assert drv.irq == 1
    assert drv.isr() == L.ISR_QUEUE
    assert drv.irq == 0 and drv.isr() == 0  # read-to-clear lowered the line


def test_notify_of_missing_queue_is_ignored(drv: LegacyDriver) -> None:
    drv.init()
    drv.kick(7)
    drv.kick(0xFFFF)
    assert drv.irq == 0


def test_writing_status_0_resets_device_and_queues(drv: LegacyDriver) -> None:
    drv.init()
    q = drv.queues[0]
    q.publish(q.build_chain([(q.alloc(4), 4, False)]))
    drv.kick(0)
    assert drv.irq == 1
    drv.w(L.STATUS, 1, 0)
    t = drv.transport
    assert t.device.resets >= 1 and drv.irq == 0
    assert drv.r(L.STATUS, 1) == 0 and drv.r(L.GUEST_FEATURES, 4) == 0
    assert not any(q.ready for q in t.queues)
    drv.w(L.QUEUE_SEL, 2, 0)
    assert drv.r(L.QUEUE_PFN, 4) == 0


def test_device_config_reads_and_zero_past_end(drv: LegacyDriver) -> None:
    assert drv.r(L.CONFIG, 4) == 0x44332211
    assert drv.r(L.CONFIG + 4, 4) == 0x6655  # two bytes of config, two of zero fill
    assert drv.r(L.CONFIG + 40, 1) == 0


def test_device_config_write_in_range_only(drv: LegacyDriver) -> None:
    drv.w(L.CONFIG + 1, 1, 0xAB)
    assert drv.transport.device.cfg[1] == 0xAB
    drv.w(L.CONFIG + 5, 2, 0xFFFF)  # runs past the end: ignored
    assert drv.transport.device.cfg[5] == 0x66


def test_ring_error_sets_needs_reset_and_stops_the_queue(drv: LegacyDriver) -> None:
    # The second tier of guest error, on the real path (a kick, the device's serve_queue,
    # the transport's needs_reset): an available index that moved by more than the queue
    # size is an impossible ring state (virtio 1.x 2.7.13.3's bound); the device sets
    # DEVICE_NEEDS_RESET (2.1.2), raises a configuration interrupt and serves nothing
    # more until the driver resets it.
    drv.init()
    q = drv.queues[0]
    drv.mem.write_u16(q.avail + 2, 100)  # avail index jumps past the queue size (8)
    drv.kick(0)
    assert drv.r(L.STATUS, 1) & vd.STATUS_DEVICE_NEEDS_RESET
    assert drv.isr() & L.ISR_CONFIG
    assert q.take_used() == []
    # Stopped: a well-formed chain on the other queue is not served either.
    q1 = drv.queues[1]
    q1.publish(q1.build_chain([(q1.alloc(8), 8, False)]))
    drv.kick(1)
    assert q1.take_used() == []
    drv.w(L.STATUS, 1, 0)
    assert drv.r(L.STATUS, 1) == 0
    # After the reset the driver starts again and the device serves.
    drv.queues.clear()
    drv.init()
    q = drv.queues[0]
    q.publish(q.build_chain([(q.alloc(8), 8, False)]))
    drv.kick(0)
    assert q.take_used() == [(0, 8)]


def test_malformed_chain_completes_with_length_0_and_the_queue_goes_on(drv: LegacyDriver) -> None:
    # The first tier: a chain whose next field points past the queue (2.7.5.2: next must
    # name a descriptor of the table) is completed with length 0, and the request after it
    # is served normally; the device does not need a reset.
    drv.init()
    q = drv.queues[0]
    q.write_desc(0, q.alloc(8), 8, flags=1, next_=200)  # NEXT to descriptor 200 of 8
    q.next_desc = 1
    good = q.build_chain([(q.alloc(4), 4, False)])
    q.publish(0, good)
    drv.kick(0)
    assert q.take_used() == [(0, 0), (good, 4)]
    assert not drv.r(L.STATUS, 1) & vd.STATUS_DEVICE_NEEDS_RESET


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 300), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)), max_size=60))
def test_any_register_access_sequence_never_raises(ops: list[tuple[bool, int, int, int]]) -> None:
    mem = GuestMemory.allocate(8 << 20, check_available=False)
    drv = LegacyDriver(EchoDevice(), mem)
    for is_write, offset, size, value in ops:
        if is_write:
            drv.w(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= drv.r(offset, size) < (1 << (8 * size))


class RecordingNotifier:
    def __init__(self) -> None:
        self.ports: dict[int, int] = {}  # fd -> port
        self.next_fd = 100

    def add_ioeventfd(self, port: int, datamatch: int, callback) -> int:  # type: ignore[no-untyped-def]
        self.next_fd += 1
        self.ports[self.next_fd] = port
        return self.next_fd

    def remove_ioeventfd(self, fd: int, port: int, datamatch: int) -> None:
        del self.ports[fd]

    def defer(self, callback) -> None:  # type: ignore[no-untyped-def]
        callback()


def test_queue_notify_ioeventfd_never_sits_on_a_refused_bar_address(mem: GuestMemory) -> None:
    """After the bus refused a BAR0 move (ports in use), config space holds the written
    address but nothing decodes there: placing a queue must not register its notify
    ioeventfd on another device's ports (issue 19, defect 7)."""
    from kvmm.devices.bus import PioBus
    from kvmm.devices.pci import PciBus
    from kvmm.irq import LineInterrupt

    pio = PioBus()
    bus = PciBus(pio)
    notifier = RecordingNotifier()
    t = L.VirtioPciLegacy(EchoDevice(), mem, LineInterrupt(lambda level: None), notifier=notifier)
    bus.add(t)
    t.config_write(0x10, 4, 0xCC0 | 1)  # over PCI configuration's ports: refused
    t.pio_write(L.QUEUE_SEL, 2, 0)
    t.pio_write(L.QUEUE_PFN, 4, 0x10)
    assert t.queues[0].ready and notifier.ports == {}
    home = 0xD000
    t.config_write(0x10, 4, home | 1)
    assert list(notifier.ports.values()) == [home + L.QUEUE_NOTIFY]
