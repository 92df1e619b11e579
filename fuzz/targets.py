"""Fuzz targets for everything a guest controls. Each takes raw bytes and drives one
component the way a hostile guest could; any exception escaping is a bug (the guest must
never raise into kvmm's vCPU or I/O threads). Run them with ``scripts/fuzz`` (atheris,
coverage-guided) or replay a corpus with the tests (tests/test_fuzz_targets.py)."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from kernel_images import wrap_payload  # noqa: E402
from kvmm import api as A  # noqa: E402
from kvmm.devices.acpi_pm import AcpiPm  # noqa: E402
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
from kvmm import snapshot as S  # noqa: E402
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
from kvmm.virtio.queue import (  # noqa: E402
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Descriptor,
    legacy_layout,
)

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


QUEUE_SPACING = 8  # pages between rings: the largest ring here (256 entries) takes 3
DATA_AREA = 0x100000  # 1 MiB of buffers, handed out in turn and wrapping
CONTENTS_MAX = 64  # bytes of a readable buffer's contents an input may give

#: used-ring elements (completed requests) per target since the process started: what
#: shows that a run's inputs drove requests through each device (scripts/fuzz reports it).
REQUESTS: dict[str, int] = {}


class _Driver:
    """The driver side of each queue, as a guest driver keeps it: the next descriptor
    slot and available index. The fuzz input decides everything the driver writes; this
    only saves a short input the bytes of the bookkeeping a real driver does anyway."""

    def __init__(self, t: L.VirtioPciLegacy) -> None:
        self.t = t
        self.sizes = [q.max_size for q in t.queues]
        self.next_desc = [0] * len(self.sizes)
        self.avail_idx = [0] * len(self.sizes)
        self.data_next = DATA_AREA

    def rings(self, q: int) -> tuple[int, int, int]:
        desc, avail, used, _ = legacy_layout((RING_PFN + QUEUE_SPACING * q) << 12, self.sizes[q])
        return desc, avail, used

    def alloc(self, n: int) -> int:
        if self.data_next + n > MEM_SIZE:
            self.data_next = DATA_AREA
        addr = self.data_next
        self.data_next = min((addr + n + 15) & ~15, MEM_SIZE)
        return addr

    def chain(self, r: _Reader) -> None:
        """Descriptor chain op: ``queue[1] count[1]``, then per descriptor ``len[2]
        flags[1]`` and, for a readable one, ``n[1]`` and n bytes of its contents (at most
        :data:`CONTENTS_MAX`). Flags: bit 0 device-writable; bit 1 (first descriptor) the
        chain in an indirect table; bit 2 a raw ``next[1]`` (chains may loop or cross);
        bit 3 a raw guest address ``gpa[3]`` (overlaps, ring memory, out of RAM). Written,
        published in the available ring and kicked, as a driver does."""
        q = r.take(1) % len(self.sizes)
        size = self.sizes[q]
        count = 1 + r.take(1) % 8
        desc, avail, _ = self.rings(q)
        descs = []
        indirect = False
        for i in range(count):
            length, flags = r.take(2), r.take(1)
            indirect = indirect or (i == 0 and bool(flags & 2))
            nxt = r.take(1) if flags & 4 else None
            addr = r.take(3) if flags & 8 else self.alloc(length)
            if not flags & 1:
                n = min(r.take(1), CONTENTS_MAX, length)
                contents = r.rest()[:n]
                r.pos += n
                if _mem.contains(addr, len(contents)):
                    _mem.write(addr, contents)
            descs.append((addr, length, bool(flags & 1), nxt))
        if indirect:  # the chain in a table of its own, one ring descriptor pointing at it
            table, slots = self.alloc(16 * count), list(range(count))
        else:
            table, base = desc, self.next_desc[q]
            slots = [(base + i) % size for i in range(count)]
            self.next_desc[q] = (base + count) % size
        for i, (addr, length, writable, nxt) in enumerate(descs):
            last = i == count - 1
            flag = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last and nxt is None else VIRTQ_DESC_F_NEXT)
            link = nxt if nxt is not None else (slots[i + 1] if not last else 0)
            _mem.write(table + 16 * slots[i], struct.pack("<QIHH", addr, length, flag, link))
        if indirect:
            head = self.next_desc[q]
            _mem.write(desc + 16 * head, struct.pack("<QIHH", table, 16 * count, VIRTQ_DESC_F_INDIRECT, 0))
            self.next_desc[q] = (head + 1) % size
        else:
            head = slots[0]
        idx = self.avail_idx[q]
        _mem.write_u16(avail + 4 + 2 * (idx % size), head)
        self.avail_idx[q] = (idx + 1) & 0xFFFF
        _mem.write_u16(avail + 2, self.avail_idx[q])
        self.t.pio_write(L.QUEUE_NOTIFY, 2, q)

    def ring_word(self, r: _Reader) -> None:
        """Ring state op: ``queue[1] which[1] value[2]``: the available ring's flags or
        index, or the used_event word, written directly (impossible ring states)."""
        q = r.take(1) % len(self.sizes)
        _, avail, _ = self.rings(q)
        which, value = r.take(1) % 3, r.take(2)
        _mem.write_u16((avail, avail + 2, avail + 4 + 2 * self.sizes[q])[which], value)
        if which == 1:
            self.avail_idx[q] = value


def _start(t: L.VirtioPciLegacy, features: int) -> None:
    """A plausible start, as Linux's legacy probe does it (most inputs then reach the
    queue code): reset, ACKNOWLEDGE|DRIVER, features, every queue's ring, DRIVER_OK."""
    t.pio_write(L.STATUS, 1, 0)
    t.pio_write(L.STATUS, 1, 3)
    t.pio_write(L.GUEST_FEATURES, 4, features)
    for q in range(len(t.queues)):
        t.pio_write(L.QUEUE_SEL, 2, q)
        t.pio_write(L.QUEUE_PFN, 4, RING_PFN + QUEUE_SPACING * q)
    t.pio_write(L.STATUS, 1, 7)


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(1 << 17)
        except BlockingIOError:
            return


