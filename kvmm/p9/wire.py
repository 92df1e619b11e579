"""9P2000.L messages on the wire: parsing a request and encoding a reply.

Every message is ``size[4] type[1] tag[2]`` then the body; integers are little-endian,
a string is ``len[2]`` and that many bytes (Linux's ``include/net/9p/9p.h`` has the
message numbers, ``net/9p/client.c`` the bodies as ``p9pdu_readf`` formats; diod's
protocol.md describes 9P2000.L). :func:`parse` turns a body into a typed request and
does nothing else: a body too short for its fields, or a count larger than the message,
is a :class:`MessageError` (answered with ``Rlerror(EINVAL)``); an unknown type is
``EOPNOTSUPP``. Nothing here touches the host.

The formats use Linux's letters: ``b`` u8, ``w`` u16, ``d`` u32, ``q`` u64, ``s`` a
string, ``T`` a walk's names (``nwname[2]`` then the strings, at most ``MAXWELEM``),
``Q`` a qid (``type[1] version[4] path[8]``).
"""

from __future__ import annotations

import errno
import struct
from typing import Any, NamedTuple

# Message types (include/net/9p/9p.h, enum p9_msg_t).
TLERROR, RLERROR = 6, 7
TSTATFS, RSTATFS = 8, 9
TLOPEN, RLOPEN = 12, 13
TLCREATE, RLCREATE = 14, 15
TSYMLINK, RSYMLINK = 16, 17
TMKNOD, RMKNOD = 18, 19
TRENAME, RRENAME = 20, 21
TREADLINK, RREADLINK = 22, 23
TGETATTR, RGETATTR = 24, 25
TSETATTR, RSETATTR = 26, 27
TXATTRWALK, RXATTRWALK = 30, 31
TXATTRCREATE, RXATTRCREATE = 32, 33
TREADDIR, RREADDIR = 40, 41
TFSYNC, RFSYNC = 50, 51
TLOCK, RLOCK = 52, 53
TGETLOCK, RGETLOCK = 54, 55
TLINK, RLINK = 70, 71
TMKDIR, RMKDIR = 72, 73
TRENAMEAT, RRENAMEAT = 74, 75
TUNLINKAT, RUNLINKAT = 76, 77
TVERSION, RVERSION = 100, 101
TAUTH, RAUTH = 102, 103
TATTACH, RATTACH = 104, 105
TFLUSH, RFLUSH = 108, 109
TWALK, RWALK = 110, 111
TREAD, RREAD = 116, 117
TWRITE, RWRITE = 118, 119
TCLUNK, RCLUNK = 120, 121
TREMOVE, RREMOVE = 122, 123

HEADER = struct.Struct("<IBH")  # size, type, tag
HEADER_SIZE = HEADER.size  # 7 (P9_HDRSZ)
IOHDRSZ = 24  # P9_IOHDRSZ: room for a Twrite/Rread header; a client reads at most msize - 24
RREAD_HEADER = 11  # size[4] type[1] tag[2] count[4]
TWRITE_FIXED = struct.Struct("<IQI")  # fid, offset, count (the data follows)
NOTAG = 0xFFFF
NOFID = 0xFFFF_FFFF
MAXWELEM = 16  # P9_MAXWELEM
VERSION = b"9P2000.L"

# Qid types (enum p9_qid_t).
QTDIR = 0x80
QTSYMLINK = 0x02
QTFILE = 0x00

# Tgetattr/Rgetattr valid bits (P9_STATS_*): kvmm fills the basic set.
STATS_BASIC = 0x7FF

# Tsetattr valid bits (fs/9p/vfs_inode_dotl.c).
ATTR_MODE = 1 << 0
ATTR_UID = 1 << 1
ATTR_GID = 1 << 2
ATTR_SIZE = 1 << 3
ATTR_ATIME = 1 << 4
ATTR_MTIME = 1 << 5
ATTR_CTIME = 1 << 6
ATTR_ATIME_SET = 1 << 7
ATTR_MTIME_SET = 1 << 8

# 9P2000.L open flags (P9_DOTL_*): Linux's x86 O_* values.
DOTL_ACCMODE = 0o3
DOTL_WRONLY = 0o1
DOTL_RDWR = 0o2
DOTL_CREATE = 0o100
DOTL_EXCL = 0o200
DOTL_TRUNC = 0o1000
DOTL_APPEND = 0o2000
DOTL_NONBLOCK = 0o4000
DOTL_DSYNC = 0o10000
DOTL_DIRECTORY = 0o200000
DOTL_SYNC = 0o4000000
AT_REMOVEDIR = 0x200  # P9_DOTL_AT_REMOVEDIR

