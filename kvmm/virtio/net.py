"""virtio-net over a TAP device (virtio 0.9.5 "Appendix C: Network Device").

Queue 0 receives (tap -> guest), queue 1 transmits (guest -> tap). Each frame carries the
legacy ``virtio_net_hdr`` (10 bytes, 12 with mergeable buffers), which the tap (IFF_VNET_HDR) reads and writes as is,
so frames move between guest memory and the tap with readv/writev and no parsing.

- TX: driven by the queue's ioeventfd in the I/O thread; a chain's readable buffers are
  one frame. A full tap queue drops the frame (counted), as a NIC would.
- RX: driven by the tap fd in the I/O thread. With VIRTIO_NET_F_MRG_RXBUF a frame (up to
  64 KiB with guest TSO) spreads over as many posted buffers as it needs and the 12-byte
  header says how many; without it, one frame per chain. When the guest posts too few
  buffers kvmm stops reading the tap until it posts more: at most one frame waits in
  kvmm, the rest in the kernel's tap queue (bounded by its txqueuelen).
- Offloads: CSUM and HOST_TSO4/6/ECN always (the tap completes partial checksums and
  segments GSO frames written to it); GUEST_CSUM and GUEST_TSO4/6/ECN only if the tap
  accepts the matching TUNSETOFFLOAD flags, which are set to what the driver acked.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import TYPE_CHECKING

from ..config import default_mac, parse_mac  # noqa: F401 (parse_mac: this module's name for it)
from ..eventloop import EventLoop
from ..memory import GuestMemory
from ..ratelimit import RateLimitedLog
from ..tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, Tap
from .device import VIRTIO_ID_NET, DeviceBase, DeviceContext, Interrupt, VirtioDevice, create_each, serve_queue
from .chain_io import Writer
from .queue import Chain, ChainError, Queue, QueueError

if TYPE_CHECKING:
    from ..config import NetConfig

LOG = logging.getLogger(__name__)

RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 256
VNET_HDR_LEN = 10
MAX_FRAME = 65550 + 12
RX_BUDGET = 256  # frames per tap wake-up, so one busy NIC cannot starve the loop

VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
MRG_HDR_LEN = 12
VIRTIO_NET_S_LINK_UP = 1


def create(ctx: DeviceContext) -> list[VirtioDevice]:
    """A NIC per ``--net``, each on its tap (opened here, closed with the device)."""

    def make(i: int, n: NetConfig) -> VirtioDevice:
        tap = Tap(n.tap)
        try:
            return VirtioNet(tap, ctx.mem, ctx.loop, n.mac, f"net{i}")
        except BaseException:
            tap.close()
            raise

    return create_each(ctx.config.nets, make)


class VirtioNet(DeviceBase):
    device_id = VIRTIO_ID_NET
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE, QUEUE_SIZE)
    pci_class_code = 0x020000
    name = "net"

    def __init__(self, tap: Tap, mem: GuestMemory, loop: EventLoop, mac: bytes | None = None, name: str = "net") -> None:
        super().__init__()
        self.name = name
        self.tap = tap
        self.mem = mem
        self.loop = loop
        self.mac = mac or default_mac(tap.name)  # as NetConfig.effective_mac, which snapshots record
        # What the tap can hand us (TUNSETOFFLOAD): that is what the guest may be offered.
        self.guest_csum_ok = tap.set_offload(TUN_F_CSUM)
        self.guest_tso_ok = tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
        tap.set_offload(0)  # until the driver says what it accepts
        self.rx_polling = False
        self.tx_frames = self.tx_dropped = self.rx_frames = self.rx_stalls = self.rx_truncated = self.rx_dropped = 0
        self.rx_buffer = bytearray(MAX_FRAME + 2)
        self.pending: memoryview | None = None
        self.mergeable = False
        self.log = RateLimitedLog(LOG)  # guest-triggered lines (docs/security.md)

    def features(self) -> int:
        # The tap completes partial checksums and segments GSO frames we write to it.
        f = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS) | (1 << VIRTIO_NET_F_MRG_RXBUF)
        f |= (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4) | (1 << VIRTIO_NET_F_HOST_TSO6) | (1 << VIRTIO_NET_F_HOST_ECN)
        if self.guest_csum_ok:
            f |= 1 << VIRTIO_NET_F_GUEST_CSUM
        if self.guest_tso_ok:
            f |= (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6) | (1 << VIRTIO_NET_F_GUEST_ECN)
        return f

    def config(self) -> bytes:
        return self.mac + struct.pack("<H", VIRTIO_NET_S_LINK_UP)

    def activate(self, queues: list[Queue], features: int, interrupt: Interrupt) -> None:
        super().activate(queues, features, interrupt)
        self.mergeable = bool(features & (1 << VIRTIO_NET_F_MRG_RXBUF))
        self.tap.set_vnet_hdr_len(MRG_HDR_LEN if self.mergeable else VNET_HDR_LEN)
        offload = 0
        if features & (1 << VIRTIO_NET_F_GUEST_CSUM):
            offload |= TUN_F_CSUM
            if features & (1 << VIRTIO_NET_F_GUEST_TSO4):
                offload |= TUN_F_TSO4
            if features & (1 << VIRTIO_NET_F_GUEST_TSO6):
                offload |= TUN_F_TSO6
            if features & (1 << VIRTIO_NET_F_GUEST_ECN):
                offload |= TUN_F_TSO_ECN
        self.tap.set_offload(offload)
        self.pending = None
        self._poll_tap(True)

    def reset(self) -> None:
        self._poll_tap(False)
        super().reset()

    def counters(self) -> dict[str, int]:
        return {"rx_frames": self.rx_frames, "tx_frames": self.tx_frames, "tx_dropped": self.tx_dropped,
                "rx_dropped": self.rx_dropped, "rx_truncated": self.rx_truncated, "rx_stalls": self.rx_stalls}

    def close(self) -> None:
        self.rx_polling = False
        self.loop.remove_reader(self.tap.fd)
        self.tap.close()

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
    def process_queue(self, index: int) -> bool:
        if not self.queues or self.interrupt is None:
            return False
        if index == TX_QUEUE:
            return serve_queue(self.queues[TX_QUEUE], TX_QUEUE, self.interrupt, "virtio-net tx", self._transmit)
        if index == RX_QUEUE:
            self._poll_tap(True)  # the driver posted receive buffers: read the tap again
            self._receive()
        return False

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
            self.log.debug("virtio-net: tap write failed: %s", exc.strerror)
        return 0

    # --- host side ----------------------------------------------------------------------
    def _tap_readable(self) -> None:
        interrupt = self.interrupt
        if interrupt is None:
            return
        with interrupt.lock:  # the transport's lock: vCPU threads may be resetting us
            self._receive()

    def _receive(self) -> None:
        """Move frames from the tap into the guest's receive buffers, until either runs
        out. A frame read from the tap but not yet placed waits in ``self.pending``."""
        if not self.queues or self.interrupt is None:
            return
        q = self.queues[RX_QUEUE]
        done = 0
        for _ in range(RX_BUDGET):
            if self.pending is None:
                try:
                    n = os.readv(self.tap.fd, [self.rx_buffer])
                except BlockingIOError:
                    break
                except OSError as exc:
                    self.log.debug("virtio-net: tap read failed: %s", exc.strerror)
                    break
                self.pending = memoryview(self.rx_buffer)[:n]
            dropped = self.rx_dropped
            try:
                placed = self._place(q, self.pending)
            except QueueError as exc:
                self.interrupt.needs_reset(f"virtio-net rx: {exc}")
                self._poll_tap(False)
                break
            if placed is None:
                # No buffers: the frame waits here and the rest in the tap's own queue
                # until the driver posts more (its notify resumes reading).
                self.rx_stalls += 1
                self._poll_tap(False)
                break
            for head, length in placed:
                q.push_used(head, length)
            done += len(placed)
            self.pending = None
            if self.rx_dropped == dropped:
                self.rx_frames += 1
        if done and q.needs_interrupt():
            self.interrupt.signal_used(RX_QUEUE)

    def _place(self, q: Queue, frame: memoryview) -> list[tuple[int, int]] | None:
        """Write ``frame`` (vnet header + packet) into one chain, or several with mergeable
        buffers (5.1.6.4, num_buffers in the header). None, with nothing consumed, if the
        guest has not posted enough buffers.

        Every byte goes through a chain :class:`Writer`, so nothing lands outside the
        buffers the driver posted: with mergeable buffers the 12-byte header is reserved
        at the start of the first chain and ``num_buffers`` (bytes 10-11) filled in there
        once the count is known, wherever the chain's descriptors split those bytes."""
        used: list[tuple[int, int]] = []
        popped = 0
        offset = 0
        first: Writer | None = None  # the first chain's, with the header reserved in it
        header: list[tuple[int, int]] = []
        while offset < len(frame) or not used:
            try:
                chain = q.pop()
            except ChainError as exc:
                self.log.warning("virtio-net rx: %s; completed with no data, frame dropped", exc)
                # Chains popped before it can no longer be given back: complete them empty.
                self.rx_dropped += 1
                return [*((head, 0) for head, _ in used), (exc.head, 0)]
            if chain is None:
                for _ in range(popped):
                    q.undo_pop()
                return None
            popped += 1
            out = Writer(self.mem, chain.writable)
            if self.mergeable and not used:
                reserved = out.reserve(MRG_HDR_LEN)
                if reserved is None:
                    # virtio 1.x 5.1.6.3.1 (0.9.5 Appendix C, "Packet Receive"): with
                    # VIRTIO_NET_F_MRG_RXBUF each receive buffer MUST be at least the size
                    # of the header. This one cannot hold num_buffers: give the buffer
                    # back empty and drop the frame (the next frame tries the next buffer).
                    self.rx_dropped += 1
                    self.log.warning("virtio-net rx: receive buffer %d holds %d bytes, less than the %d-byte header; "
                                     "frame dropped", chain.head, out.available, MRG_HDR_LEN)
                    return [(chain.head, 0)]
                first, header = out, reserved
                out.write_at(header, bytes(frame[: MRG_HDR_LEN - 2]))  # num_buffers once known
                offset = MRG_HDR_LEN
            written = out.write(frame[offset:])
            offset += written
            used.append((chain.head, out.done))
            if not self.mergeable:
                if offset < len(frame):
                    self.rx_truncated += 1  # the driver's buffer was too small for this frame
                break
            if written == 0 and offset < len(frame):
                self.rx_truncated += 1
                break  # a chain with no room: give up on the rest rather than spin
        if first is not None:
            # num_buffers: bytes 10-11 of the header, inside the first chain's buffers.
            first.write_at(header, struct.pack("<H", len(used)), MRG_HDR_LEN - 2)
        return used
