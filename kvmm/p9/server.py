"""The 9P2000.L file server of one share: a host directory, read-only or read-write.

:meth:`FileServer.serve` takes one request from a descriptor chain's readable buffers
(a :class:`~kvmm.virtio.chain_io.Reader`) and puts the reply in its writable ones (a
:class:`~kvmm.virtio.chain_io.Writer`): it checks the header against the negotiated
``msize``, parses the body (:func:`kvmm.p9.wire.parse`, no host access), then executes
the request. Reads and writes move file data straight between the file and guest memory
(``preadv``/``pwritev`` on the chain's views: Linux's virtio transport puts the data of
a large read or write in buffers of their own, after the 11- or 23-byte header).

A fid is the client's handle on a file: here an ``O_PATH`` descriptor of the object,
reached one validated name at a time from the share's root without following a symlink
(:mod:`kvmm.p9.hostfs`), the names from the root (for ``..`` and for the few calls that
need the parent directory), and, once opened, a real descriptor. Every failure is an
``Rlerror`` with the host's errno; a message too broken to carry a tag, or a chain with
no room for a reply, is dropped (completed with no data).

Bounds (docs/security.md): ``msize`` between 4 KiB and :attr:`Limits.max_msize`; at most
:attr:`Limits.max_fids` fids; a walk of at most 16 names; names of at most 255 bytes and
paths of at most 4096; a read or directory listing of at most ``msize - 24`` bytes per
request (nothing is listed ahead, directories are read with ``getdents64`` from the
client's offset). Requests are served to completion in order, so none is ever pending
in kvmm (a lock that would block answers ``BLOCKED``; Linux retries).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import time
from typing import Any, Callable, NamedTuple

from ..ratelimit import RateLimitedLog
from . import hostfs
from . import wire as W

LOG = logging.getLogger(__name__)
_LOG = RateLimitedLog(LOG)  # guest-triggered lines outside a server instance

MIN_MSIZE = 4096  # Linux refuses less (net/9p/client.c)
V9FS_MAGIC = 0x01021997  # what Rstatfs reports as the file system type
_DEV_SHIFT = 48  # qid.path: the device's index above the inode number (see _qid_path)
_FLOCK = struct.Struct("<hhxxxxqqixxxx")  # struct flock on x86-64
_OFF_MAX = (1 << 63) - 1

# Requests that change the share: a read-only share answers them with EROFS before it
# looks at anything else (a write-mode Tlopen too, in _lopen; Tremove in _remove, which
# clunks its fid even then).
MODIFYING = frozenset({W.TLCREATE, W.TSYMLINK, W.TMKNOD, W.TRENAME, W.TRENAMEAT, W.TUNLINKAT, W.TMKDIR,
                       W.TLINK, W.TSETATTR, W.TXATTRCREATE, W.TWRITE})


class Limits(NamedTuple):
    """What one share's client may hold or ask for at once."""

    max_fids: int = 4096
    max_msize: int = 1 << 20


class P9Error(Exception):
    """A request that fails with ``errno`` (answered with Rlerror)."""

    def __init__(self, err: int, reason: str = "") -> None:
        self.errno = err
        super().__init__(reason or os.strerror(err))


class Fid:
    """One fid: the object (``fd``, an O_PATH descriptor), its names from the share's
    root, and what the client did with it."""

    __slots__ = ("path", "fd", "qid", "mode", "dev", "ino", "opaque", "open_fd", "open_flags", "opened", "xattr")

    def __init__(self, path: tuple[bytes, ...], fd: int, st: os.stat_result | None, qid: W.Qid,
                 opaque: bool = False) -> None:
        self.path = path
        self.fd = fd  # -1 for an xattr fid
        self.qid = qid
        self.mode = st.st_mode if st is not None else 0
        self.dev = st.st_dev if st is not None else 0
        self.ino = st.st_ino if st is not None else 0
        self.opaque = opaque  # a host pseudo file system's mount point: shown empty
        self.open_fd = -1
        self.open_flags = 0
        self.opened = False
        self.xattr: bytes | None = None  # the contents of an xattr fid (Txattrwalk)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def close(self) -> None:
        for fd in (self.open_fd, self.fd):
            if fd >= 0:
                os.close(fd)
        self.open_fd = self.fd = -1


