"""``kvmm run`` with the project kernel: the host's / as a 9p root, the init shim run from
the host's files. Where guest user space cannot run (software-nested KVM) the boot ends
at the kernel's exec of the shim; the tests that need the command to run are skipped
there, with the reason, and run on hardware KVM."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmm import Machine
from kvmm.config import Outcome
from kvmm.host import detect_host
from kvmm.run import SHIM

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

ROOT = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 600
needs_user_space = pytest.mark.skipif(
    not detect_host().userspace_works,
    reason="needs guest user space, which cannot make system calls on this host (software-nested KVM, kvm_pvm)")


def kvmm_run(*args: str, timeout: float = BOOT_TIMEOUT + 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kvmm", "run", *args], capture_output=True, timeout=timeout,
                          cwd=ROOT, stdin=subprocess.DEVNULL)


def test_kvmm_run_mounts_the_9p_root_and_runs_the_shim_from_the_hosts_files(kernel_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    res = kvmm_run("--kernel", str(kernel_dir / "vmlinux"), "--console-log", str(log), "--stats", "-v",
                   "--timeout", str(BOOT_TIMEOUT), "--", "sh", "-c", "echo hi; exit 3")
    console = log.read_text(errors="replace")
    stderr = res.stderr.decode(errors="replace")
    assert "VFS: Mounted root (9p filesystem) readonly on device" in console, console[-3000:]
    assert f"Run {SHIM} as init process" in console
    counters = dict(re.findall(r"(9p0_\w+)=(\d+)", stderr))
    assert int(counters["9p0_walks"]) > 0 and int(counters["9p0_read_bytes"]) > 0, stderr
    times = re.search(r"guest kernel ran \S+ ([\d.]+) s after start", stderr)
    print(f"\ntime to init: {times.group(1) if times else '?'} s; 9p root counters: {counters}")
    if detect_host().userspace_works:
        assert res.returncode == 3 and res.stdout == b"hi\n", stderr
    else:
        assert res.returncode == 17, stderr
        assert (f"kvmm: error: the command did not run: the guest kernel started {SHIM}; guest user space cannot "
                f"make system calls on kvm_pvm (software-nested KVM), so the boot ends here") in stderr


def test_the_kernel_loads_the_shims_interpreter_through_9p(kernel_dir: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    # Past init: the kernel execs the shim (#!/bin/sh), opens /bin/sh (a symlink chain the
    # guest resolves with Treadlink) and its ELF interpreter, and user space faults their
    # pages in over 9p until its first system call.
    caplog.set_level(logging.DEBUG, logger="kvmm.p9.server")
    result = Machine.run_command(["true"], kernel=str(kernel_dir / "vmlinux"), timeout=BOOT_TIMEOUT,
                                 console_path=str(tmp_path / "console.log"))
    requests = [r.getMessage() for r in caplog.records if r.getMessage().startswith("9p0 kvmm-root: ")]
    walked = {name for line in requests for name in re.findall(r"b'([^']*)'", line) if "Twalk" in line}
    print(f"\n{len(requests)} requests on the root share; {result.counters.get('9p0_read_bytes')} bytes read; "
          f"names walked include: {sorted(walked)[:40]}")
    interpreter = next(Path("/lib64").glob("ld-linux-x86-64.so.*")).name
    assert "sh" in walked and interpreter in walked, sorted(walked)
    assert any("Treadlink" in line for line in requests)
    assert result.counters["9p0_read_bytes"] > 100_000
    if detect_host().userspace_works:
        assert result.status == 0
    else:  # init died at its first system call; kvmm run reports the end at init
        assert result.status is None and result.vm.outcome is Outcome.INIT_REACHED, result.vm
        assert "Attempted to kill init" in (tmp_path / "console.log").read_text(errors="replace")
        assert result.exit_status == 17


@needs_user_space
def test_run_prints_hi_and_exits_3(kernel_dir: Path) -> None:
    res = kvmm_run("--kernel", str(kernel_dir / "vmlinux"), "--", "sh", "-c", "echo hi; exit 3")
    assert res.returncode == 3, res.stderr.decode(errors="replace")
    assert res.stdout == b"hi\n"


@needs_user_space
def test_stdout_and_stderr_stay_apart_and_bytes_are_unchanged(kernel_dir: Path) -> None:
    res = kvmm_run("--kernel", str(kernel_dir / "vmlinux"), "--", "sh", "-c",
                   "printf 'out\\r\\nline\\n'; echo err >&2; exit 0")
    assert res.returncode == 0 and res.stdout == b"out\r\nline\n" and res.stderr.endswith(b"err\n")


@needs_user_space
def test_rw_directory_and_current_directory_under_tmp(kernel_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("from the host\n")
    out = tmp_path / "out"
    out.mkdir()
    result = Machine.run_command(["sh", "-c", "cat input.txt; pwd; echo written > out/made.txt; touch x 2>&1 || true"],
                                 kernel=str(kernel_dir / "vmlinux"), cwd=str(tmp_path), rw=[str(out)], timeout=300)
    assert result.status == 0, (result.stderr, result.console)
    lines = result.stdout.decode().splitlines()
    assert lines[:2] == ["from the host", str(tmp_path)]
    assert (out / "made.txt").read_text() == "written\n"
    assert not (tmp_path / "x").exists()  # the current directory is read-only unless --rw


@needs_user_space
def test_kvmm_run_fixture(kvmm_run, kernel_dir: Path) -> None:  # type: ignore[no-untyped-def]
    r = kvmm_run(["uname", "-r"], kernel=str(kernel_dir / "vmlinux"), timeout=300)
    assert r.status == 0 and r.stdout.startswith(b"6.1.")
