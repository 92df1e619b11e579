"""The host side of a 9p share: opening one name beneath a directory without ever
following a symbolic link, resolving a path of such names from the share's root, reading
a directory with offsets that ``lseek`` accepts, and ``fstatfs``.

Confinement (docs/security.md) rests on three rules kept here:

- every name handed to the host is one validated component (:func:`check_name`: no
  ``/``, no NUL, not ``.`` or ``..``, at most ``NAME_MAX`` bytes), opened relative to a
  directory file descriptor that is itself inside the share;
- a symbolic link is never followed on the host side: ``openat2`` with
  ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`` (Linux 5.6+,
  ``openat2(2)``; the kernel itself then refuses to leave the directory, whatever the
  name), else ``openat`` with ``O_NOFOLLOW`` (a final symlink is opened as the link
  itself with ``O_PATH``, and cannot be an intermediate directory);
- a mount of a host pseudo file system (procfs, sysfs, debugfs, ...) inside the share
  is opaque: its mount point is visible, its contents are not (:func:`is_pseudo_fs`).

``openat2`` is system call 437 on x86-64 (kvmm's only architecture). Where it is missing
(older kernels) or filtered (seccomp policies answer ENOSYS or EPERM), the fallback is
used from then on; the two are tested against the same cases.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
from typing import Any, NamedTuple

from .cdef import CDEF, cdef_digest

LOG = logging.getLogger(__name__)

SYS_OPENAT2 = 437  # x86-64 (arch/x86/entry/syscalls/syscall_64.tbl)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
CONFINED = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

NAME_MAX = 255
PATH_MAX = 4096
MAX_DEPTH = PATH_MAX // 2  # "a/b/c...": a deeper path cannot be named in PATH_MAX bytes

# Host file systems whose files are not data but windows into the host kernel or other
# processes (<linux/magic.h>): a share never shows their contents.
PSEUDO_FS = {
    0x9FA0: "proc", 0x62656572: "sysfs", 0x64626720: "debugfs", 0x74726163: "tracefs",
    0x73636673: "securityfs", 0x27E0EB: "cgroup", 0x63677270: "cgroup2", 0xCAFE4A11: "bpf",
    0x62656570: "configfs", 0xDE5E81E4: "efivarfs", 0x6165676C: "pstore", 0x65735543: "fusectl",
    0x42494E4D: "binfmt_misc", 0xF97CFF8C: "selinuxfs", 0x43415D53: "smackfs", 0x1CD1: "devpts",
    0x19800202: "mqueue", 0x6E736673: "nsfs", 0xABBA1974: "xenfs",
}


def _load_ffi() -> Any:
    """The pre-parsed out-of-line module if it matches :data:`CDEF`, else a parse of it."""
    try:
        from . import _abi

        if getattr(_abi, "CDEF_DIGEST", None) == cdef_digest():
            return _abi.ffi
        LOG.warning("kvmm/p9/_abi.py is older than kvmm/p9/cdef.py: parsing the declarations (regenerate with scripts/gen-abi)")
    except ImportError:
        pass
    import cffi

    parsed = cffi.FFI()
    parsed.cdef(CDEF)
    return parsed


ffi = _load_ffi()
_libc = ffi.dlopen(None)


class StatFs(NamedTuple):
    """What ``fstatfs`` says about the file system of a file (Rstatfs carries it)."""

    type: int
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    fsid: int
    namelen: int


def fstatfs(fd: int) -> StatFs:
    buf = ffi.new("struct statfs *")
    if _libc.fstatfs(fd, buf) < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    fsid = (buf.f_fsid[0] & 0xFFFF_FFFF) | ((buf.f_fsid[1] & 0xFFFF_FFFF) << 32)
    return StatFs(buf.f_type & 0xFFFF_FFFF, buf.f_bsize, buf.f_blocks, buf.f_bfree, buf.f_bavail, buf.f_files,
                  buf.f_ffree, fsid, buf.f_namelen)


def is_pseudo_fs(fd: int) -> str | None:
    """The name of the host pseudo file system ``fd`` lies on, or None."""
    return PSEUDO_FS.get(fstatfs(fd).type)


def check_name(name: bytes) -> int:
    """0 if ``name`` is one path component the host may be given, else the errno that
    refuses it (a guest-supplied name is never a path)."""
    if not name or b"/" in name or b"\0" in name:
        return errno.EINVAL
    if name in (b".", b".."):
        return errno.EINVAL  # the server handles ".." itself, from the fid's path
    if len(name) > NAME_MAX:
        return errno.ENAMETOOLONG
    return 0


# --- opening beneath a directory ----------------------------------------------------------
class _Openat2:
    """``openat2`` through libc's ``syscall()``, until the kernel shows it lacks it."""

    def __init__(self) -> None:
        self.available: bool | None = None  # None: not tried yet

    def __call__(self, dirfd: int, path: bytes, flags: int, mode: int, resolve: int) -> int:
        how = ffi.new("struct open_how *")
        how.flags = flags
        how.mode = mode if flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0)) else 0
        how.resolve = resolve
        fd = _libc.syscall(ffi.cast("long", SYS_OPENAT2), ffi.cast("int", dirfd), ffi.new("char[]", path), how,
                           ffi.cast("size_t", ffi.sizeof("struct open_how")))
        if fd < 0:
            err = ffi.errno
            raise OSError(err, os.strerror(err))
        return int(fd)


