"""virtio-rng (virtio 0.9.5 "Appendix F: Entropy Device"): one request queue; the device
fills each chain's device-writable buffers with bytes from the host's getrandom().

Overlapping descriptors can claim more bytes than the guest has, so a request is capped
at ``MAX_REQUEST`` bytes (as Firecracker's 64 KiB): the host never allocates more than
that per request, whatever the guest writes.
"""

from __future__ import annotations

import logging
import os

from ..memory import GuestMemory
from .chain_io import Writer
from .device import VIRTIO_ID_RNG, DeviceBase, DeviceContext, VirtioDevice, serve_queue
from .queue import Chain

LOG = logging.getLogger(__name__)

QUEUE_SIZE = 64
MAX_REQUEST = 64 << 10


def create(ctx: DeviceContext) -> list[VirtioDevice]:
    return [VirtioRng(ctx.mem)] if ctx.config.rng else []


class VirtioRng(DeviceBase):
    device_id = VIRTIO_ID_RNG
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE,)
    pci_class_code = 0x00FF00
    name = "rng"

    def __init__(self, mem: GuestMemory) -> None:
        super().__init__()
        self.mem = mem
        self.bytes_served = 0
        self.requests = 0

    def process_queue(self, index: int) -> bool:
        if index == 0 and self.queues and self.interrupt is not None:
            return serve_queue(self.queues[0], 0, self.interrupt, "virtio-rng", self._fill)
        return False

    def _fill(self, chain: Chain) -> int:
        out = Writer(self.mem, chain.writable, MAX_REQUEST)
        written = out.write(os.getrandom(out.available)) if out.available else 0
        self.requests += 1
        self.bytes_served += written
        return written

    def counters(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes": self.bytes_served}
