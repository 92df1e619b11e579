"""kvmm/p9/hostfs.py: its cffi layouts against the system headers, the system-call
numbers and flags it hard-codes, and its directory reading."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmm.p9 import hostfs
from kvmm.p9.hostfs import ffi


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if not Path("/usr/include/linux/openat2.h").exists() or shutil.which("gcc") is None:
        pytest.skip("needs gcc and the kernel headers (linux-libc-dev)")
    src = """#define _GNU_SOURCE
#include <stdio.h>
#include <stddef.h>
#include <sys/vfs.h>
#include <sys/syscall.h>
#include <linux/openat2.h>
#include <linux/magic.h>
int main(void) {
    printf("statfs=%zu\\n", sizeof(struct statfs));
    printf("statfs.f_fsid=%zu\\n", offsetof(struct statfs, f_fsid));
    printf("statfs.f_namelen=%zu\\n", offsetof(struct statfs, f_namelen));
    printf("open_how=%zu\\n", sizeof(struct open_how));
    printf("SYS_openat2=%d\\n", SYS_openat2);
    printf("RESOLVE_BENEATH=%d\\nRESOLVE_NO_SYMLINKS=%d\\nRESOLVE_NO_MAGICLINKS=%d\\n",
           RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS, RESOLVE_NO_MAGICLINKS);
    printf("PROC=%lu\\nSYSFS=%lu\\nDEBUGFS=%lu\\nCGROUP2=%lu\\n", (unsigned long)PROC_SUPER_MAGIC,
           (unsigned long)SYSFS_MAGIC, (unsigned long)DEBUGFS_MAGIC, (unsigned long)CGROUP2_SUPER_MAGIC);
    return 0;
}
"""
    d = tmp_path_factory.mktemp("hostfs")
    (d / "abi.c").write_text(src)
    subprocess.run(["gcc", "-o", str(d / "abi"), str(d / "abi.c")], check=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split("=") for line in out.splitlines())}


def test_layouts_match_the_system_headers(header_values: dict[str, int]) -> None:
    assert ffi.sizeof("struct statfs") == header_values["statfs"]
    assert ffi.offsetof("struct statfs", "f_fsid") == header_values["statfs.f_fsid"]
    assert ffi.offsetof("struct statfs", "f_namelen") == header_values["statfs.f_namelen"]
    assert ffi.sizeof("struct open_how") == header_values["open_how"]


def test_numbers_match_the_system_headers(header_values: dict[str, int]) -> None:
    assert hostfs.SYS_OPENAT2 == header_values["SYS_openat2"]
    assert hostfs.RESOLVE_BENEATH == header_values["RESOLVE_BENEATH"]
    assert hostfs.RESOLVE_NO_SYMLINKS == header_values["RESOLVE_NO_SYMLINKS"]
    assert hostfs.RESOLVE_NO_MAGICLINKS == header_values["RESOLVE_NO_MAGICLINKS"]
    for name in ("PROC", "SYSFS", "DEBUGFS", "CGROUP2"):
        assert header_values[name] in hostfs.PSEUDO_FS


def test_fstatfs_agrees_with_statvfs(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_PATH)
    try:
        got, vfs = hostfs.fstatfs(fd), os.statvfs(tmp_path)
        assert (got.bsize, got.blocks, got.files, got.namelen) == (vfs.f_bsize, vfs.f_blocks, vfs.f_files, vfs.f_namemax)
        assert got.fsid == vfs.f_fsid
    finally:
        os.close(fd)


def test_getdents_resumes_at_an_entry_offset(tmp_path: Path) -> None:
    names = {f"f{i:04d}".encode() for i in range(500)}
    for name in names:
        (tmp_path / name.decode()).touch()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen, offset = [], 0
        while True:
            entries = hostfs.getdents(fd, offset, 1024)
            if not entries:
                break
            seen += [e.name for e in entries]
            offset = entries[-1].offset
        assert sorted(seen) == sorted(names | {b".", b".."})
    finally:
        os.close(fd)


@pytest.mark.parametrize("use_openat2", [True, False])
def test_open_beneath_never_follows_a_final_symlink(tmp_path: Path, use_openat2: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if use_openat2 and not hostfs.openat2_available():
        pytest.skip("no openat2 here")
    monkeypatch.setattr(hostfs, "USE_OPENAT2", use_openat2)
    (tmp_path / "target").write_text("t")
    (tmp_path / "link").symlink_to("target")
    d = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as info:
            hostfs.open_beneath(d, b"link", os.O_RDONLY)
        assert info.value.errno == 40  # ELOOP
        fd = hostfs.open_beneath(d, b"link", os.O_PATH)
        assert os.readlink(b"", dir_fd=fd) == b"target"
        os.close(fd)
        with pytest.raises(OSError):
            hostfs.resolve(d, (b"link", b"x"))
    finally:
        os.close(d)


def test_check_name_refuses_anything_but_one_component() -> None:
    assert hostfs.check_name(b"ok.txt") == 0
    for bad in (b"", b".", b"..", b"a/b", b"/", b"a\0", b"x" * 256):
        assert hostfs.check_name(bad) != 0
