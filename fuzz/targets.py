"""Fuzz targets for everything a guest controls. Each takes raw bytes and drives one
component the way a hostile guest could; any exception escaping is a bug (the guest must
never raise into kvmm's vCPU or I/O threads). Run them with ``scripts/fuzz`` (atheris,
coverage-guided) or replay a corpus with the tests (tests/test_fuzz_targets.py)."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from kernel_images import wrap_payload  # noqa: E402
from kvmm.devices.bus import MmioBus, PioBus  # noqa: E402
from kvmm.devices.cmos import Cmos  # noqa: E402
from kvmm.devices.i8042 import I8042  # noqa: E402
from kvmm.devices.pci import PciBus, PciDevice  # noqa: E402
from kvmm.devices.serial import Serial8250  # noqa: E402
from kvmm.errors import KernelImageError, SnapshotError  # noqa: E402
from kvmm.eventloop import EventLoop  # noqa: E402
from kvmm.irq import LineInterrupt, MsiCallbacks  # noqa: E402
from kvmm.loader import load_linux  # noqa: E402
from kvmm.loader import multiboot as mb  # noqa: E402
from kvmm.memory import GuestMemory  # noqa: E402
from kvmm.snapshot import MachineState, load_devices  # noqa: E402
from kvmm.state import from_json  # noqa: E402
from kvmm.virtio import blk as B  # noqa: E402
from kvmm.virtio import console as C  # noqa: E402
from kvmm.virtio import net as N  # noqa: E402
from kvmm.virtio import pci_legacy as L  # noqa: E402
from kvmm.virtio import rng as R  # noqa: E402
from kvmm.p9 import wire as W9  # noqa: E402
from kvmm.p9.server import FileServer  # noqa: E402
from kvmm.virtio import p9 as P9  # noqa: E402
from kvmm.virtio.chain_io import Reader as ChainReader, Writer as ChainWriter  # noqa: E402
from kvmm.virtio.queue import Descriptor, VIRTQ_DESC_F_WRITE  # noqa: E402

logging.disable(logging.WARNING)  # hostile input is expected here: keep the fuzzer's output readable
MEM_SIZE = 2 << 20
RING_PFN = 0x10  # rings at 64 KiB, as the harness places them
_mem = GuestMemory.allocate(MEM_SIZE, check_available=False)
_tmp = tempfile.mkdtemp(prefix="kvmm-fuzz-")
_image = os.path.join(_tmp, "disk.img")
with open(_image, "wb") as f:
    f.write(bytes(256 << 10))


class _Reader:
    """Consumes fuzz bytes as little-endian integers; zeros when they run out."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> int:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return int.from_bytes(chunk.ljust(n, b"\0"), "little")

    def rest(self) -> bytes:
        return self.data[self.pos :]

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


class _FakeTap:
    def __init__(self) -> None:
        self.host, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        peer.setblocking(False)
        self.host.setblocking(False)
        self._peer, self.fd, self.name = peer, peer.fileno(), "fuzztap"

    def set_offload(self, flags: int) -> bool:
        return True

    def set_vnet_hdr_len(self, length: int) -> None:
        pass


_loop = EventLoop()
_tap = _FakeTap()
_disk = B.RawDisk(_image, serial="fuzz")


def _devices() -> dict[str, object]:
    return {
        "blk": B.VirtioBlk(_disk, _mem),
        "net": N.VirtioNet(_tap, _mem, _loop),  # type: ignore[arg-type]
        "console": C.VirtioConsole(_mem, lambda data: None),
        "rng": R.VirtioRng(_mem),
    }


_share = os.path.join(_tmp, "share")


def _share_tree() -> str:
    """A small shared directory, made afresh (a read-write fuzz run changes it)."""
    import shutil

    if os.path.isdir(_share):
        for entry in os.listdir(_share):
            path = os.path.join(_share, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    os.makedirs(os.path.join(_share, "dir", "sub"), exist_ok=True)
    with open(os.path.join(_share, "file"), "wb") as f:
        f.write(bytes(range(256)) * 16)
    os.symlink("file", os.path.join(_share, "link"))
    os.symlink("..", os.path.join(_share, "dir", "up"))
    return _share


def _virtio(kind: str, data: bytes, dev: object | None = None) -> None:
    """Driver registers + ring memory + kicks, all from the fuzz input."""
    r = _Reader(data)
    dev = _devices()[kind] if dev is None else dev
    t = L.VirtioPciLegacy(dev, _mem, LineInterrupt(lambda level: None), MsiCallbacks() if r.take(1) & 1 else None)  # type: ignore[arg-type]
    # A plausible start (most inputs then reach the queue code): features, rings, DRIVER_OK.
    t.pio_write(L.STATUS, 1, 3)
    t.pio_write(L.GUEST_FEATURES, 4, r.take(4))
    for q in range(len(t.queues)):
        t.pio_write(L.QUEUE_SEL, 2, q)
        t.pio_write(L.QUEUE_PFN, 4, RING_PFN + 8 * q)
    t.pio_write(L.STATUS, 1, 7)
    ring_bytes = r.take(2) % 4096
    _mem.write(RING_PFN << 12, r.rest()[:ring_bytes].ljust(ring_bytes, b"\0"))
    r.pos += ring_bytes
    while r.left > 0:
        op = r.take(1)
        if op & 3 == 0:  # register write
            t.pio_write(r.take(1) % 40, (1, 2, 4)[r.take(1) % 3], r.take(4))
        elif op & 3 == 1:  # register read
            t.pio_read(r.take(1) % 40, (1, 2, 4)[r.take(1) % 3])
        elif op & 3 == 2:  # guest memory write (descriptors, rings, buffers)
            gpa = r.take(3) % MEM_SIZE
            blob = r.rest()[: r.take(1)]
            r.pos += len(blob)
            if _mem.contains(gpa, len(blob)):
                _mem.write(gpa, blob)
        else:  # kick a queue (the notify path)
            t.pio_write(L.QUEUE_NOTIFY, 2, r.take(1) % 4)
            if kind == "net":
                dev._receive()  # type: ignore[attr-defined]
            if kind == "console":
                dev.receive(b"input")  # type: ignore[attr-defined]
    t.pio_write(L.STATUS, 1, 0)


def fuzz_virtio_blk(data: bytes) -> None:
    _virtio("blk", data)


def fuzz_virtio_net(data: bytes) -> None:
    try:
        _tap.host.send(b"\0" * 12 + data[:200])  # a frame for the RX path
    except BlockingIOError:
        pass
    _virtio("net", data)
    # The device hands tap (un)registration to the I/O loop; run it so nothing piles up.
    _loop.run_once(0)
    _loop.remove_reader(_tap.fd)


def fuzz_virtio_console(data: bytes) -> None:
    _virtio("console", data)


def fuzz_virtio_rng(data: bytes) -> None:
    _virtio("rng", data)


def fuzz_virtio_9p(data: bytes) -> None:
    """virtio-9p's queue: rings, descriptors and messages all from the fuzz input, on a
    read-write share (the first byte's low bit: read-only)."""
    server = FileServer(_share_tree(), read_only=bool(data[:1]) and bool(data[0] & 1), name="fuzz")
    dev = P9.Virtio9p(server, _mem, "fuzz")
    try:
        _virtio("9p", data[1:], dev)
    finally:
        dev.close()


_MSG_AREA, _REPLY_AREA = 0x100000, 0x140000


def fuzz_p9_messages(data: bytes) -> None:
    """9P messages straight into the server after a valid Tversion and Tattach (fid 0):
    each is ``length[2]`` then that many bytes (the whole message, header included),
    with a reply room of ``room[2]`` bytes. The first byte: bit 0 read-only, bit 1 the
    reply in two buffers (Linux's zero-copy layout)."""
    r = _Reader(data)
    mode = r.take(1)
    server = FileServer(_share_tree(), read_only=bool(mode & 1), name="fuzz")
    try:
        preamble = [W9.encode(W9.TVERSION, W9.NOTAG, "ds", 65536, W9.VERSION),
                    W9.encode(W9.TATTACH, 1, "ddssd", 0, W9.NOFID, b"u", b"", 0)]
        messages = preamble
        while r.left > 0 and len(messages) < 64:
            n = r.take(2) % 4096
            room = r.take(2) % 70000
            messages.append((n, room, r.rest()[:n]))  # type: ignore[arg-type]
            r.pos += n
        for item in messages:
            if isinstance(item, bytes):
                msg, room = item, 8192
            else:
                _n, room, msg = item  # type: ignore[misc]
            _mem.write(_MSG_AREA, msg)
            readable = [Descriptor(_MSG_AREA, len(msg), 0, 0)]
            if mode & 2 and room > 11:
                writable = [Descriptor(_REPLY_AREA, 11, VIRTQ_DESC_F_WRITE, 0),
                            Descriptor(_REPLY_AREA + 4096, room - 11, VIRTQ_DESC_F_WRITE, 0)]
            else:
                writable = [Descriptor(_REPLY_AREA, room, VIRTQ_DESC_F_WRITE, 0)]
            written = server.serve(ChainReader(_mem, readable, 1 << 20), ChainWriter(_mem, writable, 1 << 20))
            assert 0 <= written <= room
    finally:
        server.close()


def fuzz_pci_config(data: bytes) -> None:
    """Config mechanism #1: any sequence of address/data accesses of any width."""
    r = _Reader(data)
    pio = PioBus()
    bus = PciBus(pio)
    dev = PciDevice(0x1AF4, 0x1001, 0x010000)
    dev.add_io_bar(0, 0x40, Cmos())
    bus.add(dev)
    while r.left > 0:
        port = 0xCF8 + r.take(1) % 8
        size = (1, 2, 4)[r.take(1) % 3]
        if r.take(1) & 1:
            pio.write(port, size, r.take(4) & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= pio.read(port, size) < 1 << (8 * size)


def fuzz_legacy_devices(data: bytes) -> None:
    """UART, i8042 and CMOS registers: any access sequence, plus host input."""
    r = _Reader(data)
    serial = Serial8250(lambda out: None, lambda level: None)
    devices = [serial, I8042(lambda: None), Cmos()]
    while r.left > 0:
        dev = devices[r.take(1) % 3]
        off = r.take(1) % 8
        if r.take(1) & 1:
            dev.pio_write(off, 1, r.take(1))  # type: ignore[attr-defined]
        else:
            assert 0 <= dev.pio_read(off, 1) <= 0xFF  # type: ignore[attr-defined]
        if r.take(1) == 0xFF:
            serial.receive(r.rest()[:32])


def _snapshot_devices() -> tuple[Serial8250, Cmos, PciBus, list[L.VirtioPciLegacy]]:
    """The devices a snapshot's state is loaded into: a UART, CMOS, and virtio-blk and
    virtio-console with MSI-X on the PCI bus (the layout of the seed corpus)."""
    pci = PciBus(PioBus(), MmioBus())
    transports = [L.VirtioPciLegacy(dev, _mem, LineInterrupt(lambda level: None), MsiCallbacks())  # type: ignore[arg-type]
                  for dev in (B.VirtioBlk(_disk, _mem), C.VirtioConsole(_mem, lambda data: None))]
    for t in transports:
        pci.add(t)
    return Serial8250(lambda out: None, lambda level: None), Cmos(), pci, transports


def fuzz_snapshot_state(data: bytes) -> None:
    """A snapshot's state.json (untrusted: a snapshot may come from anywhere), decoded and
    loaded into fresh devices. Only SnapshotError may come out."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return
    try:
        st = from_json(MachineState, raw, "state")
        load_devices(st, *_snapshot_devices())
    except SnapshotError:
        pass


_kernel_mem = GuestMemory.allocate(4 << 20, check_available=False)


def fuzz_bzimage_payload(data: bytes) -> None:
    """A bzImage (the project kernel's setup header) whose payload is the fuzz input after
    4 knob bytes: the boot protocol version (2.06 + byte 0 % 10), bytes cut from the end
    of payload_length (byte 1), the kernel's own decompressor asked for (byte 2, bit 0).
    Loaded into 4 MiB of guest RAM, which also bounds the decompressed size. Only
    KernelImageError may come out (the CLI's one line, exit status 10)."""
    r = _Reader(data)
    version, cut, flags = 0x0206 + r.take(1) % 10, r.take(1), r.take(2)
    payload = r.rest()
    image = wrap_payload(payload, version=version, payload_length=max(len(payload) - cut, 0))
    try:
        load_linux(_kernel_mem, image, "console=ttyS0", name="fuzz", bzimage_decompressor=bool(flags & 1))
    except KernelImageError:
        pass


def fuzz_multiboot(data: bytes) -> None:
    """A kernel image for the multiboot loader (kvmm/loader/multiboot.py) into 2 MiB of
    RAM, with two small modules. The first byte picks how the header is made: 0 = the
    input as is; else a header with a valid checksum over the next 4 bytes of flags and
    20 of addresses, so most inputs get past the checksum to the layout and placement
    code. Only KernelImageError may come out."""
    r = _Reader(data)
    if r.take(1) & 1:
        flags = r.take(4)
        addresses = r.rest()[:20].ljust(20, b"\0")
        r.pos += 20
        image = (mb.HEADER_MAGIC.to_bytes(4, "little") + flags.to_bytes(4, "little")
                 + ((-(mb.HEADER_MAGIC + flags)) & 0xFFFF_FFFF).to_bytes(4, "little") + addresses + r.rest())
    else:
        image = r.rest()
    try:
        mb.load_multiboot(_mem, image, "fuzz cmdline", [mb.Module(b"module", "m a"), mb.Module(b"", "empty")], "fuzz")
    except KernelImageError:
        pass


TARGETS = {name[len("fuzz_"):]: fn for name, fn in list(globals().items()) if name.startswith("fuzz_")}
