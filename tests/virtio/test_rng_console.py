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


# --- output ports (VmConfig.ports: kvmm run's stdout and stderr) ----------------------------
def port_devices(mem: GuestMemory, tmp_path, ports, console_device: str = "serial"):  # type: ignore[no-untyped-def]
    from kvmm.config import VmConfig
    from kvmm.console import ConsoleOutput
    from kvmm.eventloop import EventLoop
    from kvmm.virtio.device import DeviceContext

    claimed: list[object] = []
    primary = ConsoleOutput(path=str(tmp_path / "primary.log"))
    cfg = VmConfig(kernel="k", console_device=console_device, ports=ports)
    devices = C.create(DeviceContext(cfg, mem, EventLoop(), primary, claimed.append))
    return devices, claimed


def test_output_ports_write_to_their_files_and_one_takes_the_input(mem: GuestMemory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kvmm.config import PortConfig
    from kvmm.errors import SnapshotError

    devices, claimed = port_devices(mem, tmp_path, [PortConfig(path=str(tmp_path / "out"), input=True),
                                                    PortConfig(path=str(tmp_path / "err"))])
    assert [d.name for d in devices] == ["port0", "port1"] and claimed == [devices[0]]
    for dev, text in zip(devices, (b"to stdout\n", b"to stderr\n")):
        drv = LegacyDriver(dev, mem)
        drv.init()
        tx = drv.queues[C.TX_QUEUE]
        head = tx.build_chain([(tx.alloc(len(text), text), len(text), False)])
        tx.publish(head)
        drv.kick(C.TX_QUEUE)
    assert (tmp_path / "out").read_bytes() == b"to stdout\n" and (tmp_path / "err").read_bytes() == b"to stderr\n"
    with pytest.raises(SnapshotError, match="output ports"):
        devices[0].save_state()
    for dev in devices:
        dev.close()


def test_output_ports_follow_a_virtio_primary_console(mem: GuestMemory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kvmm.config import PortConfig

    devices, claimed = port_devices(mem, tmp_path, [PortConfig(fd=1)], console_device="virtio")
    assert [d.name for d in devices] == ["virtio_console", "port0"] and claimed == [devices[0]]


def test_an_output_port_whose_file_cannot_be_opened_is_a_config_error(mem: GuestMemory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kvmm.config import PortConfig
    from kvmm.errors import ConfigError

    with pytest.raises(ConfigError, match="console port file"):
        port_devices(mem, tmp_path, [PortConfig(path=str(tmp_path / "out")), PortConfig(path=str(tmp_path / "no" / "x"))])


def test_an_output_port_to_a_closed_pipe_drops_the_rest(mem: GuestMemory) -> None:
    import os

    from kvmm.config import PortConfig

    r, w = os.pipe()
    os.close(r)
    sink = C.PortSink(PortConfig(fd=w))
    sink.write(b"nobody reads this")
    assert sink.broken
    os.close(w)
