"""virtio-net over a TAP device (virtio 0.9.5 "Appendix C: Network Device").

Queue 0 receives (tap -> guest), queue 1 transmits (guest -> tap). Each frame carries the
10-byte legacy ``virtio_net_hdr``, which the tap (IFF_VNET_HDR) reads and writes as is,
so frames move between guest memory and the tap with readv/writev and no parsing.

- TX: driven by the queue's ioeventfd in the I/O thread; a chain's readable buffers are
  one frame. A full tap queue drops the frame (counted), as a NIC would.
- RX: driven by the tap fd in the I/O thread; one frame per chain (without mergeable
  buffers and guest TSO the driver posts MTU-sized buffers). When the guest posts no
  buffers kvmm stops reading the tap until it does, so the only queue is the kernel's tap
  queue (bounded by its txqueuelen): kvmm never buffers without bound.
- Checksum offload: VIRTIO_NET_F_CSUM always (the tap completes partial checksums on
  write); VIRTIO_NET_F_GUEST_CSUM only if the tap accepts TUNSETOFFLOAD(TUN_F_CSUM).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct

from ..eventloop import EventLoop
from ..memory import GuestMemory
from ..tap import TUN_F_CSUM, Tap
from .device import VIRTIO_ID_NET, Interrupt, serve_queue
from .queue import Chain, ChainError, Queue, QueueError

LOG = logging.getLogger(__name__)

RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 256
VNET_HDR_LEN = 10
MAX_FRAME = 65550 + VNET_HDR_LEN
RX_BUDGET = 256  # frames per tap wake-up, so one busy NIC cannot starve the loop

VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"invalid MAC address {text!r}: expected six hex bytes like 52:54:00:12:34:56")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"MAC address {text} is a multicast address")
    return mac


def default_mac(seed: str) -> bytes:
    """A stable, locally administered unicast MAC in QEMU's 52:54:00 range."""
    return b"\x52\x54\x00" + hashlib.sha256(seed.encode()).digest()[:3]


class VirtioNet:
    device_id = VIRTIO_ID_NET
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, tap: Tap, mem: GuestMemory, loop: EventLoop, mac: bytes | None = None) -> None:
        self.tap = tap
        self.mem = mem
        self.loop = loop
        self.mac = mac or default_mac(tap.name)
        self.guest_csum_ok = tap.set_offload(TUN_F_CSUM)
        tap.set_offload(0)  # until the driver says what it accepts
        self.queues: list[Queue] = []
        self.interrupt: Interrupt | None = None
        self.features_acked = 0
        self.rx_polling = False
        self.tx_frames = self.tx_dropped = self.rx_frames = self.rx_stalls = 0

    def features(self) -> int:
        f = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS) | (1 << VIRTIO_NET_F_CSUM)
        if self.guest_csum_ok:
            f |= 1 << VIRTIO_NET_F_GUEST_CSUM
        return f

    def config(self) -> bytes:
        return self.mac + struct.pack("<H", VIRTIO_NET_S_LINK_UP)

    def config_write(self, offset: int, data: bytes) -> None:
        pass  # legacy drivers may write the MAC; kvmm keeps the configured one

    def activate(self, queues: list[Queue], features: int, interrupt: Interrupt) -> None:
        self.queues, self.interrupt, self.features_acked = queues, interrupt, features
        self.tap.set_offload(TUN_F_CSUM if features & (1 << VIRTIO_NET_F_GUEST_CSUM) else 0)
        self._poll_tap(True)

    def reset(self) -> None:
        self._poll_tap(False)
        self.queues, self.interrupt = [], None

    def _poll_tap(self, on: bool) -> None:
        if on == self.rx_polling:
            return
        self.rx_polling = on
        fd = self.tap.fd
        if on:
            self.loop.call_soon(lambda: self.loop.add_reader(fd, self._tap_readable) if self.rx_polling else None)
        else:
            self.loop.call_soon(lambda: self.loop.remove_reader(fd))

    # --- guest side ---------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if not self.queues or self.interrupt is None:
            return
        if index == TX_QUEUE:
            serve_queue(self.queues[TX_QUEUE], TX_QUEUE, self.interrupt, "virtio-net tx", self._transmit)
        elif index == RX_QUEUE:
            self._poll_tap(True)  # the driver posted receive buffers: read the tap again
            self._receive()

    def _transmit(self, chain: Chain) -> int:
        frame = chain.readable
        if sum(d.length for d in frame) > MAX_FRAME:
            self.tx_dropped += 1
            return 0
        try:
            os.writev(self.tap.fd, [self.mem.view(d.addr, d.length) for d in frame])
            self.tx_frames += 1
        except BlockingIOError:
            self.tx_dropped += 1  # the tap's queue is full: drop, as a NIC would
        except OSError as exc:
            self.tx_dropped += 1
            LOG.debug("virtio-net: tap write failed: %s", exc.strerror)
        return 0

    # --- host side ----------------------------------------------------------------------
    def _tap_readable(self) -> None:
        interrupt = self.interrupt
        if interrupt is None:
            return
        with interrupt.lock:  # the transport's lock: vCPU threads may be resetting us
            self._receive()

    def _receive(self) -> None:
        if not self.queues or self.interrupt is None:
            return
        q = self.queues[RX_QUEUE]
        done = 0
        for _ in range(RX_BUDGET):
            try:
                chain = q.pop()
            except ChainError as exc:
                LOG.warning("virtio-net rx: %s; completed with no data", exc)
                q.push_used(exc.head, 0)
                done += 1
                continue
            except QueueError as exc:
                self.interrupt.needs_reset(f"virtio-net rx: {exc}")
                self._poll_tap(False)
                break
            if chain is None:
                # No buffers: leave frames in the tap until the driver posts some.
                self.rx_stalls += 1
                self._poll_tap(False)
                break
            views = [self.mem.view(d.addr, d.length) for d in chain.writable]
            try:
                n = os.readv(self.tap.fd, views) if views else 0
            except BlockingIOError:
                q.undo_pop()
                break
            except OSError as exc:
                LOG.debug("virtio-net: tap read failed: %s", exc.strerror)
                q.undo_pop()
                break
            q.push_used(chain.head, n)
            self.rx_frames += 1
            done += 1
        if done and q.needs_interrupt():
            self.interrupt.signal_used(RX_QUEUE)

