"""virtio-net (0.9.5 Appendix C) against a fake tap: a SOCK_SEQPACKET pair keeps frame
boundaries as a tap does."""

from __future__ import annotations

import socket
import struct

import pytest

from kvmm.eventloop import EventLoop
from kvmm.memory import GuestMemory
from kvmm.virtio import net as N

from .harness import LegacyDriver


class FakeTap:
    def __init__(self) -> None:
        self.host, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        peer.setblocking(False)
        self._peer = peer
        self.fd = peer.fileno()
        self.name = "faketap0"
        self.offload = 0
        self.vnet_hdr_len = 10

    def set_offload(self, flags: int) -> bool:
        self.offload = flags
        return True

    def set_vnet_hdr_len(self, length: int) -> None:
        self.vnet_hdr_len = length


@pytest.fixture
def setup():  # type: ignore[no-untyped-def]
    mem = GuestMemory.allocate(16 << 20, check_available=False)
    tap = FakeTap()
    loop = EventLoop()
    dev = N.VirtioNet(tap, mem, loop)  # type: ignore[arg-type]
    drv = LegacyDriver(dev, mem)
    yield drv, dev, tap, mem, loop
    loop.close()


def test_config_has_mac_and_link_up(setup) -> None:  # type: ignore[no-untyped-def]
    drv, dev, *_ = setup
    cfg = bytes(drv.r(20 + i, 1) for i in range(8))
    assert cfg[:6] == dev.mac and cfg[:3] == b"\x52\x54\x00"
    assert struct.unpack("<H", cfg[6:])[0] == N.VIRTIO_NET_S_LINK_UP


def test_offloads_follow_what_the_driver_acked(setup) -> None:  # type: ignore[no-untyped-def]
    drv, dev, tap, *_ = setup
    drv.init(features=(1 << N.VIRTIO_NET_F_MAC) | (1 << N.VIRTIO_NET_F_GUEST_CSUM) | (1 << N.VIRTIO_NET_F_MRG_RXBUF))
    assert tap.offload == N.TUN_F_CSUM and tap.vnet_hdr_len == 12 and dev.mergeable


def test_transmit_writes_one_frame_to_the_tap(setup) -> None:  # type: ignore[no-untyped-def]
    drv, dev, tap, *_ = setup
    drv.init(features=1 << N.VIRTIO_NET_F_MAC)
    tx = drv.queues[N.TX_QUEUE]
    hdr, pkt = b"\0" * 10, b"P" * 60
    head = tx.build_chain([(tx.alloc(10, hdr), 10, False), (tx.alloc(60, pkt), 60, False)])
    tx.publish(head)
    drv.kick(N.TX_QUEUE)
    tx.check_used(head, 0)
    assert tap.host.recv(4096) == hdr + pkt and dev.tx_frames == 1


def post_rx(drv: LegacyDriver, n: int, size: int) -> list[int]:
    rx = drv.queues[N.RX_QUEUE]
    addrs = [rx.alloc(size) for _ in range(n)]
    rx.publish(*[rx.build_chain([(a, size, True)]) for a in addrs])
    return addrs


def test_mergeable_frame_spans_buffers_with_num_buffers(setup) -> None:  # type: ignore[no-untyped-def]
    drv, dev, tap, mem, _ = setup
    drv.init(features=(1 << N.VIRTIO_NET_F_MRG_RXBUF))
    addrs = post_rx(drv, 4, 1500)
    frame = b"\0" * 12 + bytes(range(256)) * 12  # 12 + 3072 bytes: needs three buffers
    tap.host.send(frame)
    dev._tap_readable()
    used = drv.queues[N.RX_QUEUE].take_used()
    assert [length for _, length in used] == [1500, 1500, len(frame) - 3000]
    got = mem.read(addrs[0], 1500) + mem.read(addrs[1], 1500) + mem.read(addrs[2], len(frame) - 3000)
    assert struct.unpack_from("<H", got, 10)[0] == 3  # num_buffers
    assert got[12:] == frame[12:]


