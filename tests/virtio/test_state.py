"""Device state as snapshot data: the codec's type checks and each device's load_state,
which treats a saved value as it would the matching guest write (a snapshot is untrusted)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kvmm.devices.cmos import Cmos, CmosState
from kvmm.devices.serial import Serial8250, SerialState
from kvmm.errors import SnapshotError
from kvmm.irq import LineInterrupt, MsiCallbacks
from kvmm.memory import GuestMemory
from kvmm.state import from_json, to_json
from kvmm.virtio import device as vd
from kvmm.virtio import pci_legacy as L
from kvmm.virtio.console import VirtioConsole
from kvmm.virtio.device import DeviceBase
from kvmm.virtio.queue import QueueState

from .harness import LegacyDriver
from .test_pci_legacy import EchoDevice


@dataclass
class Inner:
    data: bytes
    flag: bool


@dataclass
class Outer:
    count: int
    name: str | None
    inner: list[Inner]


def test_codec_round_trip() -> None:
    value = Outer(7, None, [Inner(b"\x00\xff", True)])
    assert from_json(Outer, to_json(value)) == value


@pytest.mark.parametrize("data,message", [
    ({"count": 1, "name": None}, "Outer: missing field 'inner'"),
    ({"count": 1, "name": None, "inner": [], "extra": 0}, "Outer: unknown field(s) extra"),
    ({"count": True, "name": None, "inner": []}, "Outer.count: expected an integer"),
    ({"count": 1, "name": 5, "inner": []}, "Outer.name: expected a string"),
    ({"count": 1, "name": None, "inner": {}}, "Outer.inner: expected a list"),
    ({"count": 1, "name": None, "inner": [{"data": "!!", "flag": True}]}, "Outer.inner[0].data: not valid base64"),
    ({"count": 1, "name": None, "inner": [{"data": "", "flag": 1}]}, "Outer.inner[0].flag: expected true or false"),
    ([], "Outer: expected an object"),
])
def test_codec_rejects_malformed_state(data: object, message: str) -> None:
    with pytest.raises(SnapshotError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        from_json(Outer, data)


def test_serial_state_round_trip_keeps_pending_input_and_interrupt() -> None:
    levels: list[int] = []
    a = Serial8250(lambda out: None, levels.append)
    a.pio_write(1, 1, 0x01)  # IER: received-data interrupt
    a.receive(b"abc")
    b_levels: list[int] = []
    b = Serial8250(lambda out: None, b_levels.append)
    b.load_state(from_json(SerialState, to_json(a.save_state())))
    assert b_levels[-1] == 1  # the restored UART raises its line for the pending input
    assert bytes(b.pio_read(0, 1) for _ in range(3)) == b"abc"


@pytest.mark.parametrize("field,value", [("ier", 0x100), ("dll", -1), ("scr", 1 << 40)])
def test_serial_register_outside_8_bits_is_refused(field: str, value: int) -> None:
    st = Serial8250(lambda out: None).save_state()
    setattr(st, field, value)
    with pytest.raises(SnapshotError, match=f"serial.{field}"):
        Serial8250(lambda out: None).load_state(st)


def test_serial_input_backlog_over_the_limit_is_refused() -> None:
    st = Serial8250(lambda out: None).save_state()
    st.rx = bytes(1 << 20)
    with pytest.raises(SnapshotError, match="serial.rx"):
        Serial8250(lambda out: None).load_state(st)


def test_cmos_index_and_ram_size_are_checked() -> None:
    good = Cmos().save_state()
    with pytest.raises(SnapshotError, match="cmos.index"):
        Cmos().load_state(CmosState(0x80, False, good.ram))
    with pytest.raises(SnapshotError, match="cmos.ram"):
        Cmos().load_state(CmosState(0, False, good.ram + b"\0"))


# --- virtio transport and queues -----------------------------------------------------------
@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.allocate(8 << 20, check_available=False)


def running(mem: GuestMemory) -> LegacyDriver:
    drv = LegacyDriver(EchoDevice(), mem)
    drv.init()
    return drv


def test_transport_round_trip_serves_the_queue_where_it_stopped(mem: GuestMemory) -> None:
    drv = running(mem)
    q = drv.queues[0]
    first = q.build_chain([(q.alloc(5), 5, False)])
    q.publish(first)
    drv.kick(0)
    q.check_used(first, 5)
    drv.transport.device.cfg[0] = 0x99  # type: ignore[attr-defined]
    saved = from_json(L.VirtioTransportState, to_json(drv.transport.save_state()))
    assert saved.queues[0].last_avail_idx == 1 and saved.queues[0].used_idx == 1

    fresh = LegacyDriver(EchoDevice(), mem)  # same RAM: the snapshot's memory
    fresh.transport.load_state(saved, "t")
    assert fresh.transport.activated and fresh.transport.device.activations == 1  # type: ignore[attr-defined]
    assert fresh.r(L.CONFIG, 1) == 0x99  # the device's own state came back
    second = q.build_chain([(q.alloc(3), 3, False)])
    q.publish(second)
    fresh.kick(0)
    q.check_used(second, 3)  # the second request, and not the first again


def test_restored_isr_raises_the_line_again(mem: GuestMemory) -> None:
    drv = running(mem)
    q = drv.queues[0]
    q.publish(q.build_chain([(q.alloc(1), 1, False)]))
    drv.kick(0)
    saved = drv.transport.save_state()
    assert saved.isr
    fresh = LegacyDriver(EchoDevice(), mem)
    fresh.transport.load_state(saved, "t")
    assert fresh.irq == 1 and fresh.isr() == saved.isr


def test_features_outside_those_offered_are_refused(mem: GuestMemory) -> None:
    # virtio 0.9.5 2.2.1: the driver acknowledges a subset of the device's features.
    saved = running(mem).transport.save_state()
    saved.guest_features |= 1 << 30
    with pytest.raises(SnapshotError, match="never offered"):
        LegacyDriver(EchoDevice(), mem).transport.load_state(saved, "t")


def test_activated_without_driver_ok_is_refused(mem: GuestMemory) -> None:
    saved = running(mem).transport.save_state()
    saved.status = vd.STATUS_ACKNOWLEDGE | vd.STATUS_DRIVER
    with pytest.raises(SnapshotError, match="without DRIVER_OK"):
        LegacyDriver(EchoDevice(), mem).transport.load_state(saved, "t")


def test_queue_count_mismatch_is_refused(mem: GuestMemory) -> None:
    saved = running(mem).transport.save_state()
    saved.queues.append(saved.queues[0])
    with pytest.raises(SnapshotError, match="t.queues: 3 entries, expected 2"):
        LegacyDriver(EchoDevice(), mem).transport.load_state(saved, "t")


@pytest.mark.parametrize("change,message", [
    (dict(size=4), "size 4, the device's queue has 8"),
    (dict(last_avail_idx=0x10000), "last_avail_idx"),
    (dict(used_idx=-1), "used_idx"),
    (dict(pfn=0), "pfn"),
    (dict(pfn=(8 << 20) >> 12), "outside guest RAM"),  # virtio 0.9.5 2.3: rings lie in guest memory
])
def test_queue_geometry_is_checked_as_queue_pfn_would_be(mem: GuestMemory, change: dict[str, int], message: str) -> None:
    saved = running(mem).transport.save_state()
    q = saved.queues[0]
    saved.queues[0] = QueueState(**{**q.__dict__, **change})
    with pytest.raises(SnapshotError, match=message):
        LegacyDriver(EchoDevice(), mem).transport.load_state(saved, "t")


def test_msix_vector_outside_the_table_is_refused(mem: GuestMemory) -> None:
    t = L.VirtioPciLegacy(EchoDevice(), mem, LineInterrupt(lambda level: None), MsiCallbacks())
    saved = t.save_state()
    saved.config_vector = 200
    with pytest.raises(SnapshotError, match="vector 200 is not in the table"):
        L.VirtioPciLegacy(EchoDevice(), mem, LineInterrupt(lambda level: None), MsiCallbacks()).load_state(saved, "t")


def test_msix_state_for_a_device_without_msix_is_refused(mem: GuestMemory) -> None:
    saved = L.VirtioPciLegacy(EchoDevice(), mem, LineInterrupt(lambda level: None), MsiCallbacks()).save_state()
    with pytest.raises(SnapshotError, match="MSI-X present in the snapshot"):
        L.VirtioPciLegacy(EchoDevice(), mem, LineInterrupt(lambda level: None)).load_state(saved, "t")


def test_device_state_for_a_stateless_device_is_refused() -> None:
    with pytest.raises(SnapshotError, match="does not have"):
        DeviceBase().load_state({"anything": 1})


def test_virtio_console_backlog_is_checked(mem: GuestMemory) -> None:
    con = VirtioConsole(mem, lambda out: None)
    con.receive(b"typed")
    state = con.save_state()
    other = VirtioConsole(mem, lambda out: None)
    other.load_state(state)
    assert other.save_state() == state
    with pytest.raises(SnapshotError, match="backlog"):
        other.load_state({"backlog": "A" * (4 << 20)})
    with pytest.raises(SnapshotError, match="unknown field"):
        other.load_state({"backlog": "", "more": 1})
