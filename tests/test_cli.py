"""Bad user input gets one clear line and a distinct exit status (README, exit status)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, default_signal_dispositions, run_kvmm


def error_lines(res) -> list[str]:  # type: ignore[no-untyped-def]
    return [line for line in res.stderr.decode().splitlines() if line.strip()]


def test_missing_kernel(tmp_path: Path) -> None:
    res = run_kvmm("--kernel", str(tmp_path / "nope"))
    assert res.returncode == 10
    assert error_lines(res) == [f"kvmm: error: kernel {str(tmp_path / 'nope')!r} does not exist"]


def test_kernel_is_a_directory(tmp_path: Path) -> None:
    res = run_kvmm("--kernel", str(tmp_path))
    assert res.returncode == 10 and "is a directory" in res.stderr.decode()


def test_kernel_of_wrong_format(tmp_path: Path) -> None:
    bad = tmp_path / "kernel.txt"
    bad.write_text("not a kernel\n" * 100)
    res = run_kvmm("--kernel", str(bad))
    assert res.returncode == 10
    assert "neither a multiboot kernel, an ELF vmlinux nor a bzImage" in res.stderr.decode()
    assert len(error_lines(res)) == 1


def test_truncated_kernel(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    data = guests("serial_hello").read_bytes()
    bad = tmp_path / "truncated.elf"
    bad.write_bytes(data[:100])
    res = run_kvmm("--kernel", str(bad))
    assert res.returncode == 10 and "kvmm: error:" in res.stderr.decode()


def test_missing_initrd(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), "--initrd", str(tmp_path / "none.cpio"))
    assert res.returncode == 10 and "initrd" in res.stderr.decode()


@pytest.mark.parametrize("size", ["12X", "0", "lots", "-5G"])
def test_bad_memory_size_syntax(size: str, guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), f"--mem={size}")
    assert res.returncode == 2
    assert error_lines(res) == [f"kvmm: error: invalid memory size {size!r}: expected a positive number with an optional K/M/G suffix, e.g. 256M or 2G"]


def test_more_memory_than_available(guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), "--mem", "64T")
    assert res.returncode == 12
    assert "more than the" in res.stderr.decode() and len(error_lines(res)) == 1


def test_hugepages_without_reserved_pages(guests) -> None:  # type: ignore[no-untyped-def]
    with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) for line in f if line.startswith("HugePages_Free"))
    if free:
        pytest.skip(f"this host has {free} hugepages reserved")
    res = run_kvmm("--kernel", str(guests("serial_hello")), "--mem", "64M", "--hugepages")
    assert res.returncode == 12 and "hugepages" in res.stderr.decode()


@pytest.mark.parametrize("cpus", ["0", "17"])
def test_cpu_count_out_of_range(cpus: str, guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), "--cpus", cpus)
    assert res.returncode == 2 and "--cpus must be between 1 and 16" in res.stderr.decode()


def test_bad_console_option(guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), "--console", "tcp:1234")
    assert res.returncode == 2 and "stdio" in res.stderr.decode()


def test_kvm_device_missing(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "KVMM_KVM_DEVICE": str(tmp_path / "kvm")}
    res = run_kvmm("--kernel", str(guests("serial_hello")), env=env)
    assert res.returncode == 13
    assert "does not exist: load the kvm module" in res.stderr.decode() and len(error_lines(res)) == 1


def test_kvm_device_not_permitted(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    # A node that refuses opening for read-write the way a root-owned 0600 /dev/kvm refuses a user.
    node = tmp_path / "kvm"
    node.mkdir()
    node.chmod(0o500)
    env = {**os.environ, "KVMM_KVM_DEVICE": str(node)}
    res = run_kvmm("--kernel", str(guests("serial_hello")), env=env)
    assert res.returncode == 13 and "kvmm: error: cannot open" in res.stderr.decode()


def test_help_and_version() -> None:
    res = run_kvmm("--help")
    assert res.returncode == 0 and b"exit status:" in res.stdout and b"--kernel" in res.stdout
    res = run_kvmm("--version")
    assert res.returncode == 0 and res.stdout.startswith(b"kvmm ")


def test_missing_required_kernel_option() -> None:
    res = run_kvmm()
    assert res.returncode == 2 and b"--kernel" in res.stderr


def test_missing_disk(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), "--disk", str(tmp_path / "nope.img"))
    assert res.returncode == 11 and error_lines(res) == [f"kvmm: error: disk {str(tmp_path / 'nope.img')!r} does not exist"]


def test_disk_in_use_by_another_kvmm(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    import subprocess, sys

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    first = subprocess.Popen([sys.executable, "-m", "kvmm", "--kernel", str(guests("hang")), "--mem", "64M",
                              "--disk", str(disk)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        assert first.stdout is not None and first.stdout.readline() == b"hanging\n"  # holds the lock now
        res = run_kvmm("--kernel", str(guests("serial_hello")), "--disk", str(disk))
        assert res.returncode == 11
        assert error_lines(res) == [f"kvmm: error: disk {str(disk)!r} is in use by another process (it holds the image's lock)"]
    finally:
        first.kill()
        first.wait()


def test_disk_read_only_on_the_host_but_requested_read_write(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    import shutil, subprocess

    disk = tmp_path / "ro.img"
    disk.write_bytes(bytes(1 << 20))
    disk.chmod(0o444)
    immutable = os.geteuid() == 0  # root may write a 0444 file; not an immutable one
    if immutable:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(disk)]).returncode != 0:
            pytest.skip("running as root and chattr +i is unavailable here, so no file is read-only to us")
    try:
        res = run_kvmm("--kernel", str(guests("serial_hello")), "--disk", str(disk))
        assert res.returncode == 11, res.stderr.decode()
        assert error_lines(res) == [f"kvmm: error: disk {str(disk)!r} cannot be opened read-write (add ,ro to open it read-only): permission denied"]
        res = run_kvmm("-q", "--kernel", str(guests("serial_hello")), "--disk", f"{disk},ro")
        assert res.returncode == 64 + 42  # read-only is fine
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(disk)])


@pytest.mark.parametrize("spec", ["ro", "x.img,bogus", ",ro"])
def test_bad_disk_option(spec: str, guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), f"--disk={spec}")
    assert res.returncode in (2, 11)
    assert len(error_lines(res)) == 1 and error_lines(res)[0].startswith("kvmm: error:")


@pytest.mark.parametrize("spec,status", [("tap=", 2), ("mac=52:54:00:00:00:01", 2), ("tap=t0,mac=zz", 2),
                                         ("tap=name-longer-than-15", 14), ("tap=t0,mac=00:00:00:00:00:00", 2)])
def test_bad_net_option(spec: str, status: int, guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), f"--net={spec}")
    assert res.returncode == status, res.stderr.decode()
    assert len(error_lines(res)) == 1 and error_lines(res)[0].startswith("kvmm: error:")


@pytest.mark.parametrize("extra", [["--kernel", "vmlinux"], ["--mem", "1G"], ["--cpus", "2"], ["--cmdline", "quiet"],
                                   ["--net", "tap=t0"], ["--initrd", "x"], ["--module", "m"],
                                   ["--debug-exit", "0xf4"], ["--pc-testdev"], ["--cpu-features=-pcid"], ["--no-acpi"]])
def test_restore_takes_its_configuration_from_the_snapshot(tmp_path: Path, extra: list[str]) -> None:
    res = run_kvmm("--restore", str(tmp_path), *extra)
    assert res.returncode == 2 and b"takes the VM's configuration from the snapshot" in res.stderr


@pytest.mark.parametrize("key", ["this user's", "none yet"])
def test_restore_of_a_directory_that_is_no_snapshot(tmp_path: Path, key: str) -> None:
    # Regression: on a machine where kvmm had made no snapshot yet (no key), an empty
    # directory was refused for want of a key instead of for being no snapshot.
    env = None if key == "this user's" else {**os.environ, "KVMM_SNAPSHOT_KEY": str(tmp_path / "no-key")}
    (tmp_path / "empty").mkdir()
    res = run_kvmm("--restore", str(tmp_path / "empty"), env=env)
    assert res.returncode == 15 and res.stderr == (f"kvmm: error: {tmp_path / 'empty'} is not a kvmm snapshot: "
                                                   "it has no manifest.json\n").encode()


def test_ctl_without_a_listening_socket(tmp_path: Path) -> None:
    res = run_kvmm("ctl", str(tmp_path / "none.sock"), "status")
    assert res.returncode == 16 and b"cannot reach the control socket" in res.stderr


def test_ctl_snapshot_needs_a_directory(tmp_path: Path) -> None:
    res = run_kvmm("ctl", str(tmp_path / "none.sock"), "snapshot")
    assert res.returncode == 2 and b"snapshot needs a directory" in res.stderr


def test_ctl_gives_up_on_a_socket_that_never_answers(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "mute.sock"))
        server.listen(1)  # connections queue, nobody answers
        res = run_kvmm("ctl", str(tmp_path / "mute.sock"), "status", "--timeout", "0.5")
    assert res.returncode == 1 and b"gave no answer to status within 0.5 s" in res.stderr


def test_readme_exit_status_table_is_the_one_kvmm_prints() -> None:
    """One table of exit statuses (kvmm.defaults.EXIT_STATUSES): `kvmm --help` prints it,
    and the README's table says the same, row for row."""
    from kvmm.defaults import EXIT_STATUSES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = readme[readme.index("### Exit status"):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))[2:]  # after header and rule
    table = [tuple(cell.strip() for cell in row.strip().strip("|").split("|", 1)) for row in rows]
    assert table == [(status, meaning) for status, meaning in EXIT_STATUSES]
    from kvmm.cli import build_parser

    help_text = build_parser().format_help()
    for status, meaning in EXIT_STATUSES:
        assert f"  {status:<8} {meaning.replace('`', '').split()[0]}" in help_text