def _virtio(kind: str, data: bytes, dev: object | None = None) -> int:
    """A legacy virtio-PCI driver whose every move comes from the fuzz input; returns the
    number of operations run.

    Layout, operations first so that a short input reaches them: ``flags[1]`` (bit 0:
    the transport has MSI-X), ``features[4]`` (the driver's, written during the start
    sequence), then operations to the end, each ``op[1]`` (low 3 bits) and its arguments:
    0 register write ``off[1] size[1] value[4]``; 1 register read ``off[1] size[1]``;
    2 guest memory write ``gpa[3] n[1] bytes[n]``; 3 kick ``queue[1]``; 4 descriptor
    chain (:meth:`_Driver.chain`); 5 host input ``n[1] bytes[n]`` (net: a frame from the
    tap, console: typed input); 6 ring word (:meth:`_Driver.ring_word`); 7 reset and the
    start sequence again. Bytes that run out read as zeros. Guest memory (rings and
    buffers) is zeroed first, so an input replays the same way after any other."""
    r = _Reader(data)
    dev = _devices()[kind] if dev is None else dev
    name = "virtio_" + kind
    _mem.fill(RING_PFN << 12, MEM_SIZE - (RING_PFN << 12))
    if kind == "net":
        _drain(_tap.host)
        _drain(_tap._peer)
    t = L.VirtioPciLegacy(dev, _mem, LineInterrupt(lambda level: None), MsiCallbacks() if r.take(1) & 1 else None)  # type: ignore[arg-type]
    for queue in t.queues:
        push = queue.push_used

        def counted(head: int, length: int, push: object = push) -> None:
            REQUESTS[name] = REQUESTS.get(name, 0) + 1
            push(head, length)  # type: ignore[operator]

        queue.push_used = counted  # type: ignore[method-assign]
    features = r.take(4)
    _start(t, features)
    driver = _Driver(t)
    ops = 0
    while r.left > 0:
        op = r.take(1) & 7
        ops += 1
        if op == 0:
            t.pio_write(r.take(1) % 40, (1, 2, 4)[r.take(1) % 3], r.take(4))
        elif op == 1:
            t.pio_read(r.take(1) % 40, (1, 2, 4)[r.take(1) % 3])
        elif op == 2:
            gpa = r.take(3) % MEM_SIZE
            blob = r.rest()[: r.take(1)]
            r.pos += len(blob)
            if _mem.contains(gpa, len(blob)):
                _mem.write(gpa, blob)
        elif op == 3:
            t.pio_write(L.QUEUE_NOTIFY, 2, r.take(1) % 4)
        elif op == 4:
            driver.chain(r)
        elif op == 5:
            blob = r.rest()[: r.take(1)]
            r.pos += len(blob)
            if kind == "net":
                try:
                    _tap.host.send(blob)
                except BlockingIOError:
                    pass
                dev._receive()  # type: ignore[attr-defined]
            elif kind == "console":
                dev.receive(blob)  # type: ignore[attr-defined]
        elif op == 6:
            driver.ring_word(r)
        else:
            _start(t, features)
            driver = _Driver(t)
    t.pio_write(L.STATUS, 1, 0)
    return ops