# Locks (P9_LOCK_*).
LOCK_TYPE_RDLCK, LOCK_TYPE_WRLCK, LOCK_TYPE_UNLCK = 0, 1, 2
LOCK_SUCCESS, LOCK_BLOCKED, LOCK_ERROR = 0, 1, 2


class MessageError(Exception):
    """A request whose body does not hold what its type says; answered with Rlerror."""

    def __init__(self, reason: str, errno_: int = errno.EINVAL) -> None:
        self.errno = errno_
        super().__init__(reason)


class Qid(NamedTuple):
    type: int
    version: int
    path: int


# --- requests: one record per message type, fields in wire order ---------------------------
class Tversion(NamedTuple):
    tag: int
    msize: int
    version: bytes


class Tauth(NamedTuple):
    tag: int
    afid: int
    uname: bytes
    aname: bytes
    n_uname: int


class Tattach(NamedTuple):
    tag: int
    fid: int
    afid: int
    uname: bytes
    aname: bytes
    n_uname: int


class Tflush(NamedTuple):
    tag: int
    oldtag: int


class Twalk(NamedTuple):
    tag: int
    fid: int
    newfid: int
    names: tuple[bytes, ...]


class Tread(NamedTuple):
    tag: int
    fid: int
    offset: int
    nbytes: int  # the message's count[4] ("count" would hide tuple.count)


class Twrite(NamedTuple):
    """The data is not in the record: it stays in guest memory (views) until pwritev."""

    tag: int
    fid: int
    offset: int
    nbytes: int  # the message's count[4] ("count" would hide tuple.count)


class Tclunk(NamedTuple):
    tag: int
    fid: int


class Tremove(NamedTuple):
    tag: int
    fid: int


class Tstatfs(NamedTuple):
    tag: int
    fid: int


class Tlopen(NamedTuple):
    tag: int
    fid: int
    flags: int


class Tlcreate(NamedTuple):
    tag: int
    fid: int
    name: bytes
    flags: int
    mode: int
    gid: int


class Tsymlink(NamedTuple):
    tag: int
    fid: int
    name: bytes
    target: bytes
    gid: int


class Tmknod(NamedTuple):
    tag: int
    dfid: int
    name: bytes
    mode: int
    major: int
    minor: int
    gid: int


class Trename(NamedTuple):
    tag: int
    fid: int
    dfid: int
    name: bytes


class Treadlink(NamedTuple):
    tag: int
    fid: int


class Tgetattr(NamedTuple):
    tag: int
    fid: int
    request_mask: int


class Tsetattr(NamedTuple):
    tag: int
    fid: int
    valid: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int


class Txattrwalk(NamedTuple):
    tag: int
    fid: int
    newfid: int
    name: bytes


class Txattrcreate(NamedTuple):
    tag: int
    fid: int
    name: bytes
    size: int
    flags: int


class Treaddir(NamedTuple):
    tag: int
    fid: int
    offset: int
    nbytes: int  # the message's count[4] ("count" would hide tuple.count)


class Tfsync(NamedTuple):
    tag: int
    fid: int
    datasync: int


class Tlock(NamedTuple):
    tag: int
    fid: int
    type: int
    flags: int
    start: int
    length: int
    proc_id: int
    client_id: bytes


class Tgetlock(NamedTuple):
    tag: int
    fid: int
    type: int
    start: int
    length: int
    proc_id: int
    client_id: bytes


class Tlink(NamedTuple):
    tag: int
    dfid: int
    fid: int
    name: bytes


class Tmkdir(NamedTuple):
    tag: int
    dfid: int
    name: bytes
    mode: int
    gid: int


class Trenameat(NamedTuple):
    tag: int
    olddirfid: int
    oldname: bytes
    newdirfid: int
    newname: bytes


class Tunlinkat(NamedTuple):
    tag: int
    dirfid: int
    name: bytes
    flags: int