def test_every_error_class_exits_with_a_documented_status() -> None:
    from kvmm.defaults import EXIT_STATUSES
    from kvmm import errors
    from kvmm.tap import NetError

    documented = {int(s) for s, _ in EXIT_STATUSES if s.isdigit()}
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.KvmmError)] + [NetError]
    assert len(classes) >= 9
    for cls in classes:
        assert cls.exit_status in documented, cls


# --- --share ----------------------------------------------------------------------------------
def test_share_adds_a_virtio_9p_device(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("-q", "--stats", "--kernel", str(guests("serial_hello")), "--share", f"{tmp_path},tag=data")
    assert res.returncode == 64 + 42, res.stderr.decode()
    assert b"9p0_fids=0" in res.stderr and b"9p0_requests=0" in res.stderr


@pytest.mark.parametrize("spec", ["{d}", "{d},tag=", "{d},tag=a b", "{d},tag=x,bogus", ",tag=x", "{d},tag=" + "t" * 65])
def test_bad_share_option(spec: str, tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), "--share", spec.format(d=tmp_path))
    assert res.returncode == 2, res.stderr.decode()
    assert len(error_lines(res)) == 1 and error_lines(res)[0].startswith("kvmm: error:")


def test_two_shares_with_one_tag(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), "--share", f"{tmp_path},tag=x", "--share", f"{tmp_path},tag=x")
    assert res.returncode == 2 and error_lines(res) == ["kvmm: error: two shares have the same tag (x)"]


