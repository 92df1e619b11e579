"""virtio-blk on a raw image file (virtio 0.9.5, "Appendix D: Block Device").

A request is a descriptor chain: a 16-byte read-only header (type, reserved, sector),
data buffers (device-writable for reads, read-only for writes), and a final
device-writable status byte. As rust-vmm's virtio-blk, :meth:`BlkRequest.parse` only
validates; :class:`RawDisk` executes with ``preadv``/``pwritev`` straight between the
file and guest memory; completion writes the status and pushes the used element.
A malformed request completes with VIRTIO_BLK_S_IOERR (or UNSUPP) and a rate-limited log
line; the device carries on.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from dataclasses import dataclass

from ..errors import DiskError
from ..files import file_size, open_input
from ..ratelimit import RateLimitedLog
from ..memory import GuestMemory
from .chain_io import Writer
from .device import VIRTIO_ID_BLOCK, DeviceBase, DeviceContext, VirtioDevice, create_each, serve_queue
from .queue import Chain, Descriptor

LOG = logging.getLogger(__name__)

SECTOR_SIZE = 512
QUEUE_SIZE = 256
SIZE_MAX = 1 << 20  # largest single data segment the driver may send
SERIAL_LEN = 20  # VIRTIO_BLK_ID_BYTES

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

_HEADER = struct.Struct("<IIQ")


class RawDisk:
    """A raw image, opened and advisory-locked (exclusive read-write, shared read-only)."""

    def __init__(self, path: str, read_only: bool = False, serial: str | None = None) -> None:
        self.path = path
        self.read_only = read_only
        # Non-blocking open and fstat (kvmm/files.py): a FIFO or a character device is no
        # disk, and opening one must not stall kvmm.
        how = "for reading" if read_only else "read-write (add ,ro to open it read-only)"
        self.fd = open_input(path, "disk", DiskError, write=not read_only, block_device=True, denied=how)
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DiskError(f"disk {path!r} is in use by another process (it holds the image's lock)") from None
            raise DiskError(f"cannot lock disk {path!r}: {exc.strerror}") from None
        size = file_size(self.fd)
        if size % SECTOR_SIZE:
            LOG.warning("disk %s: size %d is not a multiple of %d; the last partial sector is not visible",
                        path, size, SECTOR_SIZE)
        self.sectors = size // SECTOR_SIZE
        self.serial = (serial if serial is not None else os.path.basename(path)).encode()[:SERIAL_LEN]

    def read_into(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` from the file at ``offset``; short reads past EOF read zeros."""
        while views:
            n = os.preadv(self.fd, views, offset)
            if n == 0:
                for v in views:
                    v[:] = bytes(len(v))
                return
            offset += n
            views = _advance(views, n)

    def write_from(self, views: list[memoryview], offset: int) -> None:
        while views:
            n = os.pwritev(self.fd, views, offset)
            offset += n
            views = _advance(views, n)

    def flush(self) -> None:
        if not self.read_only:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self.fd)
                self.fd = -1


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes from a list of buffers (after a partial preadv/pwritev)."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out


class RequestError(Exception):
    """A request that completes with ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        super().__init__(reason)


@dataclass(frozen=True)
class BlkRequest:
    """A parsed request: header fields, data descriptors and the status byte's descriptor."""

    type: int
    sector: int
    data: tuple[Descriptor, ...]
    status: Descriptor

    @property
    def data_len(self) -> int:
        return sum(d.length for d in self.data)

    @staticmethod
    def status_descriptor(chain: Chain) -> Descriptor | None:
        """The descriptor holding the status byte, if the chain has a usable one."""
        last = chain.descriptors[-1]
        return last if last.is_write_only and last.length >= 1 else None

    @classmethod
    def parse(cls, mem: GuestMemory, chain: Chain, capacity: int, read_only: bool) -> BlkRequest:
        """Validate ``chain`` as a block request; raises RequestError (status known)."""
        status = cls.status_descriptor(chain)
        assert status is not None and len(chain.descriptors) >= 2  # checked by the caller
        header = chain.descriptors[0]
        if header.is_write_only or header.length < _HEADER.size:
            raise RequestError(VIRTIO_BLK_S_IOERR, "request header is not a readable 16-byte buffer")
        rtype, _reserved, sector = mem.read_struct(header.addr, _HEADER)
        data = chain.descriptors[1:-1]
        req = cls(rtype, sector, data, status)
        if rtype == VIRTIO_BLK_T_IN or rtype == VIRTIO_BLK_T_GET_ID:
            if any(not d.is_write_only for d in data):
                raise RequestError(VIRTIO_BLK_S_IOERR, "read request with a device-readable data buffer")
        elif rtype == VIRTIO_BLK_T_OUT:
            if any(d.is_write_only for d in data):
                raise RequestError(VIRTIO_BLK_S_IOERR, "write request with a device-writable data buffer")
            if read_only:
                raise RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
        elif rtype == VIRTIO_BLK_T_FLUSH:
            return req
        else:
            raise RequestError(VIRTIO_BLK_S_UNSUPP, f"unsupported request type {rtype}")
        if rtype != VIRTIO_BLK_T_GET_ID:
            nbytes = req.data_len
            if nbytes % SECTOR_SIZE:
                raise RequestError(VIRTIO_BLK_S_IOERR, f"data length {nbytes} is not a whole number of sectors")
            if sector > capacity or nbytes // SECTOR_SIZE > capacity - sector:
                raise RequestError(VIRTIO_BLK_S_IOERR, f"sectors {sector}+{nbytes // SECTOR_SIZE} lie beyond the disk's {capacity}")
        return req