class FileServer:
    """The 9P2000.L server of one share (``root``, a host directory)."""

    def __init__(self, root: str, read_only: bool = True, name: str = "9p", limits: Limits = Limits()) -> None:
        self.root = root
        self.read_only = read_only
        self.name = name
        self.limits = limits
        self.log = RateLimitedLog(LOG)
        self.trace = RateLimitedLog(LOG, burst=200)  # a debug line per request: generous, still bounded
        self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            pseudo = hostfs.is_pseudo_fs(self.root_fd)
            if pseudo is not None:
                raise P9Error(errno.EACCES, f"{root} is on the host's {pseudo} file system, which a share never shows")
            root_st = os.fstat(self.root_fd)
        except BaseException:
            os.close(self.root_fd)
            raise
        self.root_dev = root_st.st_dev
        self._devs: dict[int, int] = {root_st.st_dev: 0}  # st_dev -> its index in qid paths
        self._pseudo: dict[int, bool] = {root_st.st_dev: False}
        self.msize = 0  # 0 until Tversion: only Tversion is served
        self.fids: dict[int, Fid] = {}
        self.stats = {"requests": 0, "errors": 0, "dropped": 0, "walks": 0, "opens": 0, "reads": 0, "read_bytes": 0,
                      "writes": 0, "written_bytes": 0, "readdirs": 0}
        self._ops: dict[int, Callable[[Any], bytes]] = {
            W.TVERSION: self._version, W.TAUTH: self._auth, W.TATTACH: self._attach, W.TFLUSH: self._flush,
            W.TWALK: self._walk, W.TCLUNK: self._clunk, W.TREMOVE: self._remove, W.TSTATFS: self._statfs,
            W.TLOPEN: self._lopen, W.TLCREATE: self._lcreate, W.TSYMLINK: self._symlink, W.TMKNOD: self._mknod,
            W.TRENAME: self._rename, W.TREADLINK: self._readlink, W.TGETATTR: self._getattr,
            W.TSETATTR: self._setattr, W.TXATTRWALK: self._xattrwalk, W.TXATTRCREATE: self._xattrcreate,
            W.TFSYNC: self._fsync, W.TLOCK: self._lock, W.TGETLOCK: self._getlock, W.TLINK: self._link,
            W.TMKDIR: self._mkdir, W.TRENAMEAT: self._renameat, W.TUNLINKAT: self._unlinkat,
        }

    # --- the request path -------------------------------------------------------------------
    def serve(self, reader: Any, writer: Any) -> int:
        """Serve the request in ``reader`` (a chain's readable buffers), reply into
        ``writer``; returns the bytes written to the guest (0: dropped)."""
        self.stats["requests"] += 1
        if writer.available < W.RLERROR_SIZE:
            return self._drop("no room for a reply (%d bytes writable)", writer.available)
        header = reader.read_exact(W.HEADER_SIZE)
        if header is None:
            return self._drop("a request shorter than the 7-byte header")
        size, mtype, tag = W.HEADER.unpack(header)
        limit = self.msize or self.limits.max_msize
        body_len = size - W.HEADER_SIZE
        try:
            if size < W.HEADER_SIZE or size > limit:
                raise W.MessageError(f"message size {size} outside [{W.HEADER_SIZE}, msize {limit}]")
            if body_len > reader.available:
                raise W.MessageError(f"message of {size} bytes in buffers holding {reader.available + W.HEADER_SIZE}")
            if not self.msize and mtype != W.TVERSION:
                raise P9Error(errno.EPROTO, "a request before Tversion")
            if mtype == W.TWRITE:
                return self._write(tag, body_len, reader, writer)
            body = reader.read(body_len)
            req = W.parse(mtype, tag, body)
            self.trace.debug("%s: %s", self.name, req)
            if mtype in (W.TREAD, W.TREADDIR):
                return self._read(req, writer) if mtype == W.TREAD else self._readdir(req, writer)
            if self.read_only and mtype in MODIFYING:
                raise P9Error(errno.EROFS)
            reply = self._ops[mtype](req)
        except (W.MessageError, P9Error) as exc:
            if isinstance(exc, W.MessageError):
                self.log.warning("%s: malformed request (type %d, tag %d): %s", self.name, mtype, tag, exc)
            reply = self._error(tag, exc.errno)
        except OSError as exc:
            reply = self._error(tag, exc.errno or errno.EIO)
        except OverflowError:  # a value the host call cannot take (an offset past 2^63)
            reply = self._error(tag, errno.EINVAL)
        if self.msize and len(reply) >= self.msize:  # Linux refuses a reply of msize or more
            reply = self._error(tag, errno.ENOBUFS)
        if not writer.write_all(reply):
            reply = self._error(tag, errno.ENOBUFS)
            writer.write_all(reply)
        return int(writer.done)

    def _drop(self, reason: str, *args: object) -> int:
        self.stats["dropped"] += 1
        self.log.warning("%s: request dropped: " + reason, self.name, *args)
        return 0

    def _error(self, tag: int, err: int) -> bytes:
        self.stats["errors"] += 1
        self.trace.debug("%s: tag %d: Rlerror %s", self.name, tag, errno.errorcode.get(err, err))
        return W.lerror(tag, err)

    # --- fids ---------------------------------------------------------------------------------
    def _fid(self, num: int) -> Fid:
        fid = self.fids.get(num)
        if fid is None:
            raise P9Error(errno.EBADF, f"unknown fid {num}")
        return fid

    def _free_fid_number(self, num: int) -> None:
        if num in self.fids:
            raise P9Error(errno.EEXIST, f"fid {num} is in use")
        if num == W.NOFID:
            raise P9Error(errno.EBADF, "NOFID named as a new fid")
        if len(self.fids) >= self.limits.max_fids:
            self.log.warning("%s: the client holds %d fids, the most a share allows", self.name, len(self.fids))
            raise P9Error(errno.EMFILE)

    def _qid_path(self, dev: int, ino: int) -> int:
        """A qid path unique in the share: the inode number, with the device's index
        (0 for the share root's device) above bit 48 where the share spans file systems."""
        index = self._devs.get(dev)
        if index is None:
            index = len(self._devs) if len(self._devs) < 0xFFFF else 0xFFFF
            self._devs[dev] = index
        return (index << _DEV_SHIFT) | (ino & ((1 << _DEV_SHIFT) - 1)) if index else ino

    def _qid(self, st: os.stat_result) -> W.Qid:
        mode = st.st_mode
        qtype = W.QTDIR if stat.S_ISDIR(mode) else W.QTSYMLINK if stat.S_ISLNK(mode) else W.QTFILE
        return W.Qid(qtype, (st.st_mtime_ns ^ st.st_size) & 0xFFFF_FFFF, self._qid_path(st.st_dev, st.st_ino))

    def _is_pseudo(self, fd: int, dev: int) -> bool:
        known = self._pseudo.get(dev)
        if known is None:
            known = hostfs.is_pseudo_fs(fd) is not None
            if len(self._pseudo) < 4096:
                self._pseudo[dev] = known
        return known

    def _make_fid(self, path: tuple[bytes, ...], fd: int) -> Fid:
        st = os.fstat(fd)
        opaque = st.st_dev != self.root_dev and stat.S_ISDIR(st.st_mode) and self._is_pseudo(fd, st.st_dev)
        return Fid(path, fd, st, self._qid(st), opaque)

    def _parent(self, fid: Fid) -> tuple[int, bytes]:
        """A new descriptor of ``fid``'s directory and its name there, after checking
        that the name still leads to the fid's object (else ESTALE). The caller closes it."""
        if not fid.path:
            raise P9Error(errno.EBUSY, "the share's root has no parent in the share")
        parent = hostfs.resolve(self.root_fd, fid.path[:-1])
        try:
            st = os.stat(fid.path[-1], dir_fd=parent, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != (fid.dev, fid.ino):
                raise P9Error(errno.ESTALE, "the fid's name now names another file")
        except BaseException:
            os.close(parent)
            raise
        return parent, fid.path[-1]

    def _dir_fid(self, num: int) -> Fid:
        fid = self._fid(num)
        if fid.fd < 0 or not fid.is_dir:
            raise P9Error(errno.ENOTDIR)
        if fid.opaque:
            raise P9Error(errno.EACCES, "a host pseudo file system's mount point")
        return fid

    @staticmethod
    def _name(name: bytes) -> bytes:
        err = hostfs.check_name(name)
        if err:
            raise P9Error(err, f"name {name[:64]!r} refused")
        return name

    def _rename_paths(self, old: tuple[bytes, ...], new: tuple[bytes, ...]) -> None:
        """The fids below a renamed object follow it (their names from the root change)."""
        n = len(old)
        for fid in self.fids.values():
            if fid.path[:n] == old:
                fid.path = new + fid.path[n:]

    def clunk_all(self) -> None:
        for fid in self.fids.values():
            fid.close()
        self.fids.clear()

    def close(self) -> None:
        self.clunk_all()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    # --- session ------------------------------------------------------------------------------
    def _version(self, req: W.Tversion) -> bytes:
        """Tversion starts a new session: every fid is clunked; msize is the smaller of
        the client's and kvmm's bound. Only 9P2000.L is spoken ("unknown" otherwise)."""
        self.clunk_all()
        if req.msize < MIN_MSIZE:
            raise P9Error(errno.EINVAL, f"msize {req.msize} is below {MIN_MSIZE}")
        if req.version.split(b".", 2)[:2] != VERSION_PARTS:
            self.msize = 0
            return W.encode(W.RVERSION, req.tag, "ds", min(req.msize, self.limits.max_msize), b"unknown")
        self.msize = min(req.msize, self.limits.max_msize)
        return W.encode(W.RVERSION, req.tag, "ds", self.msize, W.VERSION)

    def _auth(self, req: W.Tauth) -> bytes:
        raise P9Error(errno.EOPNOTSUPP, "no authentication: attach directly")

    def _flush(self, req: W.Tflush) -> bytes:
        # Requests are served to completion in order: the flushed one has been answered.
        return W.encode(W.RFLUSH, req.tag)

    def _attach(self, req: W.Tattach) -> bytes:
        self._free_fid_number(req.fid)
        path = tuple(self._name(part) for part in req.aname.split(b"/") if part)
        fd = hostfs.resolve(self.root_fd, path)
        try:
            fid = self._make_fid(path, fd)
        except BaseException:
            os.close(fd)
            raise
        self.fids[req.fid] = fid
        return W.encode(W.RATTACH, req.tag, "Q", fid.qid)

    def _clunk(self, req: W.Tclunk) -> bytes:
        self._fid(req.fid)
        self.fids.pop(req.fid).close()
        return W.encode(W.RCLUNK, req.tag)

    # --- walking ------------------------------------------------------------------------------
    def _walk(self, req: W.Twalk) -> bytes:
        """Each name from the fid's object, one ``O_PATH`` open beneath the previous
        directory, no symlink followed; ``..`` goes back along the names from the root
        and is refused at the root. A first name that fails is an error; a later one ends
        the walk with the qids so far and no new fid (9P2000 walk(5))."""
        src = self._fid(req.fid)
        if src.fd < 0:
            raise P9Error(errno.EBADF, "walk from an xattr fid")
        if req.newfid != req.fid:
            self._free_fid_number(req.newfid)
        path, fd, cur = src.path, src.fd, src
        qids: list[W.Qid] = []
        try:
            for i, name in enumerate(req.names):
                try:
                    if name == b"..":
                        if not path:
                            raise P9Error(errno.EACCES, "'..' at the share's root")
                        path = path[:-1]
                        nfd = hostfs.resolve(self.root_fd, path)
                    else:
                        self._name(name)
                        if cur.opaque:
                            raise P9Error(errno.ENOENT, "inside a host pseudo file system")
                        if not cur.is_dir:
                            raise P9Error(errno.ENOTDIR)
                        if sum(map(len, path)) + len(path) + len(name) > hostfs.PATH_MAX:
                            raise P9Error(errno.ENAMETOOLONG)
                        nfd = hostfs.open_beneath(fd, name, os.O_PATH)
                        path = path + (name,)
                    try:
                        nxt = self._make_fid(path, nfd)
                    except BaseException:
                        os.close(nfd)
                        raise
                except (P9Error, OSError):
                    if i == 0:
                        raise
                    break
                if fd != src.fd:
                    os.close(fd)
                fd, cur = nfd, nxt
                qids.append(nxt.qid)
            self.stats["walks"] += len(qids)
            if len(qids) == len(req.names):
                if not req.names:  # a clone
                    fd = os.dup(src.fd)
                    cur = Fid(src.path, fd, None, src.qid, src.opaque)
                    cur.mode, cur.dev, cur.ino = src.mode, src.dev, src.ino
                if req.newfid == req.fid:
                    src.close()
                self.fids[req.newfid] = cur
                fd = -1  # the new fid owns it
        finally:
            if fd >= 0 and fd != src.fd:
                os.close(fd)
        return W.encode(W.RWALK, req.tag, "w" + "Q" * len(qids), len(qids), *qids)

    # --- attributes ---------------------------------------------------------------------------
    def _getattr(self, req: W.Tgetattr) -> bytes:
        fid = self._fid(req.fid)
        if fid.fd < 0:
            raise P9Error(errno.EBADF, "getattr of an xattr fid")
        st = os.fstat(fid.fd)
        qid = self._qid(st)
        return W.encode(W.RGETATTR, req.tag, "qQdddqqqqqqqqqqqqqqq", W.STATS_BASIC, qid, st.st_mode, st.st_uid,
                        st.st_gid, st.st_nlink, st.st_rdev, st.st_size, st.st_blksize, st.st_blocks,
                        *divmod(st.st_atime_ns, 10**9), *divmod(st.st_mtime_ns, 10**9),
                        *divmod(st.st_ctime_ns, 10**9), 0, 0, 0, 0)

    def _setattr(self, req: W.Tsetattr) -> bytes:
        fid = self._fid(req.fid)
        if fid.fd < 0:
            raise P9Error(errno.EBADF, "setattr of an xattr fid")
        valid = req.valid
        if valid & W.ATTR_SIZE:
            if req.size > _OFF_MAX:
                raise P9Error(errno.EFBIG)
            if fid.open_fd >= 0 and fid.open_flags & W.DOTL_ACCMODE:
                os.ftruncate(fid.open_fd, req.size)
            else:
                self._with_parent(fid, lambda d, n: self._truncate(fid, d, n, req.size))
        if valid & W.ATTR_MODE:
            if stat.S_ISLNK(fid.mode):
                raise P9Error(errno.EOPNOTSUPP, "chmod of a symlink")
            os.chmod(f"/proc/self/fd/{fid.fd}", _safe_mode(req.mode, fid.is_dir))  # exactly the fid's object
        if valid & (W.ATTR_UID | W.ATTR_GID):
            uid = req.uid if valid & W.ATTR_UID else -1
            gid = req.gid if valid & W.ATTR_GID else -1
            self._at(fid, lambda d, n: os.chown(n, uid, gid, dir_fd=d, follow_symlinks=False))
        if valid & (W.ATTR_ATIME | W.ATTR_MTIME):
            st = os.fstat(fid.fd)
            now = time.time_ns()

            def when(bit: int, set_bit: int, sec: int, nsec: int, current: int) -> int:
                if not valid & bit:
                    return current
                return sec * 10**9 + min(nsec, 10**9 - 1) if valid & set_bit else now

            times = (when(W.ATTR_ATIME, W.ATTR_ATIME_SET, req.atime_sec, req.atime_nsec, st.st_atime_ns),
                     when(W.ATTR_MTIME, W.ATTR_MTIME_SET, req.mtime_sec, req.mtime_nsec, st.st_mtime_ns))
            self._at(fid, lambda d, n: os.utime(n, ns=times, dir_fd=d, follow_symlinks=False))
        return W.encode(W.RSETATTR, req.tag)

    def _truncate(self, fid: Fid, parent: int, name: bytes, size: int) -> None:
        fd = hostfs.reopen(fid.fd, os.fstat(fid.fd), os.O_WRONLY, parent, name)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def _with_parent(self, fid: Fid, action: Callable[[int, bytes], Any]) -> Any:
        parent, name = self._parent(fid)
        try:
            return action(parent, name)
        finally:
            os.close(parent)

    def _at(self, fid: Fid, action: Callable[[int, bytes], Any]) -> Any:
        """``action(dirfd, name)`` on the fid's object by its name in its parent (the
        root as ``.`` of itself), for the ``*at`` calls that take AT_SYMLINK_NOFOLLOW."""
        if not fid.path:
            return action(self.root_fd, b".")
        return self._with_parent(fid, action)

    def _statfs(self, req: W.Tstatfs) -> bytes:
        fid = self._fid(req.fid)
        s = hostfs.fstatfs(fid.fd if fid.fd >= 0 else self.root_fd)
        return W.encode(W.RSTATFS, req.tag, "ddqqqqqqd", V9FS_MAGIC, s.bsize & 0xFFFF_FFFF, s.blocks, s.bfree,
                        s.bavail, s.files, s.ffree, s.fsid, s.namelen & 0xFFFF_FFFF)

    def _readlink(self, req: W.Treadlink) -> bytes:
        fid = self._fid(req.fid)
        if fid.fd < 0 or not stat.S_ISLNK(fid.mode):
            raise P9Error(errno.EINVAL, "readlink of something not a symlink")
        target = os.readlink(b"", dir_fd=fid.fd)  # readlinkat on the O_PATH fd of the link itself
        return W.encode(W.RREADLINK, req.tag, "s", target)

    # --- opening, reading, writing ------------------------------------------------------------
    def _lopen(self, req: W.Tlopen) -> bytes:
        fid = self._fid(req.fid)
        if fid.fd < 0 or fid.opened:
            raise P9Error(errno.EBADF, "open of an xattr fid or of one already open")
        access = req.flags & W.DOTL_ACCMODE
        if access == W.DOTL_ACCMODE:
            raise P9Error(errno.EINVAL, "open with access mode 3")
        writes = access != 0 or req.flags & (W.DOTL_TRUNC | W.DOTL_APPEND)
        if writes and self.read_only:
            raise P9Error(errno.EROFS)
        st = os.fstat(fid.fd)
        if stat.S_ISLNK(st.st_mode):
            raise P9Error(errno.ELOOP, "open of a symlink (never followed on the host)")
        if stat.S_ISDIR(st.st_mode):
            if writes:
                raise P9Error(errno.EISDIR)
            if not fid.opaque:
                fid.open_fd = hostfs.reopen(fid.fd, st, os.O_RDONLY, None, None)
        elif not stat.S_ISREG(st.st_mode):
            raise P9Error(errno.EACCES, "device nodes, FIFOs and sockets are not opened through a share")
        else:
            flags = _host_open_flags(req.flags)
            fd = self._with_parent(fid, lambda d, n: hostfs.reopen(fid.fd, st, flags, d, n))
            got = os.fstat(fd)
            if (got.st_dev, got.st_ino) != (fid.dev, fid.ino):  # the name was swapped meanwhile
                os.close(fd)
                raise P9Error(errno.ESTALE, "the fid's name now names another file")
            fid.open_fd = fd
        fid.opened, fid.open_flags = True, req.flags
        self.stats["opens"] += 1
        return W.encode(W.RLOPEN, req.tag, "Qd", self._qid(os.fstat(fid.fd)), 0)

    def _read(self, req: W.Tread, writer: Any) -> int:
        """Rread: ``count[4]`` then the data, preadv'd straight into the chain's buffers."""
        head = writer.reserve(W.RREAD_HEADER)  # an Rlerror is the same 11 bytes
        try:
            fid = self._fid(req.fid)
            count = min(req.nbytes, self._io_room(writer))
            if fid.xattr is not None:
                data = fid.xattr[req.offset : req.offset + count] if req.offset < len(fid.xattr) else b""
                n = writer.write(data)
            else:
                if fid.open_fd < 0:
                    raise P9Error(errno.EISDIR if fid.opened else errno.EBADF, "read of a fid not open")
                if req.offset > _OFF_MAX:
                    raise P9Error(errno.EINVAL)
                views = writer.views(count)
                n = os.preadv(fid.open_fd, views, req.offset) if views else 0
                writer.consume(n)
            self.stats["reads"] += 1
            self.stats["read_bytes"] += n
            writer.write_at(head, W.HEADER.pack(W.RREAD_HEADER + n, W.RREAD, req.tag) + struct.pack("<I", n))
        except (P9Error, OSError) as exc:
            writer.write_at(head, self._error(req.tag, exc.errno or errno.EIO))
            return W.RLERROR_SIZE
        return int(writer.done)

    def _io_room(self, writer: Any) -> int:
        """The most data one Rread or Rreaddir may carry: what the client may receive
        (msize - 24, P9_IOHDRSZ) and what its buffers hold."""
        return max(0, min(self.msize - W.IOHDRSZ, writer.available))

    def _write(self, tag: int, body_len: int, reader: Any, writer: Any) -> int:
        """Twrite: its data stays in the chain's buffers and is pwritev'd from there."""
        fixed = reader.read_exact(W.TWRITE_FIXED.size) if body_len >= W.TWRITE_FIXED.size else None
        if fixed is None:
            raise W.MessageError("Twrite shorter than fid, offset and count")
        fid_num, offset, count = W.TWRITE_FIXED.unpack(fixed)
        if count > body_len - W.TWRITE_FIXED.size:
            raise W.MessageError(f"Twrite of {count} bytes in a message holding {body_len - W.TWRITE_FIXED.size}")
        self.trace.debug("%s: Twrite(tag=%d, fid=%d, offset=%d, count=%d)", self.name, tag, fid_num, offset, count)
        try:
            if self.read_only:
                raise P9Error(errno.EROFS)
            fid = self._fid(fid_num)
            if fid.open_fd < 0 or not fid.open_flags & W.DOTL_ACCMODE or not stat.S_ISREG(fid.mode):
                raise P9Error(errno.EBADF, "write to a fid not open for writing")
            if offset > _OFF_MAX:
                raise P9Error(errno.EINVAL)
            views = reader.views(count)
            n = os.pwritev(fid.open_fd, views, offset) if count else 0
            reader.consume(n)
            self.stats["writes"] += 1
            self.stats["written_bytes"] += n
            reply = W.encode(W.RWRITE, tag, "d", n)
        except (P9Error, OSError) as exc:
            reply = self._error(tag, exc.errno or errno.EIO)
        writer.write_all(reply)
        return int(writer.done)

    def _readdir(self, req: W.Treaddir, writer: Any) -> int:
        """Rreaddir: entries (qid, offset of the next, type, name) from ``getdents64`` at
        the client's offset, as many as fit in ``count``; nothing is listed ahead."""
        head = writer.reserve(W.RREAD_HEADER)
        try:
            fid = self._fid(req.fid)
            if not fid.opened or not fid.is_dir:
                raise P9Error(errno.EBADF if not fid.opened else errno.ENOTDIR, "readdir of a fid not an open directory")
            count = min(req.nbytes, self._io_room(writer))
            out = bytearray()
            if fid.open_fd >= 0:  # an opaque mount point lists nothing
                # The offset is an entry's d_off given back (a signed 64-bit cookie).
                offset = req.offset - (1 << 64) if req.offset > _OFF_MAX else req.offset
                for entry in hostfs.getdents(fid.open_fd, offset, count):
                    size = W.DIRENT_FIXED + len(entry.name)
                    if len(out) + size > count:
                        break
                    if entry.name == b".." and not fid.path:
                        qid = fid.qid  # the share's root is its own parent
                    else:
                        qtype = W.QTDIR if entry.type == 4 else W.QTSYMLINK if entry.type == 10 else W.QTFILE
                        qid = W.Qid(qtype, 0, self._qid_path(fid.dev, entry.ino))
                    out += W.encode_qid(qid) + struct.pack("<QBH", entry.offset & 0xFFFF_FFFF_FFFF_FFFF, entry.type,
                                                           len(entry.name)) + entry.name
            writer.write(out)
            self.stats["readdirs"] += 1
            writer.write_at(head, W.HEADER.pack(W.RREAD_HEADER + len(out), W.RREADDIR, req.tag)
                            + struct.pack("<I", len(out)))
        except (P9Error, OSError) as exc:
            writer.write_at(head, self._error(req.tag, exc.errno or errno.EIO))
            return W.RLERROR_SIZE
        return int(writer.done)

    def _fsync(self, req: W.Tfsync) -> bytes:
        fid = self._fid(req.fid)
        if fid.open_fd < 0:
            raise P9Error(errno.EBADF, "fsync of a fid not open")
        (os.fdatasync if req.datasync else os.fsync)(fid.open_fd)
        return W.encode(W.RFSYNC, req.tag)

    def _lock(self, req: W.Tlock) -> bytes:
        """A POSIX record lock on the host file, never waited for: a conflict answers
        BLOCKED, and Linux's v9fs retries a blocking lock itself (fs/9p/vfs_file.c)."""
        fid = self._fid(req.fid)
        if fid.open_fd < 0:
            raise P9Error(errno.EBADF, "lock of a fid not open")
        status = W.LOCK_SUCCESS
        try:
            fcntl.fcntl(fid.open_fd, fcntl.F_SETLK, _flock(req.type, req.start, req.length, 0))
        except OSError as exc:
            status = W.LOCK_BLOCKED if exc.errno in (errno.EAGAIN, errno.EACCES) else W.LOCK_ERROR
        except (ValueError, OverflowError, P9Error):
            status = W.LOCK_ERROR
        return W.encode(W.RLOCK, req.tag, "b", status)

    def _getlock(self, req: W.Tgetlock) -> bytes:
        fid = self._fid(req.fid)
        if fid.open_fd < 0:
            raise P9Error(errno.EBADF, "getlock of a fid not open")
        try:
            got = fcntl.fcntl(fid.open_fd, fcntl.F_GETLK, _flock(req.type, req.start, req.length, req.proc_id))
        except OverflowError:
            raise P9Error(errno.EINVAL) from None
        ltype, _whence, start, length, pid = _FLOCK.unpack(got)
        p9type = {fcntl.F_RDLCK: W.LOCK_TYPE_RDLCK, fcntl.F_WRLCK: W.LOCK_TYPE_WRLCK}.get(ltype, W.LOCK_TYPE_UNLCK)
        if p9type == W.LOCK_TYPE_UNLCK:
            return W.encode(W.RGETLOCK, req.tag, "bqqds", p9type, req.start, req.length, req.proc_id, req.client_id)
        return W.encode(W.RGETLOCK, req.tag, "bqqds", p9type, start, length, pid & 0xFFFF_FFFF, b"")

    # --- extended attributes: none are shown ----------------------------------------------------
    def _xattrwalk(self, req: W.Txattrwalk) -> bytes:
        """An empty list for the list request (name ""), ENODATA for a named attribute:
        host xattrs (security labels, capabilities) are not the guest's business."""
        src = self._fid(req.fid)
        if req.name:
            raise P9Error(errno.ENODATA)
        self._free_fid_number(req.newfid)
        fid = Fid(src.path, -1, None, src.qid)
        fid.xattr = b""
        self.fids[req.newfid] = fid
        return W.encode(W.RXATTRWALK, req.tag, "q", 0)

    def _xattrcreate(self, req: W.Txattrcreate) -> bytes:
        raise P9Error(errno.EOPNOTSUPP, "extended attributes are not set through a share")

    # --- changing the share (read-write shares only: MODIFYING) ---------------------------------
    def _lcreate(self, req: W.Tlcreate) -> bytes:
        """Create and open ``name`` in the directory fid, which becomes the new file's
        fid. O_NOFOLLOW (always added) keeps O_CREAT from creating a dangling symlink's
        target wherever it points."""
        dfid = self._dir_fid(req.fid)
        if dfid.opened:
            raise P9Error(errno.EBADF, "lcreate in an open fid")
        name = self._name(req.name)
        flags = _host_open_flags(req.flags) | os.O_CREAT | (os.O_EXCL if req.flags & W.DOTL_EXCL else 0)
        fd = hostfs.open_beneath(dfid.fd, name, flags | os.O_NONBLOCK, _safe_mode(req.mode, False))
        pfd = -1
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise P9Error(errno.EACCES, "lcreate opened something not a regular file")
            os.set_blocking(fd, not req.flags & W.DOTL_NONBLOCK)
            _chgrp(fd, req.gid)
            pfd = hostfs.open_beneath(dfid.fd, name, os.O_PATH)
            new = self._make_fid(dfid.path + (name,), pfd)
        except BaseException:
            os.close(fd)
            if pfd >= 0:
                os.close(pfd)
            raise
        os.close(dfid.fd)
        dfid.path, dfid.fd, dfid.qid, dfid.mode, dfid.dev, dfid.ino = new.path, new.fd, new.qid, new.mode, new.dev, new.ino
        dfid.open_fd, dfid.open_flags, dfid.opened = fd, req.flags, True
        self.stats["opens"] += 1
        return W.encode(W.RLCREATE, req.tag, "Qd", dfid.qid, 0)

    def _created(self, dfid: Fid, name: bytes, gid: int) -> W.Qid:
        fd = hostfs.open_beneath(dfid.fd, name, os.O_PATH)
        try:
            _chgrp(fd, gid, nofollow_name=(dfid.fd, name))
            return self._qid(os.fstat(fd))
        finally:
            os.close(fd)

    def _symlink(self, req: W.Tsymlink) -> bytes:
        dfid = self._dir_fid(req.fid)
        name = self._name(req.name)
        if not req.target or b"\0" in req.target or len(req.target) >= hostfs.PATH_MAX:
            raise P9Error(errno.EINVAL if not len(req.target) >= hostfs.PATH_MAX else errno.ENAMETOOLONG)
        os.symlink(req.target, name, dir_fd=dfid.fd)  # only ever read back, never followed on the host
        return W.encode(W.RSYMLINK, req.tag, "Q", self._created(dfid, name, req.gid))

    def _mknod(self, req: W.Tmknod) -> bytes:
        """Only regular files: device nodes, FIFOs and sockets are not made on the host."""
        dfid = self._dir_fid(req.dfid)
        name = self._name(req.name)
        if not stat.S_ISREG(req.mode):
            raise P9Error(errno.EPERM, "mknod of anything but a regular file")
        os.close(hostfs.open_beneath(dfid.fd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _safe_mode(req.mode, False)))
        return W.encode(W.RMKNOD, req.tag, "Q", self._created(dfid, name, req.gid))

    def _mkdir(self, req: W.Tmkdir) -> bytes:
        dfid = self._dir_fid(req.dfid)
        name = self._name(req.name)
        os.mkdir(name, _safe_mode(req.mode, True), dir_fd=dfid.fd)
        return W.encode(W.RMKDIR, req.tag, "Q", self._created(dfid, name, req.gid))

    def _unlinkat(self, req: W.Tunlinkat) -> bytes:
        dfid = self._dir_fid(req.dirfid)
        name = self._name(req.name)
        if req.flags & W.AT_REMOVEDIR:
            os.rmdir(name, dir_fd=dfid.fd)
        else:
            os.unlink(name, dir_fd=dfid.fd)
        return W.encode(W.RUNLINKAT, req.tag)

    def _remove(self, req: W.Tremove) -> bytes:
        fid = self._fid(req.fid)
        try:  # remove(5): the fid is clunked whether or not the remove succeeds
            if self.read_only:
                raise P9Error(errno.EROFS)
            if fid.fd < 0:
                raise P9Error(errno.EBADF)
            if fid.is_dir:
                self._with_parent(fid, lambda d, n: os.rmdir(n, dir_fd=d))
            else:
                self._with_parent(fid, lambda d, n: os.unlink(n, dir_fd=d))
        finally:
            self.fids.pop(req.fid).close()
        return W.encode(W.RREMOVE, req.tag)

    def _rename(self, req: W.Trename) -> bytes:
        fid = self._fid(req.fid)
        if fid.fd < 0:
            raise P9Error(errno.EBADF)
        dfid = self._dir_fid(req.dfid)
        name = self._name(req.name)
        self._with_parent(fid, lambda d, n: os.rename(n, name, src_dir_fd=d, dst_dir_fd=dfid.fd))
        self._rename_paths(fid.path, dfid.path + (name,))
        return W.encode(W.RRENAME, req.tag)

    def _renameat(self, req: W.Trenameat) -> bytes:
        old, new = self._dir_fid(req.olddirfid), self._dir_fid(req.newdirfid)
        oldname, newname = self._name(req.oldname), self._name(req.newname)
        os.rename(oldname, newname, src_dir_fd=old.fd, dst_dir_fd=new.fd)
        self._rename_paths(old.path + (oldname,), new.path + (newname,))
        return W.encode(W.RRENAMEAT, req.tag)

    def _link(self, req: W.Tlink) -> bytes:
        dfid = self._dir_fid(req.dfid)
        fid = self._fid(req.fid)
        if fid.fd < 0:
            raise P9Error(errno.EBADF)
        name = self._name(req.name)
        self._with_parent(fid, lambda d, n: os.link(n, name, src_dir_fd=d, dst_dir_fd=dfid.fd, follow_symlinks=False))
        return W.encode(W.RLINK, req.tag)

    def counters(self) -> dict[str, int]:
        return {**self.stats, "fids": len(self.fids)}


VERSION_PARTS = W.VERSION.split(b".")  # [b"9P2000", b"L"]: "9P2000.L" and extensions of it


def _host_open_flags(flags: int) -> int:
    """The host open flags for a 9P2000.L open: the access mode, O_TRUNC, O_APPEND and
    the sync flags; nothing that would block (O_NONBLOCK is the I/O thread's business),
    bypass the page cache with the guest's alignment (O_DIRECT) or need ownership
    (O_NOATIME)."""
    out = flags & W.DOTL_ACCMODE
    for dotl, host in ((W.DOTL_TRUNC, os.O_TRUNC), (W.DOTL_APPEND, os.O_APPEND), (W.DOTL_DSYNC, os.O_DSYNC),
                       (W.DOTL_SYNC, os.O_SYNC)):
        if flags & dotl == dotl:
            out |= host
    return out


def _safe_mode(mode: int, is_dir: bool) -> int:
    """Permission bits a guest may set on the host: never set-user-ID, and set-group-ID
    only on a directory (group inheritance), so a guest cannot leave a privileged
    program in a shared directory."""
    mode &= 0o7777 & ~stat.S_ISUID
    if not is_dir:
        mode &= ~stat.S_ISGID
    return mode


def _chgrp(fd: int, gid: int, nofollow_name: tuple[int, bytes] | None = None) -> None:
    """The group the guest asked for, where kvmm may give it (as root); otherwise the
    file keeps kvmm's group (files are created with kvmm's credentials)."""
    if os.geteuid() != 0 or gid == W.NOFID:
        return
    try:
        if nofollow_name is not None:
            os.chown(nofollow_name[1], -1, gid, dir_fd=nofollow_name[0], follow_symlinks=False)
        else:
            os.fchown(fd, -1, gid)
    except OSError as exc:
        _LOG.debug("chgrp to %d failed: %s", gid, exc.strerror)


def _flock(p9type: int, start: int, length: int, pid: int) -> bytes:
    ltype = {W.LOCK_TYPE_RDLCK: fcntl.F_RDLCK, W.LOCK_TYPE_WRLCK: fcntl.F_WRLCK,
             W.LOCK_TYPE_UNLCK: fcntl.F_UNLCK}.get(p9type)
    if ltype is None or start > _OFF_MAX or length > _OFF_MAX:
        raise P9Error(errno.EINVAL)
    return _FLOCK.pack(ltype, os.SEEK_SET, start, length, pid & 0x7FFF_FFFF)