def test_missing_share_directory(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), "--share", f"{tmp_path / 'nope'},tag=x")
    assert res.returncode == 11 and error_lines(res) == [f"kvmm: error: share {str(tmp_path / 'nope')!r} does not exist"]


def test_share_of_a_host_pseudo_file_system(guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), "--share", "/sys,tag=x")
    assert res.returncode == 11 and "sysfs" in error_lines(res)[0]


def test_run_without_a_command() -> None:
    res = run_kvmm("run", "--kernel", "vmlinux", "--")
    assert res.returncode == 2 and b"the command is missing" in res.stderr


def test_run_with_a_missing_rw_directory(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("run", "--kernel", str(guests("serial_hello")), "--rw", str(tmp_path / "nope"), "--", "true")
    assert res.returncode == 11 and error_lines(res) == [f"kvmm: error: --rw {str(tmp_path / 'nope')!r} does not exist"]


@pytest.mark.parametrize("args,match", [
    (["--debug-exit", "0xf4,3"], "--debug-exit '0xf4,3': SIZE must be 1, 2 or 4"),
    (["--debug-exit", "0x3f8"], "--debug-exit 0x3f8,1: another kvmm device uses one of these ports"),
    (["--cpu-features=+warp"], "unknown feature 'warp'"),
])
def test_bad_test_kernel_options(args: list[str], match: str, guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("-q", "--kernel", str(guests("serial_hello")), "--mem", "16M", *args)
    assert res.returncode == 2, res.stderr.decode()
    assert len(error_lines(res)) == 1 and error_lines(res)[0].startswith("kvmm: error: ") and match in error_lines(res)[0]


# --- issue 19: hostile files (defect 6) ---------------------------------------------------------
def _limited_memory() -> None:
    """In the child: at most 3 GiB of address space, so that a kvmm that reads /dev/zero
    without a bound fails fast instead of eating the host's memory."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def run_bounded(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """run_kvmm with a memory bound; a kvmm that blocks fails the test (TimeoutExpired)."""
    return subprocess.run([sys.executable, "-m", "kvmm", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout, cwd=ROOT, preexec_fn=_limited_memory)


@pytest.mark.parametrize("option", ["--kernel", "--initrd"])
def test_kernel_or_initrd_that_is_a_character_device_is_refused(option: str, guests) -> None:  # type: ignore[no-untyped-def]
    args = ["--kernel", "/dev/zero"] if option == "--kernel" else ["--kernel", str(guests("serial_hello")), "--initrd", "/dev/zero"]
    res = run_bounded(*args)
    assert res.returncode == 10, res.stderr.decode()[-500:]
    assert error_lines(res) == [f"kvmm: error: {option[2:]} '/dev/zero' is a character device, not a regular file"]


@pytest.mark.parametrize("option", ["--kernel", "--initrd", "--console"])
def test_a_fifo_as_kernel_initrd_or_console_file_is_refused_at_once(option: str, tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = {"--kernel": ["--kernel", str(fifo)],
            "--initrd": ["--kernel", str(guests("serial_hello")), "--initrd", str(fifo)],
            "--console": ["--kernel", str(guests("serial_hello")), "--console", f"file:{fifo}"]}[option]
    res = run_bounded(*args, timeout=20)  # it used to block in open() for ever
    assert res.returncode == (2 if option == "--console" else 10), res.stderr.decode()
    assert len(error_lines(res)) == 1 and "FIFO" in error_lines(res)[0]


def test_kernel_larger_than_guest_ram_is_refused_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(64 << 20)  # sparse: costs no disk
    res = run_bounded("--kernel", str(big), "--mem", "16M")
    assert res.returncode == 10 and "more than the 16777216 it may be" in res.stderr.decode()


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
def test_a_fifo_or_character_device_is_no_disk(kind: str, tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "fifo"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path = Path("/dev/null")
    for spec in (str(path), f"{path},ro"):
        res = run_bounded("--kernel", str(guests("serial_hello")), "--disk", spec, timeout=20)
        assert res.returncode == 11, res.stderr.decode()
        assert error_lines(res) == [f"kvmm: error: disk {str(path)!r} is {'a FIFO' if kind == 'fifo' else 'a character device'}, "
                                    "not a regular file or a block device"]


# --- issue 19: tracebacks (defect 10) ------------------------------------------------------------
def test_cmdline_with_a_byte_that_is_not_utf8_is_one_line(guests) -> None:  # type: ignore[no-untyped-def]
    res = subprocess.run([os.fsencode(sys.executable), b"-m", b"kvmm", b"--kernel", os.fsencode(guests("serial_hello")),
                          b"--cmdline", b"quiet \xff"], capture_output=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2, res.stderr.decode(errors="replace")
    assert error_lines(res) == ["kvmm: error: --cmdline has a byte that is not UTF-8 (ff at 6): give the kernel "
                                "command line as UTF-8 text"]


def test_smoke_expect_that_is_no_regular_expression_is_a_usage_error(guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("smoke", "--kernel", str(guests("serial_hello")), "--expect", "(")
    assert res.returncode == 2 and len(error_lines(res)) == 1
    assert error_lines(res)[0].startswith("kvmm: error: argument --expect: '(' is not a valid regular expression")


def test_closed_stdout_is_one_line_and_status_2(guests) -> None:  # type: ignore[no-untyped-def]
    res = subprocess.run([sys.executable, "-m", "kvmm", "--kernel", str(guests("serial_hello"))], stdout=None,
                         stderr=subprocess.PIPE, cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL,
                         preexec_fn=lambda: os.close(1))
    assert res.returncode == 2, res.stderr.decode()
    assert error_lines(res) == ["kvmm: error: stdout is closed and the console writes there: give --console "
                                "file:PATH (file:/dev/null to discard it) ('kvmm --help' for usage)"]
    # With the console elsewhere, a closed stdout is no problem (and no kvmm file lands on fd 1).
    res = subprocess.run([sys.executable, "-m", "kvmm", "-q", "--kernel", str(guests("serial_hello")), "--console",
                          "file:/dev/null"], stderr=subprocess.PIPE, cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL,
                         preexec_fn=lambda: os.close(1))
    assert res.returncode == 64 + 42 and res.stderr == b"", res.stderr.decode()


SIGNAL_AT_START = """
import os, signal, sys
import kvmm.builder, kvmm.cli

real = kvmm.builder.read_image

def read_image(*args):  # the signal arrives while kvmm reads the kernel, before the VM exists
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return real(*args)

kvmm.builder.read_image = read_image
sys.exit(kvmm.cli.main(sys.argv[2:]))
"""


def test_sigint_before_the_vm_runs_is_one_line_and_status_130(guests) -> None:  # type: ignore[no-untyped-def]
    res = subprocess.run([sys.executable, "-c", SIGNAL_AT_START, "SIGINT", "--kernel", str(guests("serial_hello"))],
                         capture_output=True, cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL,
                         preexec_fn=default_signal_dispositions)
    assert res.returncode == 130, res.stderr.decode()
    assert error_lines(res) == ["kvmm: error: interrupted (SIGINT)"]


def test_sigusr2_before_the_vm_runs_does_not_end_kvmm(guests) -> None:  # type: ignore[no-untyped-def]
    res = subprocess.run([sys.executable, "-c", SIGNAL_AT_START, "SIGUSR2", "-q", "--kernel", str(guests("serial_hello"))],
                         capture_output=True, cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 64 + 42, res.stderr.decode()  # the guest ran to its end
    assert error_lines(res) == ["kvmm: SIGUSR2: no VM is running yet, nothing to dump"]
    assert res.stdout == b"hello from the guest\n"


# --- issue 19: small ones (defect 12) ------------------------------------------------------------
def test_memory_size_that_is_no_page_multiple_is_a_usage_error(guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), "--mem", "1025K")
    assert res.returncode == 2
    assert error_lines(res) == ["kvmm: error: invalid memory size '1025K': not a multiple of 4 KiB (the page size), "
                                "e.g. 1028K"]


def test_empty_memory_size_is_an_error_not_the_default(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), "--mem=")
    assert res.returncode == 2 and error_lines(res) == [
        "kvmm: error: invalid memory size '': expected a positive number with an optional K/M/G suffix, e.g. 256M or 2G"]
    res = run_kvmm("--restore", str(tmp_path), "--mem=")
    assert res.returncode == 2 and "drop --mem" in res.stderr.decode()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "0", "-1"])
@pytest.mark.parametrize("command", ["kvmm", "smoke", "ctl", "run"])
def test_every_float_option_rejects_nan_and_inf(command: str, value: str, guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kernel = str(guests("serial_hello"))
    args = {"kvmm": ["--kernel", kernel], "smoke": ["smoke", "--kernel", kernel, "--expect", "x"],
            "ctl": ["ctl", str(tmp_path / "none.sock"), "status"],
            "run": ["run", "--kernel", str(tmp_path / "none")]}[command]
    res = run_kvmm(*args, f"--timeout={value}", *(["--", "true"] if command == "run" else []), timeout=60)
    assert res.returncode == 2, res.stderr.decode()
    assert error_lines(res) == [f"kvmm: error: argument --timeout: expected a finite number of seconds above 0, "
                                f"not {value!r} ('kvmm{'' if command == 'kvmm' else ' ' + command} --help' for usage)"]


@pytest.mark.parametrize("args", [["--bogus"], ["smoke", "--bogus"], ["ctl"], ["run", "--bogus", "--", "true"], []])
def test_a_usage_error_is_one_line_with_kvmms_prefix(args: list[str]) -> None:
    res = run_kvmm(*args)
    assert res.returncode == 2
    assert len(error_lines(res)) == 1 and error_lines(res)[0].startswith("kvmm: error: "), res.stderr.decode()


@pytest.mark.parametrize("path,match", [("", "expected a path, not an empty string"),
                                        ("/tmp/" + "s" * 103, "may be at most 107")])
def test_unusable_api_socket_path_is_a_usage_error(path: str, match: str, guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("serial_hello")), f"--api-sock={path}")
    assert res.returncode == 2 and len(error_lines(res)) == 1 and match in res.stderr.decode(), res.stderr.decode()
    assert ": None" not in res.stderr.decode()


def test_every_test_docs_security_md_names_exists() -> None:
    """docs/security.md backs each claim with tests by name: each name must be a test."""
    import re

    docs = (ROOT / "docs" / "security.md").read_text()
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    defined = set(re.findall(r"^(?:async )?def (test_\w+)", sources, re.M))
    modules = {p.stem for p in (ROOT / "tests").rglob("test_*.py")}
    named = set(re.findall(r"\b(test_\w+)", docs)) - modules
    assert named - defined == set()
