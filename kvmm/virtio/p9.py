"""virtio-9p: a host directory shared with the guest (device id 9; the transport of
Linux's ``net/9p/trans_virtio.c``, as QEMU's and kvmtool's 9p devices).

The configuration space is ``tag_len[2]`` and the mount tag (no NUL), offered with the
feature VIRTIO_9P_MOUNT_TAG (``<linux/virtio_9p.h>``); the guest mounts the share with
``mount -t 9p -o trans=virtio TAG DIR``. One request queue: each chain is a 9P2000.L
request in its device-readable buffers and room for the reply in its device-writable
ones; the used element's length is the reply's size, which Linux takes as the reply
(``req_done``: a length of 0 is no reply at all). The protocol and the host side are
:mod:`kvmm.p9`.

Requests are served on the I/O thread, in order, at most :data:`BUDGET` chains per turn
of the loop before the other devices get their turn: a slow host file system delays the
other devices by at most that many requests (docs/architecture.md has the measurement
and why there is no worker pool).

Snapshots: a share's open files are host file descriptors, and what they refer to can
change under a snapshot (a restore would have to re-open each by its name, which may
now be another file). A VM with a share refuses snapshots with a SnapshotError.
"""

from __future__ import annotations

import logging
import os
import resource
import struct
from typing import Any

from ..config import ShareConfig
from ..errors import ConfigError, ShareError, SnapshotError
from ..memory import GuestMemory
from ..p9.server import FileServer, Limits, P9Error
from ..ratelimit import RateLimitedLog
from .chain_io import Reader, Writer
from .device import VIRTIO_ID_9P, DeviceBase, DeviceContext, VirtioDevice, create_each, serve_queue
from .queue import Chain

LOG = logging.getLogger(__name__)

VIRTIO_9P_MOUNT_TAG = 0  # feature bit: the mount tag is in the configuration space
QUEUE_SIZE = 128
BUDGET = 8  # chains per turn of the I/O loop (see the module docstring)
LIMITS = Limits()


def create(ctx: DeviceContext) -> list[VirtioDevice]:
    """A virtio-9p device per ``--share``, in order."""
    tags = [share.tag for share in ctx.config.shares]
    if len(set(tags)) != len(tags):
        raise ConfigError(f"two shares have the same tag ({', '.join(sorted({t for t in tags if tags.count(t) > 1}))})")
    _raise_fd_limit(len(tags) * LIMITS.max_fids)
    return create_each(ctx.config.shares, lambda i, share: Virtio9p(open_share(share, f"9p{i}"), ctx.mem, share.tag, f"9p{i}"))


def open_share(share: ShareConfig, name: str) -> FileServer:
    """The file server of ``share``; a ShareError if its directory cannot be shared."""
    if not os.path.isdir(share.path):
        what = "does not exist" if not os.path.exists(share.path) else "is not a directory"
        raise ShareError(f"share {share.path!r} {what}")
    try:
        return FileServer(share.path, share.read_only, f"{name} {share.tag}", LIMITS)
    except P9Error as exc:
        raise ShareError(f"cannot share {share.path!r}: {exc}") from None
    except OSError as exc:
        raise ShareError(f"cannot share {share.path!r}: {exc.strerror}") from None


def _raise_fd_limit(wanted: int) -> None:
    """Every fid holds a host descriptor: lift the soft limit on open files towards what
    the shares may hold (up to the hard limit; beyond it, fids fail with EMFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = soft + wanted if hard == resource.RLIM_INFINITY else min(hard, soft + wanted)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            LOG.warning("cannot raise the open-file limit to %d for 9p shares: %s", target, exc)


class Virtio9p(DeviceBase):
    """The virtio-9p device model: one request queue, served by a :class:`FileServer`."""

    device_id = VIRTIO_ID_9P
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE,)
    pci_class_code = 0x018000  # mass storage, other
    name = "9p"

    def __init__(self, server: FileServer, mem: GuestMemory, tag: str, name: str = "9p") -> None:
        super().__init__()
        self.server = server
        self.mem = mem
        self.tag = tag.encode()
        self.name = name
        self.log = RateLimitedLog(LOG)

    def features(self) -> int:
        return 1 << VIRTIO_9P_MOUNT_TAG

    def config(self) -> bytes:
        return struct.pack("<H", len(self.tag)) + self.tag

    def process_queue(self, index: int) -> bool:
        if index == 0 and self.queues and self.interrupt is not None:
            return serve_queue(self.queues[0], 0, self.interrupt, f"virtio-9p {self.tag.decode()}", self._serve,
                               self.log.warning, budget=BUDGET)
        return False

    def _serve(self, chain: Chain) -> int:
        limit = self.server.limits.max_msize
        return self.server.serve(Reader(self.mem, chain.readable, limit), Writer(self.mem, chain.writable, limit))

    def reset(self) -> None:
        """A driver reset ends the session: every fid is clunked."""
        super().reset()
        self.server.clunk_all()
        self.server.msize = 0

    def save_state(self) -> Any:
        raise SnapshotError(f"a VM with a 9p share ({self.tag.decode()}) cannot be snapshotted: the guest's open "
                            "files in it are host file descriptors, which a snapshot cannot carry")

    def counters(self) -> dict[str, int]:
        return self.server.counters()

    def close(self) -> None:
        self.server.close()