# type -> (record, body format). Twrite's format covers its fixed part only.
REQUESTS: dict[int, tuple[Any, str]] = {
    TVERSION: (Tversion, "ds"),
    TAUTH: (Tauth, "dssd"),
    TATTACH: (Tattach, "ddssd"),
    TFLUSH: (Tflush, "w"),
    TWALK: (Twalk, "ddT"),
    TREAD: (Tread, "dqd"),
    TWRITE: (Twrite, "dqd"),
    TCLUNK: (Tclunk, "d"),
    TREMOVE: (Tremove, "d"),
    TSTATFS: (Tstatfs, "d"),
    TLOPEN: (Tlopen, "dd"),
    TLCREATE: (Tlcreate, "dsddd"),
    TSYMLINK: (Tsymlink, "dssd"),
    TMKNOD: (Tmknod, "dsdddd"),
    TRENAME: (Trename, "dds"),
    TREADLINK: (Treadlink, "d"),
    TGETATTR: (Tgetattr, "dq"),
    TSETATTR: (Tsetattr, "dddddqqqqq"),
    TXATTRWALK: (Txattrwalk, "dds"),
    TXATTRCREATE: (Txattrcreate, "dsqd"),
    TREADDIR: (Treaddir, "dqd"),
    TFSYNC: (Tfsync, "dd"),
    TLOCK: (Tlock, "dbdqqds"),
    TGETLOCK: (Tgetlock, "dbqqds"),
    TLINK: (Tlink, "dds"),
    TMKDIR: (Tmkdir, "dsdd"),
    TRENAMEAT: (Trenameat, "dsds"),
    TUNLINKAT: (Tunlinkat, "dsd"),
}
NAMES = {mtype: record.__name__ for mtype, (record, _fmt) in REQUESTS.items()}

_INTS = {"b": struct.Struct("<B"), "w": struct.Struct("<H"), "d": struct.Struct("<I"), "q": struct.Struct("<Q")}
_U16 = _INTS["w"]
_QID = struct.Struct("<BIQ")


def decode(body: bytes | memoryview, fmt: str, offset: int = 0) -> tuple[list[Any], int]:
    """The values ``fmt`` describes at ``offset`` of ``body`` and the offset after them.
    Raises MessageError where the body ends first."""
    values: list[Any] = []
    pos = offset
    end = len(body)
    for ch in fmt:
        if ch in _INTS:
            s = _INTS[ch]
            if pos + s.size > end:
                raise MessageError(f"message ends inside a field ({fmt!r} at byte {pos})")
            values.append(s.unpack_from(body, pos)[0])
            pos += s.size
        elif ch == "s":
            text, pos = _string(body, pos)
            values.append(text)
        elif ch == "T":
            if pos + 2 > end:
                raise MessageError("walk message ends before its name count")
            count = _U16.unpack_from(body, pos)[0]
            pos += 2
            if count > MAXWELEM:
                raise MessageError(f"walk of {count} names, at most {MAXWELEM}")
            names = []
            for _ in range(count):
                name, pos = _string(body, pos)
                names.append(name)
            values.append(tuple(names))
        else:  # pragma: no cover - the formats above are fixed
            raise ValueError(f"format letter {ch!r}")
    return values, pos


def _string(body: bytes | memoryview, pos: int) -> tuple[bytes, int]:
    if pos + 2 > len(body):
        raise MessageError(f"message ends inside a string length (byte {pos})")
    n = _U16.unpack_from(body, pos)[0]
    pos += 2
    if pos + n > len(body):
        raise MessageError(f"string of {n} bytes runs past the message end")
    return bytes(body[pos : pos + n]), pos + n


def parse(mtype: int, tag: int, body: bytes | memoryview) -> Any:
    """The request record of a message of type ``mtype`` with ``body`` (after the
    header). Raises MessageError (bad body, or EOPNOTSUPP for an unknown type)."""
    entry = REQUESTS.get(mtype)
    if entry is None:
        raise MessageError(f"message type {mtype} is not a 9P2000.L request kvmm serves", errno.EOPNOTSUPP)
    record, fmt = entry
    values, _end = decode(body, fmt)  # trailing bytes are ignored, as Linux's parser does
    return record(tag, *values)


# --- replies -------------------------------------------------------------------------------
def encode(rtype: int, tag: int, fmt: str = "", *values: Any) -> bytes:
    """A whole reply message: header (with its size) and ``values`` as ``fmt`` says
    (``Q`` takes a :class:`Qid`)."""
    parts = [b""]
    for ch, value in zip(fmt, values, strict=True):
        if ch in _INTS:
            parts.append(_INTS[ch].pack(value))
        elif ch == "s":
            parts.append(_U16.pack(len(value)) + value)
        elif ch == "Q":
            parts.append(_QID.pack(*value))
        else:  # pragma: no cover
            raise ValueError(f"format letter {ch!r}")
    body = b"".join(parts)
    return HEADER.pack(HEADER_SIZE + len(body), rtype, tag) + body


def lerror(tag: int, err: int) -> bytes:
    return encode(RLERROR, tag, "d", err)


RLERROR_SIZE = HEADER_SIZE + 4


def encode_qid(qid: Qid) -> bytes:
    return _QID.pack(*qid)


QID_SIZE = _QID.size
DIRENT_FIXED = QID_SIZE + 8 + 1 + 2  # qid, offset, type, name length: then the name