def fuzz_virtio_blk(data: bytes) -> int:
    return _virtio("blk", data)


def fuzz_virtio_net(data: bytes) -> int:
    try:
        return _virtio("net", data)
    finally:
        # The device hands tap (un)registration to the I/O loop; run it so nothing piles up.
        _loop.run_once(0)
        _loop.remove_reader(_tap.fd)


def fuzz_virtio_console(data: bytes) -> int:
    return _virtio("console", data)


def fuzz_virtio_rng(data: bytes) -> int:
    return _virtio("rng", data)


def fuzz_virtio_9p(data: bytes) -> int:
    """virtio-9p's queue: rings, descriptors and messages all from the fuzz input, on a
    read-write share (the first byte's low bit: read-only), then :func:`_virtio`'s layout."""
    server = FileServer(_share_tree(), read_only=bool(data[:1]) and bool(data[0] & 1), name="fuzz")
    dev = P9.Virtio9p(server, _mem, "fuzz")
    try:
        return _virtio("9p", data[1:], dev)
    finally:
        dev.close()


_MSG_AREA, _REPLY_AREA = 0x100000, 0x140000


def fuzz_p9_messages(data: bytes) -> int:
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
        messages: list[object] = list(preamble)
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
    return len(messages) - len(preamble)  # the input's own messages


def fuzz_pci_config(data: bytes) -> int:
    """Config mechanism #1: any sequence of address/data accesses of any width (returns
    how many)."""
    r = _Reader(data)
    ops = 0
    pio = PioBus()
    bus = PciBus(pio)
    dev = PciDevice(0x1AF4, 0x1001, 0x010000)
    dev.add_io_bar(0, 0x40, Cmos())
    bus.add(dev)
    while r.left > 0:
        ops += 1
        port = 0xCF8 + r.take(1) % 8
        size = (1, 2, 4)[r.take(1) % 3]
        if r.take(1) & 1:
            pio.write(port, size, r.take(4) & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= pio.read(port, size) < 1 << (8 * size)
    return ops


def fuzz_legacy_devices(data: bytes) -> int:
    """UART, i8042, CMOS and ACPI PM registers: any access sequence, plus host input
    (returns the number of accesses). The ACPI PM block takes accesses of 1, 2 or 4 bytes
    (bits 2-1 of the operation byte) at any of its offsets, as a guest's in/out of any
    width can reach it."""
    r = _Reader(data)
    ops = 0
    serial = Serial8250(lambda out: None, lambda level: None)
    devices = [serial, I8042(lambda: None), Cmos(), AcpiPm(lambda: None, lambda: None)]
    while r.left > 0:
        ops += 1
        dev = devices[r.take(1) % 4]
        off = r.take(1) % 8
        op = r.take(1)
        size = (1, 2, 4)[(op >> 1) % 3] if isinstance(dev, AcpiPm) else 1
        if op & 1:
            dev.pio_write(off, size, r.take(size))  # type: ignore[attr-defined]
        else:
            assert 0 <= dev.pio_read(off, size) < 1 << (8 * size)  # type: ignore[attr-defined]
        if r.take(1) == 0xFF:
            serial.receive(r.rest()[:32])
    return ops


def _snapshot_devices() -> tuple[Serial8250, Cmos, PciBus, list[L.VirtioPciLegacy], AcpiPm]:
    """The devices a snapshot's state is loaded into: a UART, CMOS, virtio-blk and
    virtio-console with MSI-X on the PCI bus, and the ACPI PM registers (the layout of
    the seed corpus)."""
    pci = PciBus(PioBus(), MmioBus())
    transports = [L.VirtioPciLegacy(dev, _mem, LineInterrupt(lambda level: None), MsiCallbacks())  # type: ignore[arg-type]
                  for dev in (B.VirtioBlk(_disk, _mem), C.VirtioConsole(_mem, lambda data: None))]
    for t in transports:
        pci.add(t)
    return Serial8250(lambda out: None, lambda level: None), Cmos(), pci, transports, AcpiPm(lambda: None, lambda: None)


def fuzz_snapshot_state(data: bytes) -> int:
    """A snapshot's state.json (untrusted: a snapshot may come from anywhere), decoded and
    loaded into fresh devices. Only SnapshotError may come out. Returns 1 when the input
    was JSON and reached the decoder, else 0."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return 0
    try:
        st = from_json(MachineState, raw, "state")
        load_devices(st, *_snapshot_devices())
    except SnapshotError:
        pass
    return 1


# A snapshot directory whose manifest is the fuzz input: the state file is the
# snapshot_state seed, memory.bin 1 MiB of holes; manifests are authenticated with a
# fixed key (read_snapshot's ``key``), so the user's own key is never touched.
_SNAP = Path(_tmp) / "snap"
_SNAP.mkdir()
_SNAP_KEY = bytes(range(32))
(_SNAP / S.STATE).write_bytes((ROOT / "fuzz" / "corpus" / "snapshot_state" / "seed.json").read_bytes())
with open(_SNAP / S.MEMORY, "wb") as f:
    f.truncate(1 << 20)


def fuzz_snapshot_manifest(data: bytes) -> int:
    """A snapshot's manifest.json as bytes, read by read_snapshot as ``kvmm --restore``
    does (file checks, JSON, format, authentication, fields, configuration, disks, the
    state file against it; --verify-memory when byte 0 has bit 1). Byte 0 bit 0 set:
    the rest is taken as JSON and, when it is an object, signed with the fuzz key first,
    so inputs get past the authentication into the checks that follow it (a manifest
    this user's kvmm wrote is no less untrusted there). Only SnapshotError may come out.
    Returns 1 when the manifest was a JSON object (it reached the checks), else 0."""
    r = _Reader(data)
    mode = r.take(1)
    raw = r.rest()
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        manifest = None
    if mode & 1 and isinstance(manifest, dict):
        raw = json.dumps({**manifest, "hmac": S.manifest_hmac(manifest, _SNAP_KEY)}).encode()
    (_SNAP / S.MANIFEST).write_bytes(raw)
    try:
        S.read_snapshot(_SNAP, verify_memory=bool(mode & 2), key=_SNAP_KEY)
    except SnapshotError:
        pass
    return int(isinstance(manifest, dict))


_kernel_mem = GuestMemory.allocate(4 << 20, check_available=False)


def fuzz_bzimage_payload(data: bytes) -> int:
    """A bzImage (the project kernel's setup header) whose payload is the fuzz input after
    4 knob bytes: the boot protocol version (2.06 + byte 0 % 10), bytes cut from the end
    of payload_length (byte 1), the kernel's own decompressor asked for (byte 2, bit 0).
    Loaded into 4 MiB of guest RAM, which also bounds the decompressed size. Only
    KernelImageError may come out (the CLI's one line, exit status 10). Returns 1: one load."""
    r = _Reader(data)
    version, cut, flags = 0x0206 + r.take(1) % 10, r.take(1), r.take(2)
    payload = r.rest()
    image = wrap_payload(payload, version=version, payload_length=max(len(payload) - cut, 0))
    try:
        load_linux(_kernel_mem, image, "console=ttyS0", name="fuzz", bzimage_decompressor=bool(flags & 1))
    except KernelImageError:
        pass
    return 1


def fuzz_multiboot(data: bytes) -> int:
    """A kernel image for the multiboot loader (kvmm/loader/multiboot.py) into 2 MiB of
    RAM, with two small modules. The first byte picks how the header is made: 0 = the
    input as is; else a header with a valid checksum over the next 4 bytes of flags and
    20 of addresses, so most inputs get past the checksum to the layout and placement
    code. Only KernelImageError may come out. Returns 1: one load."""
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
    return 1


class _ApiMachine:
    """What the control socket uses of a Machine, with no VM behind it: commands change
    a little state, snapshot refuses as a real machine does for a bad path."""

    def __init__(self) -> None:
        self.loop = _loop
        self.stopped = self.paused = False

    def status(self) -> dict[str, object]:
        return {"state": "stopped" if self.stopped else "paused" if self.paused else "running", "uptime": 0.0}

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def snapshot(self, path: str) -> dict[str, object]:
        raise SnapshotError(f"{path!r:.40} refused by the fuzz machine")

    def stop(self, result: object) -> None:
        self.stopped = True

    def exit_report(self) -> dict[str, int]:
        return {"IoExit": 1}


_api_machine = _ApiMachine()
_api = A.ApiServer(_api_machine, os.path.join(_tmp, "api.sock"))  # type: ignore[arg-type]


def fuzz_control_socket(data: bytes) -> int:
    """A control-socket client's bytes through the server's request path (line
    splitting, the size bound, JSON parsing, dispatch, the outbox) into a fake machine.
    The first byte: the size of each read the server sees (1-127 bytes, 0: all at once),
    and with bit 7 64 KiB of blanks in the middle of the input (a request at or past the
    size bound, read in 1-127 KiB pieces). Every answer must be one JSON object
    with "ok", the outbox bounded, nothing raised. Returns the answers: the requests served."""
    r = _Reader(data)
    mode = r.take(1)
    payload = r.rest()
    long = bool(mode & 0x80)
    if long:
        half = len(payload) // 2
        payload = payload[:half] + b" " * A.MAX_REQUEST + payload[half:]
    _api_machine.stopped = _api_machine.paused = False
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    client = A._Client(ours)
    _api.clients[client.fd] = client
    step = ((mode & 0x7F) << (10 if long else 0)) or len(payload) or 1
    try:
        for at in range(0, len(payload), step):
            _api.take_input(client, payload[at : at + step])
            assert len(client.outbox) <= A.OUTBOX_LIMIT, len(client.outbox)
            if client.closed:
                break
        answers = b""
        while True:
            try:
                chunk = theirs.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            answers += chunk
        lines = answers.split(b"\n")[:-1]
        for line in lines:
            answer = json.loads(line)
            assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool), answer
        return len(lines)
    finally:
        _api._drop(client)
        theirs.close()


class _EmuVcpu:
    """A vCPU for the emulator (kvmm/emulate.py) whose state comes from the fuzz input."""

    def __init__(self, regs: object, sregs: object, xsave: bytes) -> None:
        self.id, self.regs, self.sregs, self.xsave = 0, regs, sregs, xsave
        from kvmm.kvm.structs import ffi

        self.events = ffi.new("struct kvm_vcpu_events *")
        self.xcrs = bytes(ffi.buffer(ffi.new("struct kvm_xcrs *")))

    def get_regs(self) -> object:
        return self.regs

    def get_sregs(self) -> object:
        return self.sregs

    def get_state(self, kind: str) -> bytes:
        return self.xsave if kind == "xsave" else self.xcrs

    def get_vcpu_events(self) -> object:
        return self.events

    def set_regs(self, regs: object) -> None:
        pass

    set_sregs = set_vcpu_events = set_regs

    def set_state(self, kind: str, data: bytes) -> None:
        pass


_emu_mem = GuestMemory.allocate(2 << 20, check_available=False)


def fuzz_emulate(data: bytes) -> int:
    """An instruction KVM gave up on, as a hostile guest sets it up: the instruction bytes,
    every register, CR0/CR3/CR4/EFER, the code segment's mode, FS/GS bases, FSW/MXCSR,
    and the first 64 KiB of guest RAM (page tables included: CR3 points into it). The
    emulator must emulate it, inject a fault, or decline with an explanation: no
    exception may come out of recover() or explain()."""
    from kvmm import emulate as E
    from kvmm.kvm import exits as X
    from kvmm.kvm import ioctls as K
    from kvmm.kvm.structs import ffi

    r = _Reader(data)
    insn = r.rest()[:15]
    r.pos += 15
    regs = ffi.new("struct kvm_regs *")
    for name in (*E.GPRS, "rip", "rflags"):
        setattr(regs, name, r.take(8))
    sregs = ffi.new("struct kvm_sregs *")
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = r.take(4), r.take(2) << 4, r.take(4), r.take(2)
    mode = r.take(1)
    sregs.cs.l, sregs.cs.db, sregs.ss.dpl = mode & 1, mode >> 1 & 1, 3 if mode & 4 else 0
    sregs.fs.base, sregs.gs.base = r.take(8), r.take(8)
    for seg in (sregs.ds, sregs.ss, sregs.es):
        seg.present, seg.limit, seg.type, seg.base = 1, r.take(4), r.take(1) & 0xF, r.take(4)
    xsave = bytearray(4096)
    xsave[2:4] = r.take(2).to_bytes(2, "little")
    xsave[24:28] = r.take(4).to_bytes(4, "little")
    ram = r.rest()[: 64 << 10]
    _emu_mem.fill(0, 64 << 10)
    _emu_mem.write(0, ram)
    vcpu = _EmuVcpu(regs, sregs, bytes(xsave))
    emu = E.Emulator(_emu_mem, enabled=True, cpus=1 + (mode >> 3 & 1))
    ex = X.InternalErrorExit(K.KVM_INTERNAL_ERROR_EMULATION, (), insn)
    if not emu.recover(vcpu, ex):
        assert isinstance(emu.explain(vcpu, ex), str)
    return 1  # one instruction emulated, faulted or explained


TARGETS = {name[len("fuzz_"):]: fn for name, fn in list(globals().items()) if name.startswith("fuzz_")}
