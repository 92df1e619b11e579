"""Opening the user's files: never blocking, never unbounded, only the kinds that make sense.

Every file kvmm reads on the user's behalf (kernel, initrd, multiboot modules, disks,
the snapshot's files, the snapshot key) and every console file it writes goes through
here (docs/security.md, "Files kvmm opens"):

- opened with ``O_NONBLOCK``, so a FIFO cannot stall kvmm in ``open`` (a FIFO opened for
  reading waits for a writer, one opened for writing for a reader; fifo(7)) or in a
  read that follows;
- checked with ``fstat`` on the descriptor just opened (not a ``stat`` of the name, which
  another process may replace in between) to be a regular file; block devices only where
  they make sense (disks); character devices, FIFOs and sockets otherwise never;
- read with a size bound the caller gives (``/dev/zero`` would otherwise grow without end);
- refused with the caller's error class, so the CLI prints one line with the documented
  exit status (kvmm/errors.py).

``O_NONBLOCK`` is cleared again once the kind is known: for a regular file or a block
device it changes nothing (regular files are always "ready", open(2)), and for a console
output it restores the blocking writes kvmm makes to its stdout.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Callable

ErrorClass = Callable[[str], Exception]

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind(mode: int) -> str:
    """What a file of ``mode`` is, in words, for the error line."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def _reason(exc: OSError, path: str | os.PathLike[str]) -> str:
    if exc.errno == errno.ENXIO:  # a FIFO nobody reads, opened O_WRONLY|O_NONBLOCK (fifo(7)); a socket
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return exc.strerror or str(exc)
        return "it is a FIFO with no reader" if stat.S_ISFIFO(mode) else f"it is {kind(mode)}"
    return exc.strerror or str(exc)


def _clear_nonblock(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def open_input(path: str | os.PathLike[str], what: str, error: ErrorClass, *, write: bool = False,
               block_device: bool = False, nofollow: bool = False, denied: str = "") -> int:
    """A descriptor for reading (``write``: reading and writing) the regular file at
    ``path`` (or a block device, when ``block_device``). Anything else, or an ``open``
    that fails, raises ``error("<what> '<path>' ...")``. ``nofollow``: a symlink as the
    last component is refused (ELOOP), for files a guest could have created. ``denied``:
    how it was to be opened, said when permission is denied ("for reading")."""
    shown = os.fsdecode(path)
    wanted = "a regular file or a block device" if block_device else "a regular file"
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if nofollow:
        flags |= os.O_NOFOLLOW
    try:
        # A look before opening, since opening a device can act (/dev/watchdog arms
        # itself, a tape rewinds); the fstat below is what counts (the name may change).
        before = os.stat(path, follow_symlinks=not nofollow).st_mode
        if not (stat.S_ISREG(before) or stat.S_ISDIR(before) or (block_device and stat.S_ISBLK(before))
                or (nofollow and stat.S_ISLNK(before))):
            raise error(f"{what} {shown!r} is {kind(before)}, not {wanted}")
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{what} {shown!r} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {shown!r} is a directory") from None
    except PermissionError:
        raise error(f"{what} {shown!r} cannot be opened {denied or 'for reading'}: permission denied") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        reason = _reason(exc, path) if isinstance(exc, OSError) else "the name contains a NUL byte"
        raise error(f"cannot open {what} {shown!r}: {reason}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or (block_device and stat.S_ISBLK(mode))):
            raise error(f"{what} {shown!r} is {kind(mode)}, not {wanted}")
        _clear_nonblock(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_size(fd: int) -> int:
    """The size of the regular file or block device open at ``fd`` (``st_size`` is 0 for
    a block device: its size is where ``SEEK_END`` lands)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def read_file(path: str | os.PathLike[str], what: str, limit: int, error: ErrorClass, *,
              nofollow: bool = False) -> bytes:
    """All of the regular file at ``path``, which may hold at most ``limit`` bytes
    (checked on its size first, and again on what the reads return: a file that grows
    while it is read is cut at ``limit + 1`` and refused)."""
    fd = open_input(path, what, error, nofollow=nofollow)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{what} {os.fsdecode(path)!r} is {size} bytes, more than the {limit} it may be")
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, min(limit + 1 - got, 16 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise error(f"cannot read {what} {os.fsdecode(path)!r}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if got > limit:
        raise error(f"{what} {os.fsdecode(path)!r} is more than the {limit} bytes it may be")
    return b"".join(chunks)


def open_output(path: str | os.PathLike[str], what: str, error: ErrorClass) -> int:
    """A descriptor to write ``what`` (a console's output) to ``path``, created (mode
    0644) or truncated. A regular file, a character device (``/dev/null``, a terminal) or
    a pipe that already has a reader (``/dev/stdout`` of a shell pipeline); a FIFO with
    no reader is refused at once rather than waited for, directories and sockets never.
    The descriptor is blocking, as kvmm's stdout is."""
    shown = os.fsdecode(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags, 0o644)
    except (OSError, ValueError) as exc:
        reason = _reason(exc, path) if isinstance(exc, OSError) else "the name contains a NUL byte"
        raise error(f"cannot open {what} {shown!r}: {reason}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
            raise error(f"{what} {shown!r} is {kind(mode)}: give a file, a character device or a pipe")
        _clear_nonblock(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd
