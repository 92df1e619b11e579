"""kvmm's exception hierarchy: everything kvmm raises on purpose is a :class:`KvmmError`.

::

    KvmmError                      exit_status 1 unless a subclass says otherwise
    ├── ConfigError                bad command-line value (size syntax, cpu count)   2
    ├── KvmUnavailableError        /dev/kvm missing, not permitted, wrong API        13
    ├── KvmError(ioctl, errno)     a KVM ioctl failed                                1
    ├── GuestMemoryError(gpa, n)   an access outside guest RAM                       1
    ├── MemoryConfigError          more memory than the host has, no hugepages      12
    ├── KernelImageError           missing, unreadable or malformed kernel/initrd   10
    ├── DiskError                  missing, unreadable, locked or read-only disk    11
    ├── ShareError                 a --share directory missing or not shareable      11
    ├── NetError (kvmm.tap)        tap cannot be opened or attached                 14
    ├── SnapshotError              a snapshot is corrupt, truncated or mismatched   15
    ├── AcpiError                  an ACPI table kvmm cannot encode (a kvmm bug)     1
    └── ConsoleTimeout             expected console output did not appear            5

The CLI maps each to its ``exit_status`` and prints ``kvmm: error: <message>`` (README).
"""

from __future__ import annotations

import errno as _errno
import os

from .defaults import (
    EXIT_DISK, EXIT_IMAGE, EXIT_KVM_UNAVAILABLE, EXIT_MEMORY, EXIT_SNAPSHOT, EXIT_TIMEOUT, EXIT_USAGE, EXIT_VMM_ERROR,
)


class KvmmError(Exception):
    """Root of every error kvmm raises on purpose."""

    exit_status = EXIT_VMM_ERROR


class ConfigError(KvmmError):
    """A command-line or API option has an invalid value."""

    exit_status = EXIT_USAGE


class KvmUnavailableError(KvmmError):
    """/dev/kvm cannot be used on this host."""

    exit_status = EXIT_KVM_UNAVAILABLE


class KvmError(KvmmError):
    """A KVM ioctl failed."""

    def __init__(self, ioctl: str, err: int, detail: str = "") -> None:
        self.ioctl = ioctl
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        msg = f"{ioctl} failed: {name} ({os.strerror(err)})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class GuestMemoryError(KvmmError):
    """An access to guest-physical range ``[gpa, gpa+length)`` that is not all RAM."""

    def __init__(self, gpa: int, length: int) -> None:
        self.gpa = gpa
        self.length = length
        super().__init__(f"guest memory access [{gpa:#x}, +{length:#x}) is outside guest RAM")


class MemoryConfigError(KvmmError):
    """Guest memory cannot be provided as requested."""

    exit_status = EXIT_MEMORY


class KernelImageError(KvmmError):
    """The kernel or initrd image cannot be loaded."""

    exit_status = EXIT_IMAGE


class DiskError(KvmmError):
    """A disk image cannot be opened as requested."""

    exit_status = EXIT_DISK


class ShareError(KvmmError):
    """A host directory cannot be shared (``--share``): missing, not a directory, or on
    a host pseudo file system."""

    exit_status = EXIT_DISK


class SnapshotError(KvmmError):
    """A snapshot cannot be written, or is refused on restore (corrupt, truncated, from
    another kvmm version, or its disks changed)."""

    exit_status = EXIT_SNAPSHOT


class AcpiError(KvmmError):
    """An ACPI table or AML term kvmm was asked to build cannot be encoded (a value out
    of its field's range, a name AML cannot spell): kvmm's own values, so a kvmm bug."""


class ConsoleTimeout(KvmmError):
    """Expected console output did not appear; carries the last console lines."""

    exit_status = EXIT_TIMEOUT

    def __init__(self, pattern: bytes | str, why: str, last_lines: str) -> None:
        self.pattern = pattern
        self.last_lines = last_lines
        shown = pattern.decode(errors="replace") if isinstance(pattern, bytes) else pattern
        super().__init__(f"console never showed /{shown}/: {why}; last console lines:\n{last_lines}")
