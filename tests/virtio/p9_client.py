"""A 9P2000.L client in miniature, driving kvmm's virtio-9p device through the mock
driver-side queue (as Linux's net/9p/trans_virtio.c does): each request is one chain,
the request in device-readable buffers, room for the reply in device-writable ones;
the used length is the reply. Reads and writes can be laid out as Linux's zero-copy
path lays them out (header buffer, then the data's own buffer)."""

from __future__ import annotations

import errno
import os
import struct
from typing import Any

from kvmm.memory import GuestMemory
from kvmm.p9 import wire as W
from kvmm.p9.server import FileServer, Limits
from kvmm.virtio.p9 import Virtio9p

from .harness import LegacyDriver

REQ_AREA = 0x200000  # request buffers
REPLY_AREA = 0x400000  # reply buffers (up to 2 MiB)


class P9Error(Exception):
    def __init__(self, err: int) -> None:
        self.errno = err
        super().__init__(f"Rlerror {errno.errorcode.get(err, err)}")


class P9Client:
    def __init__(self, root: str | os.PathLike[str], read_only: bool = True, msize: int = 65536,
                 limits: Limits = Limits(), mem: GuestMemory | None = None, version: bool = True) -> None:
        self.mem = mem or GuestMemory.allocate(16 << 20, check_available=False)
        self.server = FileServer(str(root), read_only, "test", limits)
        self.device = Virtio9p(self.server, self.mem, "kvmmtest", "9p0")
        self.driver = LegacyDriver(self.device, self.mem)
        self.driver.init()
        self.q = self.driver.queues[0]
        self.tag = 0
        self.msize = msize
        if version:
            got, ver = self.version(msize)
            assert ver == W.VERSION
            self.msize = got

    def close(self) -> None:
        self.device.close()

    # --- the transport ----------------------------------------------------------------------
    def raw(self, message: bytes, data: bytes = b"", reply_room: int | None = None,
            reply_split: int | None = None) -> bytes:
        """Send ``message`` (+ ``data`` in a buffer of its own); the reply's bytes (the
        used length of them; b"" if the device dropped the request)."""
        room = self.msize if reply_room is None else reply_room
        self.mem.write(REQ_AREA, message)
        buffers: list[tuple[int, int, bool]] = [(REQ_AREA, len(message), False)]
        if data:
            at = REQ_AREA + ((len(message) + 4095) & ~4095)
            self.mem.write(at, data)
            buffers.append((at, len(data), False))
        if reply_split is not None and 0 < reply_split < room:
            buffers += [(REPLY_AREA, reply_split, True), (REPLY_AREA + 0x1000, room - reply_split, True)]
        elif room:
            buffers.append((REPLY_AREA, room, True))
        self.mem.fill(REPLY_AREA, min(room + 0x1000, 0x200000), 0xEE)
        head = self.q.build_chain(buffers)
        self.q.publish(head)
        self.driver.kick()
        used = self.q.take_used()
        assert [h for h, _ in used] == [head], used
        length = used[0][1]
        if reply_split is not None and 0 < reply_split < room:
            first = min(length, reply_split)
            return self.mem.read(REPLY_AREA, first) + self.mem.read(REPLY_AREA + 0x1000, length - first)
        return self.mem.read(REPLY_AREA, length)

    def rpc(self, mtype: int, fmt: str, *values: Any, data: bytes = b"", reply_room: int | None = None,
            reply_split: int | None = None) -> bytes:
        """A request; the reply's body (after the header), or P9Error for an Rlerror."""
        self.tag = (self.tag + 1) % 0xFFFF
        tag = W.NOTAG if mtype == W.TVERSION else self.tag
        message = W.encode(mtype, tag, fmt, *values)
        if data:  # Linux's Twrite: the header's size counts the data in its own buffer
            message = struct.pack("<I", len(message) + len(data)) + message[4:]
        reply = self.raw(message, data, reply_room, reply_split)
        assert len(reply) >= W.HEADER_SIZE, f"no reply to {W.NAMES.get(mtype, mtype)} (dropped)"
        size, rtype, rtag = W.HEADER.unpack_from(reply)
        assert size == len(reply), f"reply size field {size}, used length {len(reply)}"
        assert rtag == tag
        assert size < self.msize or mtype == W.TVERSION, "a reply of msize or more (Linux refuses it)"
        if rtype == W.RLERROR:
            raise P9Error(struct.unpack_from("<I", reply, 7)[0])
        assert rtype == mtype + 1, f"reply type {rtype} to {mtype}"
        return reply[W.HEADER_SIZE :]

    # --- messages -----------------------------------------------------------------------------
    def version(self, msize: int, version: bytes = W.VERSION) -> tuple[int, bytes]:
        (got, ver), _ = W.decode(self.rpc(W.TVERSION, "ds", msize, version), "ds")
        return got, ver

    def attach(self, fid: int = 0, aname: bytes = b"") -> W.Qid:
        return qid_of(self.rpc(W.TATTACH, "ddssd", fid, W.NOFID, b"root", aname, 0))

    def walk(self, fid: int, newfid: int, *names: bytes) -> list[W.Qid]:
        body = self.rpc(W.TWALK, "ddw" + "s" * len(names), fid, newfid, len(names), *names)
        n = struct.unpack_from("<H", body)[0]
        return [qid_of(body[2 + 13 * i :]) for i in range(n)]

    def lopen(self, fid: int, flags: int = 0) -> W.Qid:
        return qid_of(self.rpc(W.TLOPEN, "dd", fid, flags))

    def lcreate(self, fid: int, name: bytes, flags: int = 0o2, mode: int = 0o644, gid: int = 0) -> W.Qid:
        return qid_of(self.rpc(W.TLCREATE, "dsddd", fid, name, flags | W.DOTL_CREATE, mode, gid))

    def read(self, fid: int, offset: int, count: int, zero_copy: bool = True) -> bytes:
        body = self.rpc(W.TREAD, "dqd", fid, offset, count, reply_split=11 if zero_copy else None)
        n = struct.unpack_from("<I", body)[0]
        assert len(body) == 4 + n
        return body[4:]

    def write(self, fid: int, offset: int, data: bytes) -> int:
        body = self.rpc(W.TWRITE, "dqd", fid, offset, len(data), data=data)
        return int(struct.unpack_from("<I", body)[0])

    def readdir(self, fid: int, offset: int = 0, count: int = 8192) -> list[tuple[W.Qid, int, int, bytes]]:
        body = self.rpc(W.TREADDIR, "dqd", fid, offset, count)
        n = struct.unpack_from("<I", body)[0]
        data, pos, out = body[4 : 4 + n], 0, []
        while pos < len(data):
            qid = qid_of(data[pos:])
            off, dtype, namelen = struct.unpack_from("<QBH", data, pos + 13)
            name = data[pos + 24 : pos + 24 + namelen]
            out.append((qid, off, dtype, name))
            pos += 24 + namelen
        return out

    def listdir(self, fid: int) -> list[bytes]:
        names, offset = [], 0
        while True:
            entries = self.readdir(fid, offset)
            if not entries:
                return names
            names += [e[3] for e in entries]
            offset = entries[-1][1]

    def getattr(self, fid: int) -> dict[str, Any]:
        body = self.rpc(W.TGETATTR, "dq", fid, W.STATS_BASIC)
        (valid, mode, uid, gid, nlink, _rdev, size, _blksize, _blocks, *times), _ = W.decode(
            body[:8] + body[21:], "qddd" + "q" * 5 + "q" * 10)
        return {"valid": valid, "qid": qid_of(body[8:]), "mode": mode, "uid": uid, "gid": gid, "nlink": nlink,
                "size": size, "mtime": times[2]}

    def clunk(self, fid: int) -> None:
        self.rpc(W.TCLUNK, "d", fid)

    def readlink(self, fid: int) -> bytes:
        return W.decode(self.rpc(W.TREADLINK, "d", fid), "s")[0][0]  # type: ignore[no-any-return]

    def open_path(self, fid: int, *names: bytes, flags: int = 0, root: int = 0) -> W.Qid:
        self.walk(root, fid, *names)
        return self.lopen(fid, flags)

    def cat(self, *names: bytes) -> bytes:
        self.open_path(99, *names)
        try:
            out, offset = b"", 0
            while True:
                chunk = self.read(99, offset, 8192)
                if not chunk:
                    return out
                out += chunk
                offset += len(chunk)
        finally:
            self.clunk(99)


def qid_of(body: bytes) -> W.Qid:
    return W.Qid(*struct.unpack_from("<BIQ", body))
