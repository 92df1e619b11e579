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
from .device import VIRTIO_ID_RNG, DeviceBase, serve_queue
from .queue import Chain

LOG = logging.getLogger(__name__)

QUEUE_SIZE = 64
MAX_REQUEST = 64 << 10


class VirtioRng(DeviceBase):
    device_id = VIRTIO_ID_RNG
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE,)

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
        budget = MAX_REQUEST
        written = 0
        for d in chain.writable:
            n = min(d.length, budget)
            if n == 0:
                break
            self.mem.write(d.addr, os.getrandom(n))
            written += n
            budget -= n
        self.requests += 1
        self.bytes_served += written
        return written