def create(ctx: DeviceContext) -> list[VirtioDevice]:
    """A disk per ``--disk``: vda, vdb, ... in order."""
    return create_each(ctx.config.disks, lambda i, d: VirtioBlk(RawDisk(d.path, d.read_only, d.serial), ctx.mem, f"blk{i}"))


class VirtioBlk(DeviceBase):
    """The virtio-blk device model (one request queue) on a raw image it owns."""

    device_id = VIRTIO_ID_BLOCK
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE,)
    pci_class_code = 0x010000
    name = "blk"

    def __init__(self, disk: RawDisk, mem: GuestMemory, name: str = "blk") -> None:
        super().__init__()
        self.name = name
        self.disk = disk
        self.mem = mem
        self.log = RateLimitedLog(LOG)
        self.requests = 0
        self.errors = 0

    def features(self) -> int:
        f = (1 << VIRTIO_BLK_F_SIZE_MAX) | (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_FLUSH)
        if self.disk.read_only:
            f |= 1 << VIRTIO_BLK_F_RO
        return f

    def config(self) -> bytes:
        # capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size
        return struct.pack("<QIIHBBI", self.disk.sectors, SIZE_MAX, QUEUE_SIZE - 2, 0, 0, 0, SECTOR_SIZE)


    def process_queue(self, index: int) -> bool:
        if index == 0 and self.queues and self.interrupt is not None:
            return serve_queue(self.queues[0], 0, self.interrupt, f"virtio-blk {self.disk.path}", self.execute, self.log.warning)
        return False

    def execute(self, chain: Chain) -> int:
        """Run one request; returns the number of bytes written to guest memory."""
        self.requests += 1
        mem = self.mem
        status_desc = BlkRequest.status_descriptor(chain) if len(chain.descriptors) >= 2 else None
        if status_desc is None:
            self.errors += 1
            self.log.warning("virtio-blk %s: request %d has no status byte; completed with no data", self.disk.path, chain.head)
            return 0
        written = 0
        try:
            req = BlkRequest.parse(mem, chain, self.disk.sectors, self.disk.read_only)
            if req.type == VIRTIO_BLK_T_IN:
                self.disk.read_into([mem.view(d.addr, d.length) for d in req.data], req.sector * SECTOR_SIZE)
                written = req.data_len
            elif req.type == VIRTIO_BLK_T_OUT:
                self.disk.write_from([mem.view(d.addr, d.length) for d in req.data], req.sector * SECTOR_SIZE)
            elif req.type == VIRTIO_BLK_T_FLUSH:
                self.disk.flush()
            elif req.type == VIRTIO_BLK_T_GET_ID:
                written = Writer(mem, req.data).write(self.disk.serial.ljust(SERIAL_LEN, b"\0"))
            status = VIRTIO_BLK_S_OK
        except RequestError as exc:
            self.errors += 1
            self.log.warning("virtio-blk %s: request %d: %s", self.disk.path, chain.head, exc)
            status = exc.status
            written = 0
        except OSError as exc:
            self.errors += 1
            self.log.warning("virtio-blk %s: I/O error: %s", self.disk.path, exc.strerror)
            status = VIRTIO_BLK_S_IOERR
            written = 0
        mem.write_u8(status_desc.addr + status_desc.length - 1, status)
        return written + 1

    def counters(self) -> dict[str, int]:
        return {"requests": self.requests, "errors": self.errors}

    def flush(self) -> None:
        self.disk.flush()

    def close(self) -> None:
        """fsync and close the image: what the guest wrote is on disk when kvmm ends."""
        self.disk.close()