def test_no_rx_buffers_keeps_the_frame_and_stops_reading_the_tap(setup) -> None:  # type: ignore[no-untyped-def]
    drv, dev, tap, mem, loop = setup
    drv.init(features=(1 << N.VIRTIO_NET_F_MRG_RXBUF))
    for i in range(3):
        tap.host.send(b"\0" * 12 + bytes([i]) * 100)
    dev._tap_readable()
    assert dev.pending is not None and dev.rx_stalls == 1 and not dev.rx_polling
    assert drv.queues[N.RX_QUEUE].used_idx() == 0
    addrs = post_rx(drv, 2, 1500)
    drv.kick(N.RX_QUEUE)  # the driver's notify resumes reception
    used = drv.queues[N.RX_QUEUE].take_used()
    assert [length for _, length in used] == [112, 112]
    assert mem.read(addrs[0] + 12, 1) == b"\0" and mem.read(addrs[1] + 12, 1) == b"\x01"
    assert dev.pending is not None  # the third frame waits for the next buffer (bounded: one frame)


def test_too_small_buffer_without_mergeable_truncates(setup) -> None:  # type: ignore[no-untyped-def]
    drv, dev, tap, *_ = setup
    drv.init(features=0)
    post_rx(drv, 1, 64)
    tap.host.send(b"\0" * 10 + b"x" * 200)
    dev._tap_readable()
    assert drv.queues[N.RX_QUEUE].take_used()[0][1] == 64 and dev.rx_truncated == 1


def test_mac_parsing() -> None:
    assert N.parse_mac("52:54:00:12:34:56") == bytes.fromhex("525400123456")
    for bad in ("52:54:00:12:34", "zz:54:00:12:34:56", "01:00:5e:00:00:01"):
        with pytest.raises(ValueError):
            N.parse_mac(bad)


# --- hostile receive buffers (issue 19, defect 3) ---------------------------------------

def test_mergeable_first_buffer_shorter_than_the_header_drops_the_frame(setup) -> None:  # type: ignore[no-untyped-def]
    """virtio 1.x 5.1.6.3.1: with VIRTIO_NET_F_MRG_RXBUF the driver MUST make each receive
    buffer at least the header's size. A 1-byte buffer at the very end of guest RAM once
    made kvmm write num_buffers 10 bytes past it, outside RAM, and exit: now the buffer is
    given back empty, the frame dropped, and the next frame uses the next buffer."""
    drv, dev, tap, mem, _ = setup
    drv.init(features=(1 << N.VIRTIO_NET_F_MRG_RXBUF))
    rx = drv.queues[N.RX_QUEUE]
    last = mem.size - 1
    mem.write(last, b"\x5a")
    tiny = rx.build_chain([(last, 1, True)])
    good = rx.alloc(1500)
    rx.publish(tiny, rx.build_chain([(good, 1500, True)]))
    tap.host.send(b"\0" * 12 + b"A" * 100)
    tap.host.send(b"\0" * 12 + b"B" * 100)
    dev._tap_readable()  # raised GuestMemoryError (outside guest RAM) before the fix
    assert rx.take_used() == [(tiny, 0), (1, 112)]
    assert mem.read(last, 1) == b"\x5a"  # nothing written into a buffer too small for the header
    assert mem.read(good + 12, 100) == b"B" * 100 and struct.unpack("<H", mem.read(good + 10, 2))[0] == 1
    assert dev.rx_dropped == 1 and dev.rx_frames == 1


def test_mergeable_header_split_over_descriptors_gets_num_buffers_in_place(setup) -> None:  # type: ignore[no-untyped-def]
    """num_buffers is bytes 10-11 of the header wherever the chain's descriptors split it
    (here 4 + 8 + the rest): it used to be written at the first descriptor's address + 10,
    past that 4-byte buffer, over whatever the guest kept there."""
    drv, dev, tap, mem, _ = setup
    drv.init(features=(1 << N.VIRTIO_NET_F_MRG_RXBUF))
    rx = drv.queues[N.RX_QUEUE]
    a, b, c = rx.alloc(4), rx.alloc(8), rx.alloc(1500)
    after_a = a + 4
    mem.write(after_a, b"\xee" * 8)  # the guest's own bytes right after the 4-byte buffer
    rx.publish(rx.build_chain([(a, 4, True), (b, 8, True), (c, 1500, True)]))
    tap.host.send(bytes(range(10)) + b"\0\0" + b"P" * 64)
    dev._tap_readable()
    assert rx.take_used() == [(0, 76)]
    header = mem.read(a, 4) + mem.read(b, 8)
    assert header[:10] == bytes(range(10)) and struct.unpack_from("<H", header, 10)[0] == 1
    assert mem.read(c, 64) == b"P" * 64
    assert mem.read(after_a, 8) == b"\xee" * 8
