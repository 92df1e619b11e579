"""The libc and system-call declarations the 9p server uses that Python's os lacks, for
cffi: ``fstatfs`` (the file system's type, for the pseudo-file-system rule), glibc's
``getdents64`` (directory offsets that ``lseek`` accepts) and ``syscall`` (``openat2``,
which glibc does not wrap).

As kvmm/kvm/cdef.py, these come pre-parsed in ``kvmm/p9/_abi.py`` (cffi's out-of-line
ABI mode, no C compiler); after editing :data:`CDEF`, run ``scripts/gen-abi``.
``tests/p9/test_hostfs.py`` compiles a C program to check the structure sizes.
"""

from __future__ import annotations

import os
import zlib

CDEF = """
/* <linux/openat2.h> */
struct open_how {
    uint64_t flags;
    uint64_t mode;
    uint64_t resolve;
};

/* <bits/statfs.h> on x86-64 (glibc) */
struct statfs {
    long f_type;
    long f_bsize;
    unsigned long f_blocks;
    unsigned long f_bfree;
    unsigned long f_bavail;
    unsigned long f_files;
    unsigned long f_ffree;
    int f_fsid[2];
    long f_namelen;
    long f_frsize;
    long f_flags;
    long f_spare[4];
};

int fstatfs(int fd, struct statfs *buf);
ssize_t getdents64(int fd, void *dirp, size_t count);
long syscall(long number, ...);
"""


def cdef_digest() -> str:
    """A fingerprint of :data:`CDEF` (staleness of the generated module)."""
    return f"{zlib.crc32(CDEF.encode()):08x}"


def generate(path: str = os.path.join(os.path.dirname(__file__), "_abi.py")) -> None:
    """Write the pre-parsed module (``scripts/gen-abi``)."""
    import cffi

    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source("kvmm.p9._abi", None)
    builder.emit_python_code(path)
    with open(path, "a", encoding="ascii") as f:
        f.write(f"\n# kvmm.p9.cdef.cdef_digest() of the declarations this module was generated from\nCDEF_DIGEST = {cdef_digest()!r}\n")