_openat2 = _Openat2()
USE_OPENAT2 = True  # tests turn this off to run the fallback


def openat2_available() -> bool:
    """Whether this kernel (and any seccomp filter around kvmm) lets ``openat2`` through."""
    if _openat2.available is None:
        try:
            os.close(_openat2(os.open("/", os.O_PATH | os.O_CLOEXEC), b".", os.O_PATH | os.O_CLOEXEC, 0, CONFINED))
            _openat2.available = True
        except OSError as exc:
            _openat2.available = False
            LOG.info("openat2 is not available (%s): 9p shares resolve names with O_NOFOLLOW", exc.strerror)
    return bool(_openat2.available)


def open_beneath(dirfd: int, name: bytes, flags: int, mode: int = 0) -> int:
    """Open the one component ``name`` (already checked with :func:`check_name`) in the
    directory ``dirfd``, never following a symbolic link: a final symlink is refused with
    ELOOP unless ``flags`` has ``O_PATH`` (then the link itself is opened)."""
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if USE_OPENAT2 and openat2_available():
        return _openat2(dirfd, name, flags, mode, CONFINED)
    return os.open(name, flags, mode, dir_fd=dirfd)


def resolve(root_fd: int, components: tuple[bytes, ...]) -> int:
    """An ``O_PATH`` descriptor of ``components`` below ``root_fd`` (each already
    checked), no symlink followed anywhere: one ``openat2`` where available, else one
    ``openat`` per component."""
    if not components:
        return os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    if len(components) > MAX_DEPTH:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
    if USE_OPENAT2 and openat2_available():
        return _openat2(root_fd, b"/".join(components), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, 0, CONFINED)
    fd = root_fd
    try:
        for name in components:
            nxt = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = nxt
    except BaseException:
        if fd != root_fd:
            os.close(fd)
        raise
    return fd


def reopen(fd: int, st: os.stat_result, flags: int, parent: int | None, name: bytes | None) -> int:
    """A real (not ``O_PATH``) descriptor of the object ``fd`` refers to: a directory
    through its own ``.``, anything else through its parent and name (a directory fd
    inside the share), with ``O_NONBLOCK`` while it is opened (a FIFO swapped in by the
    host must not block the I/O thread) and refused unless it is still a regular file."""
    if stat.S_ISDIR(st.st_mode):
        return os.open(".", flags | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    if parent is None or name is None:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))
    new = open_beneath(parent, name, flags | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(new).st_mode):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        if not flags & os.O_NONBLOCK:
            os.set_blocking(new, True)
    except BaseException:
        os.close(new)
        raise
    return new


# --- directories ---------------------------------------------------------------------------
class DirEntry(NamedTuple):
    ino: int
    offset: int  # the offset of the entry after this one (lseek to it to continue)
    type: int  # DT_* of <dirent.h>
    name: bytes


_DIRENT64 = struct.Struct("<QqHB")  # d_ino, d_off, d_reclen, d_type; then the name, NUL-terminated


def getdents(fd: int, offset: int, size: int) -> list[DirEntry]:
    """The entries of the open directory ``fd`` from ``offset`` (0, or an entry's
    ``offset`` as returned before), at most ``size`` bytes of ``struct linux_dirent64``."""
    os.lseek(fd, offset, os.SEEK_SET)
    buf = ffi.new("char[]", max(size, 512))
    n = _libc.getdents64(fd, buf, len(buf))
    if n < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    data = ffi.buffer(buf, n)[:]
    out = []
    pos = 0
    while pos + _DIRENT64.size <= n:
        ino, off, reclen, dtype = _DIRENT64.unpack_from(data, pos)
        if reclen < _DIRENT64.size or pos + reclen > n:
            break  # the kernel does not do this; stop rather than loop
        name = data[pos + _DIRENT64.size : pos + reclen].split(b"\0", 1)[0]
        out.append(DirEntry(ino, off, dtype, name))
        pos += reclen
    return out
